"""Tensor-parallel checks of kv_paged's Engine and PagedCache: run under torchrun (or any launcher
that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), every rank the same command:

    torchrun --nproc_per_node 2 tests/distributed/tp_check.py --models DIR [DIR ...] --out R.json

Each DIR is a saved transformers causal LM (tests/test_tensor_parallel.py saves tiny Llamas: one
with 4 KV heads, one GQA with 2). Every rank loads it sharded by transformers' tensor-parallel plan
(DistributedConfig(tp_plan="auto")); rank 0 also loads it whole and computes the references in-process:
eager model.generate and a single-process Engine with the same settings. Rank 0 writes R.json:
{check name: {"ok": bool, "detail": str}}; tests/test_tensor_parallel.py asserts every check.

--device cuda runs the same checks with NCCL, one GPU per rank (cuda:LOCAL_RANK).
--scenario plants a failure instead of the checks (worker-raises, worker-dies, driver-raises,
worker-raises-lives: rank 1 raises and lives on for 2 x --timeout, and worker-interrupted /
driver-interrupted: a KeyboardInterrupt, a BaseException, on rank 1 / rank 0): the report says how
each rank's call ended, how long it took to, and what its Engine still holds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from kv_paged import Engine, SamplingParams
from kv_paged.beam_search import BeamSearchParams
from kv_paged.integrations.hf import CACHE_KWARG, PagedCache, use_kv_paged_attention

PROMPT_LENS = [1, 5, 8, 9, 17, 23, 31]
MAX_NEW = 8
BLOCK_SIZE = 8
TIMEOUT_S = 60


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def tokens(outputs) -> list[list[list[int]]]:
    return [[list(c.token_ids) for c in o.outputs] for o in outputs]


class Report:
    def __init__(self) -> None:
        self.checks: dict[str, dict] = {}

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks[name] = {"ok": bool(ok), "detail": detail}

    def equal(self, name: str, got, want) -> None:
        self.check(name, got == want, "" if got == want else f"got {got!r}\nwant {want!r}")


def load(path: str, device: torch.device, sharded: bool):
    import transformers

    kwargs = {}
    if sharded:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
    else:
        kwargs["device_map"] = device
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


# Engine settings and request sets of the checks: (name, Engine kwargs, how to run it).
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, top_p=0.9, n=2, seed=11)


def engine_runs(prompts):
    """(name, Engine kwargs, fn(engine) -> comparable result)."""
    shared = prompts[-1][:16]

    def greedy(e):
        return tokens(e.generate(prompts, GREEDY, use_tqdm=False))

    def sampled(e):
        params = [
            SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, top_p=0.9, n=2, seed=11 + i)
            for i in range(len(prompts))
        ]
        return tokens(e.generate(prompts, params, use_tqdm=False))

    def prefix(e):
        first = tokens(e.generate([shared + [3, 4, 5]], GREEDY, use_tqdm=False))
        second = e.generate([shared + [6, 7]], GREEDY, use_tqdm=False)
        cached = second[0].num_cached_tokens if second else None  # [] on the other ranks
        return {"tokens": first + tokens(second), "cached": cached}

    def beams(e):
        params = BeamSearchParams(beam_width=3, max_new_tokens=6, num_return_sequences=2)
        return tokens(e.beam_search(prompts[2:5], params, use_tqdm=False))

    def preempt(e):
        out = tokens(e.generate(prompts, GREEDY, use_tqdm=False))
        return {"tokens": out, "preempted": e.metrics().preemptions > 0}

    def steps(e):
        ids = [e.add_request(p, GREEDY) for p in prompts[:3]]
        got = {}
        while e.has_unfinished():
            for out in e.step():
                if out.finished:
                    got[out.request_id] = [list(c.token_ids) for c in out.outputs]
        return [got[i] for i in ids]

    return [
        ("greedy", {}, greedy),
        ("sampled_n2", {}, sampled),
        ("prefix_cache", {}, prefix),
        ("beam_search", {}, beams),
        ("chunked_prefill", {"max_num_batched_tokens": 16}, greedy),
        ("preemption", {"num_blocks": 12, "max_num_seqs": 8}, preempt),
        ("step_api", {}, steps),
    ]


def run_checks(args, device, report: Report) -> None:
    rank = dist.get_rank()
    for path in args.models:
        tag = os.path.basename(path.rstrip("/"))
        sharded = load(path, device, sharded=True)
        whole = load(path, device, sharded=False) if rank == 0 else None
        vocab = sharded.config.vocab_size
        prompts = prompts_for(vocab)

        # Per-rank pool: 1/N of the single-process pool for the same number of blocks.
        e = Engine(sharded, num_blocks=32, block_size=BLOCK_SIZE, tp_timeout=TIMEOUT_S)
        pool_bytes = e.runner.pool.nbytes
        sizes = [None] * dist.get_world_size()
        dist.all_gather_object(sizes, pool_bytes)
        if rank == 0:
            with Engine(whole, num_blocks=32, block_size=BLOCK_SIZE) as one:
                full = one.runner.pool.nbytes
            report.equal(f"{tag}/pool_bytes_per_rank", sizes, [full // len(sizes)] * len(sizes))

        # Greedy against eager generate (rank 0's outputs; the others return []).
        out = e.generate(prompts, GREEDY, use_tqdm=False)
        if rank == 0:
            eager = [
                whole.generate(
                    torch.tensor([p], device=device), max_new_tokens=MAX_NEW, do_sample=False
                )[0, len(p) :].tolist()
                for p in prompts
            ]
            report.equal(f"{tag}/greedy_vs_eager_generate", [t[0] for t in tokens(out)], eager)
        else:
            report.equal(f"{tag}/worker_generate_returns_empty", out, [])
            try:
                e.step()
                report.check(f"{tag}/worker_step_refused", False, "step() ran on a worker")
            except RuntimeError as err:
                report.check(f"{tag}/worker_step_refused", "only rank 0" in str(err), str(err))

        # A bad prompt on rank 0: ValueError on every rank, and the group stays in step.
        try:
            e.generate([[vocab + 5]], GREEDY, use_tqdm=False)
            report.check(f"{tag}/bad_prompt_raises_on_rank{rank}", False, "no error")
        except ValueError as err:
            report.check(f"{tag}/bad_prompt_raises_on_rank{rank}", "vocab" in str(err), str(err))
        again = e.generate(prompts[:2], GREEDY, use_tqdm=False)
        if rank == 0:
            report.equal(f"{tag}/generate_after_bad_prompt", tokens(again), tokens(out)[:2])
        e.close()

        for name, kwargs, fn in engine_runs(prompts):
            kw = {"num_blocks": 64, "block_size": BLOCK_SIZE, **kwargs}
            e = Engine(sharded, tp_timeout=TIMEOUT_S, **kw)
            if rank == 0 or name != "step_api":
                got = fn(e)
            else:
                e.run_worker()  # serves rank 0's step() calls until it closes
                got = None
            e.close()
            if rank == 0:
                with Engine(whole, **kw) as one:
                    want = fn(one)
                report.equal(f"{tag}/{name}_vs_single_process", got, want)
                if name == "prefix_cache":
                    report.check(f"{tag}/prefix_cache_hit", got["cached"] > 0, str(got["cached"]))
                if name == "preemption":
                    report.check(f"{tag}/preempted", got["preempted"], "")

        # PagedCache under model.generate: every rank runs the same generate (transformers' TP
        # way), each rank's BlockManager makes the same decisions from the same inputs.
        use_kv_paged_attention(sharded)
        cache = PagedCache.for_model(sharded, num_blocks=64, block_size=BLOCK_SIZE)
        ids = torch.tensor([prompts[4]], device=device)
        paged = sharded.generate(
            ids, max_new_tokens=MAX_NEW, do_sample=False, **{CACHE_KWARG: cache}
        )[0].tolist()
        tables = [None] * dist.get_world_size()
        dist.all_gather_object(tables, cache.block_manager.stats())
        if rank == 0:
            eager = whole.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)[0].tolist()
            report.equal(f"{tag}/paged_cache_generate_vs_eager", paged, eager)
            report.check(
                f"{tag}/paged_cache_same_decisions",
                all(t == tables[0] for t in tables),
                str(tables),
            )
            report.equal(
                f"{tag}/paged_cache_pool_heads",
                cache.pool.k_caches[0].shape[2],
                sharded.config.num_key_value_heads // dist.get_world_size(),
            )
        dist.barrier()


def run_scenario(args, device, report: Report) -> None:
    """A planted failure on one rank during generate(); every rank reports how its call ended."""
    rank = dist.get_rank()
    model = load(args.models[0], device, sharded=True)
    prompts = prompts_for(model.config.vocab_size)
    e = Engine(model, num_blocks=64, block_size=BLOCK_SIZE, tp_timeout=args.timeout)
    victim = 0 if args.scenario.startswith("driver-") else 1
    if rank == victim:
        forward, calls = e.runner.forward, [0]

        def planted(*a, **k):
            calls[0] += 1
            if calls[0] == 3:
                if args.scenario == "worker-dies":
                    os._exit(3)
                if args.scenario.endswith("-interrupted"):  # Ctrl-C mid-step, on this rank only
                    raise KeyboardInterrupt
                raise RuntimeError(f"planted failure on rank {rank}")
            return forward(*a, **k)

        e.runner.forward = planted
    t0 = time.monotonic()
    try:
        e.generate(prompts, GREEDY, use_tqdm=False)
        ended = "returned"
    except BaseException as err:  # noqa: BLE001 - the report says what it was
        ended = f"{type(err).__name__}: {err}"
    held = {
        "requests": len(e._requests),
        "blocks_in_use": e.block_manager.stats()["blocks_in_use"],
    }
    report.check(
        f"rank{rank}",
        True,
        json.dumps({"ended": ended, "seconds": time.monotonic() - t0, "closed": e.closed, **held}),
    )
    if args.scenario == "worker-raises-lives" and rank == victim:
        time.sleep(2 * args.timeout)  # alive: the other rank must fail at its timeout
    try:  # a closed engine says why
        e.generate(prompts, GREEDY, use_tqdm=False)
        report.check(f"rank{rank}_after", True, "returned")
    except BaseException as err:  # noqa: BLE001
        report.check(f"rank{rank}_after", True, f"{type(err).__name__}: {err}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument(
        "--out", required=True, help="report path; rank r > 0 in a scenario writes OUT.rank<r>"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--scenario",
        default=None,
        choices=[
            "worker-raises",
            "worker-dies",
            "driver-raises",
            "worker-raises-lives",
            "worker-interrupted",
            "driver-interrupted",
        ],
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT_S,
        help="seconds: the process group's and the Engine's tp_timeout",
    )
    args = parser.parse_args()

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if args.device == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    rank = dist.get_rank()
    report = Report()
    status = 0
    try:
        if args.scenario:
            run_scenario(args, device, report)
        else:
            run_checks(args, device, report)
    except BaseException:  # noqa: BLE001 - into the report, then a non-zero exit
        report.check(f"rank{rank}_crashed", False, traceback.format_exc())
        status = 1
    path = args.out if rank == 0 else f"{args.out}.rank{rank}"
    with open(path, "w") as f:
        json.dump(report.checks, f, indent=1)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    return status


if __name__ == "__main__":
    sys.exit(main())
