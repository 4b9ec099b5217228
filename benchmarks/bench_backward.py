"""Training attention on the CPU (issue 13): forward + backward of kv_paged.ops.flash_attention (FA2
backward by recomputation) vs torch's scaled_dot_product_attention with its CPU flash and math
backends, causal, plus the peak extra memory of one forward + backward as the sequence grows.

Method. Time: q/k/v [batch, heads, N, head_dim] (packed [batch * N, heads, head_dim] with cu_seqlens
for kv_paged), one upstream gradient; each backend's output and gradients are first checked against
SDPA math (float32, or float64 on a small case); then --warmup untimed runs and the median of
--repeats timed runs of `out = f(q, k, v); out.backward(dout)`. Memory: each (backend, N) runs in a
fresh subprocess; after the inputs exist and a small warm-up, the kernel's peak-RSS counter is reset
(/proc/self/clear_refs, "5"), one forward + backward runs, and the peak RSS above the RSS before it is
the "extra" memory (it includes out and the three gradients, 4 * N * heads * head_dim floats).
Results (markdown + PNG) go to benchmarks/results/ with device, versions, date and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cpu_timing
from cpu_timing import cpu_name, time_cpu  # noqa: E402


def kv_paged_causal(q, k, v):
    """kv_paged's flash_attention on [B, H, N, D] leaves (packed rows, see leaves()), causal."""
    from kv_paged import ops

    B, H, N, D = q.shape
    cu = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device=q.device)
    packed = [x.transpose(1, 2).reshape(B * N, H, D) for x in (q, k, v)]
    out = ops.flash_attention(*packed, cu, cu, N, N, causal=True)
    return out.view(B, N, H, D).transpose(1, 2)


def sdpa_causal(backend):
    """torch SDPA restricted to one backend, causal, as f(q, k, v)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def make_backends():
    """BACKENDS: name -> f(q, k, v) on [B, H, N, D] leaves, returning [B, H, N, D] (causal)."""
    from torch.nn.attention import SDPBackend

    return {
        "kv_paged": kv_paged_causal,
        "sdpa_flash": sdpa_causal(SDPBackend.FLASH_ATTENTION),
        "sdpa_math": sdpa_causal(SDPBackend.MATH),
    }


def leaves(B, H, N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(4))
    # kv_paged takes [B * N, H, D] packed rows: give it (and everyone) that memory layout.
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    return q, k, v, dout


def fwd_bwd(fn, q, k, v, dout):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v)
    out.backward(dout)
    return out


def check_agreement(backends, D, dtype) -> float:
    """Max |difference| of out, dq, dk, dv vs SDPA math on [1, 2, 300, D]; raises if too large."""
    q, k, v, dout = leaves(1, 2, 300, D, dtype, seed=1)
    ref = [fwd_bwd(backends["sdpa_math"], q, k, v, dout).detach()] + [x.grad for x in (q, k, v)]
    worst = 0.0
    for name, fn in backends.items():
        got = [fwd_bwd(fn, q, k, v, dout).detach()] + [x.grad for x in (q, k, v)]
        err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref))
        if err > (2e-3 if dtype == torch.float32 else 5e-2):
            raise SystemExit(f"{name} disagrees with sdpa_math at head_dim {D}: max diff {err:.3g}")
        worst = max(worst, err)
    return worst


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(backend: str, N: int, args) -> None:
    """Subprocess body: prints {"extra_mib": ...} for one forward + backward."""
    torch.set_num_threads(args.threads)
    fn = make_backends()[backend]
    fwd_bwd(fn, *leaves(1, args.heads, 256, args.mem_head_dim, torch.float32))  # load code paths
    q, k, v, dout = leaves(args.batch, args.heads, N, args.mem_head_dim, torch.float32)
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    fwd_bwd(fn, q, k, v, dout)
    print(json.dumps({"extra_mib": (_rss_kib("VmHWM") - before) / 1024}))


def measure_memory(backend: str, N: int, args) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", backend, str(N)]
    cmd += ["--threads", str(args.threads), "--heads", str(args.heads), "--batch", str(args.batch)]
    cmd += ["--mem-head-dim", str(args.mem_head_dim)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["extra_mib"]


def plot(mem: dict, path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in mem.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length N (causal)")
    ax.set_ylabel("peak extra RSS of forward + backward (MiB)")
    ax.set_title(
        f"CPU attention training memory: batch {args.batch}, {args.heads} heads, "
        f"head_dim {args.mem_head_dim}, fp32",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--math-max-seq", type=int, default=4096, help="SDPA math is O(N^2) memory")
    ap.add_argument("--mem-seqs", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--mem-head-dim", type=int, default=64)
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "backward.md")
    )
    ap.add_argument("--memory-child", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), args)
        return
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    backends = make_backends()
    lines = []
    command = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    cpu = cpu_name()
    import kv_paged

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines.append(
        f"device: {cpu}, threads {args.threads}; torch {torch.__version__}; kv_paged "
        f"{getattr(kv_paged, '__version__', '?')}; {stamp}; batch {args.batch}, heads {args.heads}, "
        f"{args.dtype}, causal, median of {args.repeats} after {args.warmup} warm-up"
    )
    lines.append("")
    lines.append(
        "| head_dim | N | kv_paged ms | sdpa_flash ms | sdpa_math ms | kv_paged x flash | kv_paged x math |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for D in args.head_dims:
        diff = check_agreement(backends, D, dtype)
        print(f"head_dim {D}: agreement with sdpa_math, max diff {diff:.2g}", flush=True)
        for N in args.seqs:
            inputs = leaves(args.batch, args.heads, N, D, dtype)
            ms = {}
            for name, fn in backends.items():
                if name == "sdpa_math" and N > args.math_max_seq:
                    continue
                ms[name] = time_cpu(lambda: fwd_bwd(fn, *inputs), args.warmup, args.repeats) * 1e3
            speed = lambda other: f"{ms[other] / ms['kv_paged']:.2f}x" if other in ms else "-"  # noqa: E731
            cell = lambda name: f"{ms[name]:.1f}" if name in ms else "-"  # noqa: E731
            row = (
                f"| {D} | {N} | {cell('kv_paged')} | {cell('sdpa_flash')} | {cell('sdpa_math')} | "
                f"{speed('sdpa_flash')} | {speed('sdpa_math')} |"
            )
            print(row, flush=True)
            lines.append(row)
    mem = {name: {} for name in backends}
    if args.mem_seqs:
        lines += [
            "",
            f"Peak extra RSS of one forward + backward (MiB), head_dim {args.mem_head_dim}, float32:",
            "",
        ]
        lines.append("| N | " + " | ".join(backends) + " | kv_paged KiB per token |")
        lines.append("|---" * (len(backends) + 2) + "|")
        for N in args.mem_seqs:
            for name in backends:
                if name == "sdpa_math" and N > args.math_max_seq:
                    continue
                mem[name][N] = measure_memory(name, N, args)
            cells = [f"{mem[n][N]:.1f}" if N in mem[n] else "-" for n in backends]
            per_token = mem["kv_paged"][N] * 1024 / (N * args.batch)
            row = f"| {N} | " + " | ".join(cells) + f" | {per_token:.1f} |"
            print(row, flush=True)
            lines.append(row)
        png = os.path.splitext(args.out)[0] + "_memory.png"
        plot(mem, png, args)
        lines += ["", f"Plot: {os.path.basename(png)}"]
    lines += ["", f"Command: `{command}`"]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
