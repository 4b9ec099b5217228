"""The Engine on one process vs tensor parallelism over torch.distributed (gloo on CPU, NCCL on GPUs).

Method: one random-weight Llama (seeded, saved to a temporary directory) and one fixed set of
--requests greedy requests (prompts of uniform length in [16, --max-prompt], --max-new tokens each).
BACKENDS, each launched as fresh processes with torchrun's environment variables
(tools/local_ranks.py):
  one_process   Engine(model) in one process, --threads torch threads
  one_process_<k>t  the same with k = --threads / N threads: what each rank of tp<N> has
  tp<N>         N ranks, the model sharded by transformers' tensor-parallel plan
                (DistributedConfig(tp_plan="auto")), Engine on every rank, --threads / N threads each
Every backend's tokens are compared with one_process's. Reported: generate() wall seconds (median of
--repeats after one warm-up run, on rank 0), generated tok/s, the ratio to one_process, and each
rank's KV pool bytes for the same --num-blocks (the point of tensor parallelism on this machine: a
rank holds 1/N of the KV heads). On a 2-core CPU, 2 ranks of 1 thread each are not expected to be
faster than 1 process of 2 threads: they add a gloo all-reduce per layer (twice: attention and MLP)
and a broadcast of the step's plan.

  python benchmarks/bench_tp.py [--ranks 2] [--requests 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, os.path.join(REPO, "tools"))
from cpu_timing import cpu_name  # noqa: E402
from local_ranks import start_ranks  # noqa: E402


def build_model(path: str, args) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=1024,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def requests(args) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(16, args.max_prompt + 1, (args.requests,), generator=g).tolist()
    return [torch.randint(1, args.vocab, (n,), generator=g).tolist() for n in lens]


def rank_main(args) -> None:
    """One rank of a backend: generate --repeats + 1 times, write {tokens, times, pool} (rank 0)."""
    import torch.distributed as dist
    import transformers

    from kv_paged import Engine, SamplingParams

    torch.set_num_threads(args.threads)
    world = int(os.environ["WORLD_SIZE"])
    kwargs = {}
    if world > 1:
        from transformers.distributed import DistributedConfig

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, **kwargs).eval()
    model.generation_config.eos_token_id = None
    params = SamplingParams(max_new_tokens=args.max_new, temperature=0.0)
    prompts = requests(args)
    with Engine(model, num_blocks=args.num_blocks, block_size=16, tp_timeout=300) as engine:
        pool = engine.runner.pool.nbytes
        times, out = [], []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            out = engine.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
    if world > 1:
        pools = [None] * world
        dist.all_gather_object(pools, pool)
        dist.destroy_process_group()
    else:
        pools = [pool]
    if int(os.environ["RANK"]) == 0:
        result = {
            "tokens": [o.outputs[0].token_ids for o in out],
            "times": times[1:],
            "pools": pools,
        }
        with open(args.result, "w") as f:
            json.dump(result, f)


def launch(args, nproc: int, threads: int, result: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--rank-main",
        "--result",
        result,
        "--threads",
        str(threads),
        *args.passthrough,
    ]
    with start_ranks(cmd, nproc, threads=threads, cwd=REPO, store_timeout_s=3600) as procs:
        codes = [p.wait(timeout=3600) for p in procs]
    if any(codes):
        raise SystemExit(f"backend with {nproc} ranks failed: exit codes {codes}")
    with open(result) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads in all: one process gets all, each of N ranks 1/N",
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=128)
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--num-blocks", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="append the markdown section to this file")
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model(model_dir, args)
        shape = [
            "--requests",
            str(args.requests),
            "--max-prompt",
            str(args.max_prompt),
            "--max-new",
            str(args.max_new),
            "--vocab",
            str(args.vocab),
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
            "--heads",
            str(args.heads),
            "--kv-heads",
            str(args.kv_heads),
            "--num-blocks",
            str(args.num_blocks),
            "--repeats",
            str(args.repeats),
            "--model-dir",
            model_dir,
        ]
        args.passthrough = shape
        per_rank = max(1, args.threads // args.ranks)
        backends = {
            "one_process": (1, args.threads),
            f"one_process_{per_rank}t": (1, per_rank),  # one rank's share of the threads
            f"tp{args.ranks}": (args.ranks, per_rank),
        }
        results = {
            name: launch(args, n, t, os.path.join(tmp, f"{name}.json"))
            for name, (n, t) in backends.items()
        }
    base = results["one_process"]
    generated = sum(len(t) for t in base["tokens"])
    lines = [
        f"## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{cpu_name()}, {os.cpu_count()} cores",
        "",
        f"torch {torch.__version__}. Command: `python benchmarks/bench_tp.py "
        f"{' '.join(sys.argv[1:])}`. Model: random Llama hidden {args.hidden}, {args.layers} "
        f"layers, {args.heads} heads / {args.kv_heads} KV heads, float32; {args.requests} "
        f"requests, {generated} generated tokens, greedy; --num-blocks {args.num_blocks}.",
        "",
        "| backend | ranks x threads | wall s (median) | tok/s | vs one_process | same tokens | "
        "KV pool per rank (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (n, t) in backends.items():
        r = results[name]
        wall = statistics.median(r["times"])
        same = sum(a == b for a, b in zip(r["tokens"], base["tokens"]))
        lines.append(
            f"| {name} | {n} x {t} | {wall:.2f} | {generated / wall:.1f} | "
            f"{statistics.median(base['times']) / wall:.2f}x | {same}/{len(base['tokens'])} | "
            f"{', '.join(f'{p / 2**20:.1f}' for p in r['pools'])} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
