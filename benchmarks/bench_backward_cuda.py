"""Training attention on the GPU (issue 13, item 3): forward + backward of kv_paged.ops.flash_attention
(FA2 backward by recomputation, flash_attention_backward_kernel.cuh) vs torch's
scaled_dot_product_attention with each of its CUDA backends (flash, efficient, cuDNN), causal.

Method: q/k/v [batch, heads, N, head_dim] (packed [batch * N, heads, head_dim] with cu_seqlens for
kv_paged), heads = 2048 / head_dim, batch = --tokens / N, one upstream gradient. Each backend's
output and three gradients are first checked against SDPA math in float32 on a small case; then
the median of --iters CUDA-event-timed runs of `out = f(q, k, v); out.backward(dout)` after
--warmup runs. FLOPs = 3.5 * 4 * batch * heads * N^2 * head_dim / 2 (causal: forward 4 B H N^2 D / 2,
backward 2.5x the forward's matrix work); the dense bf16 matrix-product rate is measured in the same
run (8192^3) and each TFLOP/s is also given as a fraction of it. Peak memory: the rise of
torch.cuda.max_memory_allocated over one forward + backward, per token. Written without a GPU: not
run yet (tools/gpu_session.sh runs it).

  python benchmarks/bench_backward_cuda.py [--head-dims 64,128] [--seqlens 1024,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cuda_timing
from bench_backward import fwd_bwd, kv_paged_causal, sdpa_causal  # noqa: E402
from bench_prefill import matmul_tflops, sdpa_backends  # noqa: E402
from cuda_timing import time_ms  # noqa: E402


def make_backends():
    """BACKENDS: name -> f(q, k, v) on [B, H, N, D] leaves, returning [B, H, N, D] (causal)."""
    backends = {"kv_paged": kv_paged_causal}
    for name, b in sdpa_backends().items():
        backends[f"sdpa {name}"] = sdpa_causal(b)
    return backends


def leaves(B, H, N, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, dout = (
        torch.randn(B, H, N, D, generator=g, device="cuda").to(dtype) for _ in range(4)
    )
    # kv_paged takes [B * N, H, D] packed rows: give it (and everyone) that memory layout.
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    return q, k, v, dout


def check(backends, D, dtype) -> dict[str, float]:
    """Max |difference| of out, dq, dk, dv vs SDPA math in float32 on [2, 4, 300, D]; a backend that
    cannot run this shape or dtype is dropped (returned as NaN) rather than timed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, dout = leaves(2, 4, 300, D, dtype, seed=1)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        ref_out = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
    ref_out.backward(dout.float())
    ref = [ref_out.detach()] + [x.grad for x in (q32, k32, v32)]
    errs = {}
    for name, fn in backends.items():
        try:
            got = [fwd_bwd(fn, q, k, v, dout).detach()] + [x.grad for x in (q, k, v)]
        except RuntimeError as e:  # e.g. a backend without this head_dim or dtype
            print(f"  {name}: cannot run ({str(e).splitlines()[0][:100]})")
            errs[name] = float("nan")
            continue
        errs[name] = max((a.float() - b).abs().max().item() for a, b in zip(got, ref))
    if not errs["kv_paged"] <= (2e-3 if dtype == torch.float32 else 6e-2):
        raise SystemExit(
            f"kv_paged disagrees with SDPA math at head_dim {D}: {errs['kv_paged']:.3g}"
        )
    return errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per batch (batch * N)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "bench_backward_cuda.py measures CUDA kernels and needs a CUDA device; none is visible."
        )
    dtype = getattr(torch, args.dtype)
    backends = make_backends()
    peak = matmul_tflops(args.warmup, args.iters)
    lines = [
        f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {args.dtype}, causal, "
        f"{args.tokens} tokens per batch, heads = 2048 / head_dim; median of {args.iters}; "
        f"measured bf16 matmul {peak:.0f} TFLOP/s",
        "",
        f"Command: `python benchmarks/bench_backward_cuda.py {' '.join(sys.argv[1:])}`",
        "",
        "| head_dim | N | backend | fwd+bwd ms | TFLOP/s (% matmul) | time / kv_paged's | peak extra MiB/token | max diff vs math |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for D in (int(x) for x in args.head_dims.split(",")):
        errs = check(backends, D, dtype)
        H = 2048 // D
        for N in (int(x) for x in args.seqlens.split(",")):
            B = max(1, args.tokens // N)
            q, k, v, dout = leaves(B, H, N, D, dtype)
            flops = 3.5 * 4 * B * H * N * N * D / 2
            base = None
            for name, fn in backends.items():
                if errs[name] != errs[name]:  # NaN: could not run
                    continue
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fwd_bwd(fn, q, k, v, dout)
                torch.cuda.synchronize()
                extra = (torch.cuda.max_memory_allocated() - before) / (B * N) / 2**20
                ms = time_ms(
                    lambda fn=fn, a=(q, k, v, dout): fwd_bwd(fn, *a), args.warmup, args.iters
                )
                base = base or ms
                tf = flops / ms / 1e9
                lines.append(
                    f"| {D} | {N} | {name} | {ms:.3f} | {tf:.0f} ({100 * tf / peak:.0f}%) | "
                    f"{ms / base:.2f}x | {extra:.4f} | {errs[name]:.1e} |"
                )
                print(lines[-1], flush=True)
            del q, k, v, dout
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
