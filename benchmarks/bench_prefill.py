"""Prefill attention throughput on the GPU (issue 7's table): kv_paged.flash_attention (contiguous
varlen), kv_paged.paged_attention on the same problem read through a shuffled block table
(block_size 16; the paged path's goal is >= 90% of the contiguous one), and torch's
scaled_dot_product_attention with its fastest backend on this device (flash, cuDNN or efficient,
whichever is fastest per shape; the table names it).

Method: bf16, head_dim 64/128/256 with num_heads = 2048 / head_dim, sequence 1k-16k, causal and
not, batch = tokens_in_flight / seqlen (about 16k tokens in flight). Outputs are checked against
SDPA before timing. Each timing is the median of --iters CUDA-event-timed runs after --warmup runs.
FLOPs = 4 * batch * heads * seqlen^2 * head_dim (halved when causal). The dense bf16 matrix-product
rate is measured in the same run (8192^3 torch.matmul) and every TFLOP/s is also given as a
fraction of it. Results (markdown) go to benchmarks/results/ with device, versions, date, command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cuda_timing
from cuda_timing import time_ms  # noqa: E402


def matmul_tflops(warmup: int, iters: int) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup, iters)
    return 2 * n**3 / ms / 1e9


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        names["cudnn"] = SDPBackend.CUDNN_ATTENTION
    return names


def make_backends(args):
    """BACKENDS: name -> builder(q, k, v, causal) returning a zero-argument callable."""
    from torch.nn.attention import sdpa_kernel

    import kv_paged  # noqa: F401
    from kv_paged import ops

    def flash(q, k, v, causal):
        B, H, N, D = q.shape
        qp, kp, vp = (x.transpose(1, 2).reshape(B * N, H, D).contiguous() for x in (q, k, v))
        cu = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device="cuda")
        return lambda: ops.flash_attention(qp, kp, vp, cu, cu, N, N, causal=causal)

    def paged(q, k, v, causal):
        B, H, N, D = q.shape
        bs = args.block_size
        nblk = (N + bs - 1) // bs
        perm = torch.randperm(B * nblk, device="cuda").to(torch.int32)
        tables = perm.view(B, nblk)
        k_cache = torch.empty(B * nblk, bs, H, D, device="cuda", dtype=q.dtype)
        v_cache = torch.empty_like(k_cache)
        slots = (tables.long()[:, :, None] * bs + torch.arange(bs, device="cuda")).reshape(B, -1)[
            :, :N
        ]
        k_cache.view(-1, H, D)[slots.reshape(-1)] = k.transpose(1, 2).reshape(B * N, H, D)
        v_cache.view(-1, H, D)[slots.reshape(-1)] = v.transpose(1, 2).reshape(B * N, H, D)
        qp = q.transpose(1, 2).reshape(B * N, H, D).contiguous()
        cu = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device="cuda")
        lens = torch.full((B,), N, dtype=torch.int32, device="cuda")
        return lambda: ops.paged_attention(qp, k_cache, v_cache, tables, cu, lens, causal=causal)

    def sdpa(backend):
        def build(q, k, v, causal):
            def run():
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=causal
                    )

            return run

        return build

    backends = {"kv_paged flash": flash, f"kv_paged paged (bs {args.block_size})": paged}
    for name, b in sdpa_backends().items():
        backends[f"sdpa {name}"] = sdpa(b)
    return backends


def to_bhnd(out, B, N):
    """[B * N, H, D] -> [B, H, N, D]."""
    return out.view(B, N, *out.shape[1:]).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    parser.add_argument(
        "--tokens", type=int, default=16384, help="tokens in flight (batch * seqlen)"
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--out", default=None, help="results file (default benchmarks/results/prefill_<gpu>.md)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_prefill.py measures CUDA kernels and needs a CUDA device; none is visible.")

    backends = make_backends(args)
    mm = matmul_tflops(args.warmup, args.iters)
    dev = torch.cuda.get_device_name()
    lines = [
        f"# Prefill attention, {dev}",
        "",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`",
        f"dense bf16 matmul (8192^3): {mm:.0f} TFLOP/s",
        "",
        "| head_dim | seqlen | batch | causal | backend | ms | TFLOP/s | vs best SDPA | of matmul |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for D in (int(x) for x in args.head_dims.split(",")):
        H = max(1, 2048 // D)
        for N in (int(x) for x in args.seqlens.split(",")):
            B = max(1, args.tokens // N)
            for causal in (False, True):
                q, k, v = (
                    torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)
                )
                flops = 4 * B * H * N * N * D / (2 if causal else 1)
                ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                results = {}
                for name, build in backends.items():
                    try:
                        fn = build(q, k, v, causal)
                        out = fn()
                        out = to_bhnd(out, B, N) if name.startswith("kv_paged") else out
                        err = (out.float() - ref.float()).abs().max().item()
                        if not err < 5e-2:
                            raise RuntimeError(f"disagrees with SDPA: max abs error {err:.3g}")
                        results[name] = time_ms(fn, args.warmup, args.iters)
                    except RuntimeError as e:  # a backend that does not support the shape
                        print(f"{name} D={D} N={N} causal={causal}: skipped ({e})", file=sys.stderr)
                sdpa_ms = min(
                    (ms for n, ms in results.items() if n.startswith("sdpa")), default=None
                )
                for name, ms in results.items():
                    tf = flops / ms / 1e9
                    ratio = f"{sdpa_ms / ms:.2f}x" if sdpa_ms else "-"
                    lines.append(
                        f"| {D} | {N} | {B} | {causal} | {name} | {ms:.3f} | {tf:.0f} | {ratio} | {tf / mm:.0%} |"
                    )
                print(lines[-1], flush=True)
                del q, k, v, ref
                torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    path = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"prefill_{dev.replace(' ', '_')}.md"
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
