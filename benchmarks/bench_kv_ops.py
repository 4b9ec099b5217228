"""Bandwidth of the KV-cache writes on the GPU: reshape_and_cache (scatter num_tokens new K/V rows
into shuffled slots) and copy_blocks (copy-on-write pairs across every layer in one launch), next to
plain torch indexing doing the same work. Issue 6's goal: >= 80% of the device-to-device copy
bandwidth at MB sizes.

Method: bytes = what must move (each K/V row read once and written once: 2x the payload), over the
median of --iters CUDA-event-timed runs after --warmup runs; the ceiling is a 1 GiB
device-to-device tensor copy (read + write bytes) measured in the same run. Outputs are checked
against the torch backend before timing. Results go to benchmarks/results/ with device, versions,
date and command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cuda_timing
from cuda_timing import copy_gbps, time_ms  # noqa: E402


def bench_reshape_and_cache(args, ops):
    H, D, bs, T = args.kv_heads, args.head_dim, args.block_size, args.tokens
    nb = max(args.num_blocks, 2 * T // bs + 1)
    k_cache = torch.zeros(nb, bs, H, D, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(T, H, D, dtype=torch.bfloat16, device="cuda")
    value = torch.randn_like(key)
    slots = torch.randperm(nb * bs, device="cuda")[:T]

    def torch_impl():
        k_cache.view(-1, H, D)[slots] = key
        v_cache.view(-1, H, D)[slots] = value

    BACKENDS = {
        "torch indexing": torch_impl,
        "kv_paged": lambda: ops.reshape_and_cache(key, value, k_cache, v_cache, slots),
    }
    k_cache.zero_(), v_cache.zero_()
    torch_impl()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_cache.zero_(), v_cache.zero_()
    BACKENDS["kv_paged"]()
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), (
        "reshape_and_cache disagrees"
    )
    moved = 2 * 2 * key.numel() * key.element_size()  # K and V, read + write
    return f"reshape_and_cache T={T} H={H} D={D}", moved, BACKENDS


def bench_copy_blocks(args, ops):
    H, D, bs, L, n = args.kv_heads, args.head_dim, args.block_size, args.layers, args.pairs
    nb = max(args.num_blocks, 2 * n)
    k_caches = [torch.randn(nb, bs, H, D, dtype=torch.bfloat16, device="cuda") for _ in range(L)]
    v_caches = [torch.randn_like(k) for k in k_caches]
    perm = torch.randperm(nb, device="cuda")
    mapping = torch.stack([perm[:n], perm[n : 2 * n]], dim=1)
    src, dst = mapping[:, 0], mapping[:, 1]

    def torch_impl():
        for c in k_caches + v_caches:
            c[dst] = c[src]

    BACKENDS = {
        "torch indexing": torch_impl,
        "kv_paged": lambda: ops.copy_blocks(k_caches, v_caches, mapping),
    }
    before = [c.clone() for c in k_caches + v_caches]
    BACKENDS["kv_paged"]()
    for b, c in zip(before, k_caches + v_caches):
        b[dst] = b[src]
        assert torch.equal(b, c), "copy_blocks disagrees"
    del before
    moved = 2 * 2 * L * n * bs * H * D * 2  # K and V, read + write, bf16
    return f"copy_blocks layers={L} pairs={n} bs={bs} H={H} D={D}", moved, BACKENDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=20000)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kv_ops.py measures CUDA kernels and needs a CUDA device; none is visible.")
    import kv_paged  # noqa: F401
    from kv_paged import ops

    ceiling = copy_gbps(args.warmup, args.iters)
    dev = torch.cuda.get_device_name()
    lines = [
        f"# KV-cache ops, {dev}",
        "",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`",
        f"device-to-device copy (1 GiB, read + write): {ceiling:.0f} GB/s",
        "",
        "| op | MB moved | backend | us | GB/s | of copy bandwidth | vs torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for bench in (bench_reshape_and_cache, bench_copy_blocks):
        label, moved, backends = bench(args, ops)
        times = {name: time_ms(fn, args.warmup, args.iters) for name, fn in backends.items()}
        for name, ms in times.items():
            gbps = moved / ms / 1e6
            lines.append(
                f"| {label} | {moved / 1e6:.1f} | {name} | {ms * 1e3:.1f} | {gbps:.0f} | "
                f"{gbps / ceiling:.0%} | {times['torch indexing'] / ms:.2f}x |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    path = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"kv_ops_{dev.replace(' ', '_')}.md"
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
