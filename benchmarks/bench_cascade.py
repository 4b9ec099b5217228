"""Shared-prefix (cascade) decode attention against plain paged decode and SDPA, and the Engine on
the demo's shared-prompt chat workload with and without cascade attention.

Method (ops): one decode step of B sequences that share a P-token prefix (P / block_size physical
blocks, as the prefix cache stores it) followed by private suffixes of 1..--suffix tokens; blocks
handed out by a random permutation. BACKENDS maps a name to a setup returning a zero-argument
callable: "cascade" = plan_cascade once (host, outside the timing: the Engine plans once per step
for all layers) + cascade_attention; "paged" = ops.paged_attention; "sdpa" = torch SDPA on each
sequence's K/V gathered into contiguous [B, KVH, L_max, D] tensors (padded, masked), skipped above
--sdpa-max-gib. Every backend's output is checked against the first ("paged") before timing
(max abs diff reported). Timing: warm-up, then the median of --iters wall-clock runs on the CPU
with torch's thread pool as configured. Ratios are "x paged" (paged time / backend time).
Method (engine): kv_paged.demo's embedded random-weight Llama on demo_chat's random-id workload
(every user shares one --system-len prompt, two turns), greedy, run with cascade_attention on and
off in the same process; reports wall time, decode tok/s and whether all tokens agree.

  python benchmarks/bench_cascade.py [--batches 64,256,1000] [--prefixes 1024,4096] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cpu_timing
from cpu_timing import cpu_name, time_cpu  # noqa: E402

import kv_paged  # noqa: E402
from kv_paged import ops  # noqa: E402
from kv_paged.cascade import cascade_attention, plan_cascade  # noqa: E402


@dataclass
class Work:
    """One decode step. query: [B, H, D]; k_cache/v_cache: [num_blocks, block_size, KVH, D];
    block_tables: int32 [B, max_blocks]; cu_seqlens_q: int32 [B + 1]; seq_lens_kv: int32 [B]."""

    query: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens_kv: torch.Tensor
    block_size: int

    def args(self):
        return (
            self.query,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.cu_seqlens_q,
            self.seq_lens_kv,
        )


def make_work(batch, prefix, suffix, heads, kv_heads, head_dim, bs, dtype, gen) -> Work:
    prefix_blocks = prefix // bs
    suffix_lens = torch.randint(1, suffix + 1, (batch,), generator=gen)
    private = [-(-int(n) // bs) for n in suffix_lens]
    num_blocks = prefix_blocks + sum(private)
    perm = torch.randperm(num_blocks, generator=gen)
    shape = (num_blocks, bs, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    width = prefix_blocks + max(private)
    tables = torch.full((batch, width), -1, dtype=torch.int32)
    tables[:, :prefix_blocks] = perm[:prefix_blocks].to(torch.int32)
    at = prefix_blocks
    for i, n in enumerate(private):
        tables[i, prefix_blocks : prefix_blocks + n] = perm[at : at + n].to(torch.int32)
        at += n
    return Work(
        query=torch.randn(batch, heads, head_dim, generator=gen).to(dtype),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=tables,
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens_kv=(prefix + suffix_lens).to(torch.int32),
        block_size=bs,
    )


def setup_paged(w: Work) -> Callable[[], torch.Tensor]:
    return lambda: ops.paged_attention(*w.args())


def setup_cascade(w: Work) -> Callable[[], torch.Tensor]:
    b = w.query.shape[0]
    plan = plan_cascade(w.block_tables, [1] * b, w.seq_lens_kv.tolist(), w.block_size)
    assert plan is not None, "no shared prefix found"
    return lambda: cascade_attention(*w.args(), plan)


def setup_sdpa(w: Work) -> Callable[[], torch.Tensor]:
    lens = w.seq_lens_kv.tolist()
    L = max(lens)
    nb = -(-L // w.block_size)
    idx = w.block_tables[:, :nb].clamp(min=0).long()
    b, kvh, d = w.query.shape[0], w.k_cache.shape[2], w.k_cache.shape[3]
    k = w.k_cache[idx].reshape(b, -1, kvh, d)[:, :L].transpose(1, 2).contiguous()
    v = w.v_cache[idx].reshape(b, -1, kvh, d)[:, :L].transpose(1, 2).contiguous()
    mask = (torch.arange(L)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]  # [B,1,1,L]
    q = w.query.unsqueeze(2)
    gqa = q.shape[1] != kvh
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa).squeeze(
        2
    )


BACKENDS: dict[str, Callable[[Work], Callable[[], torch.Tensor]]] = {
    "paged": setup_paged,
    "cascade": setup_cascade,
    "sdpa": setup_sdpa,
}


def bench_ops(args, dtype) -> list[str]:
    gen = torch.Generator().manual_seed(args.seed)
    lines = [
        f"### Decode step, {args.heads} q heads / {args.kv_heads} kv heads, head_dim "
        f"{args.head_dim}, {str(dtype)[6:]}, block_size {args.block_size}, suffixes 1..{args.suffix}",
        "",
        "| B | prefix | backend | ms / step | x paged | max abs diff vs paged |",
        "|---|---|---|---|---|---|",
    ]
    for prefix in args.prefixes:
        for batch in args.batches:
            w = make_work(
                batch,
                prefix,
                args.suffix,
                args.heads,
                args.kv_heads,
                args.head_dim,
                args.block_size,
                dtype,
                gen,
            )
            base_out, base_t = None, None
            for name, setup in BACKENDS.items():
                if name == "sdpa":
                    gib = 2 * batch * (prefix + args.suffix) * args.kv_heads * args.head_dim
                    gib *= w.k_cache.element_size() / 2**30
                    if gib > args.sdpa_max_gib:
                        lines.append(
                            f"| {batch} | {prefix} | {name} | skipped: contiguous K/V "
                            f"{gib:.1f} GiB > --sdpa-max-gib | | |"
                        )
                        continue
                fn = setup(w)
                out = fn()
                diff = (
                    0.0 if base_out is None else (out.float() - base_out.float()).abs().max().item()
                )
                t = time_cpu(fn, args.warmup, args.iters)
                if base_out is None:
                    base_out, base_t = out, t
                lines.append(
                    f"| {batch} | {prefix} | {name} | {t * 1e3:.1f} | {base_t / t:.2f} | "
                    f"{diff:.2e} |"
                )
                print(lines[-1], flush=True)
                del fn, out
    return lines


def bench_engine(args) -> list[str]:
    from kv_paged.demo import build_demo_model, run_chat
    from kv_paged.demo_chat import chat_workload
    from kv_paged.engine import Engine
    from kv_paged.engine.sampling import SamplingParams

    model = build_demo_model()
    vocab = model.config.vocab_size
    chat = chat_workload(args.engine_users, args.seed, None, vocab, args.system_len)
    params = SamplingParams(max_new_tokens=args.engine_max_new, temperature=0.0)
    lines = [
        f"### Engine, demo chat workload: embedded random Llama (4 layers, 8 q / 4 kv heads, "
        f"head_dim 32, float32), {args.engine_users} users x 2 turns, shared system prompt "
        f"{chat.system_tokens} tokens, greedy, max_new_tokens {args.engine_max_new}",
        "",
        "| cascade_attention | wall s | decode tok/s | steps | x off |",
        "|---|---|---|---|---|",
    ]
    tokens, walls = {}, {}
    for on in (False, True, False, True):  # interleaved: load changes on a shared machine
        engine = Engine(model, num_blocks=args.engine_blocks, block_size=16, cascade_attention=on)
        t0 = time.perf_counter()
        results = run_chat(engine, chat, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        m = engine.metrics()
        engine.close()
        tokens.setdefault(on, {k: r.outputs[0].token_ids for k, r in results.items()})
        walls.setdefault(on, []).append((wall, m.decode_tokens / wall, m.steps))
    for on in (False, True):
        wall, tps, steps = min(walls[on])
        lines.append(
            f"| {on} | {wall:.2f} | {tps:.0f} | {steps} | {min(walls[False])[0] / wall:.2f} |"
        )
    same = tokens[True] == tokens[False]
    lines += [
        "",
        f"Greedy tokens identical with and without cascade: {same} (best of 2 runs each).",
    ]
    print("\n".join(lines[-4:]), flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--batches", type=ints, default=[64, 256, 1000])
    parser.add_argument("--prefixes", type=ints, default=[1024, 4096])
    parser.add_argument("--suffix", type=int, default=32, help="private suffix lengths 1..N")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--sdpa-max-gib", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-ops", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--engine-users", type=int, default=64)
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--engine-max-new", type=int, default=32)
    parser.add_argument("--engine-blocks", type=int, default=2048)
    parser.add_argument("--out", default=None, help="append the markdown tables to this file")
    args = parser.parse_args()
    head = [
        f"## {datetime.date.today()} — {cpu_name()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, kv_paged {kv_paged.__version__}",
        "",
        "Command: `python " + " ".join(sys.argv) + "`",
        "",
    ]
    lines = head
    if not args.skip_ops:
        lines += bench_ops(args, getattr(torch, args.dtype)) + [""]
    if not args.skip_engine:
        lines += bench_engine(args) + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
