"""Decode attention throughput: kv_paged.ops.paged_attention against its peers on the same work.

Method: for each (batch, context, q heads, kv heads) shape, build one paged K/V pool (block_size
tokens per block, blocks handed out by a random permutation), one decode query per sequence, and
give each backend the same K/V in its own native layout: BACKENDS maps a name to a setup function
that returns a zero-argument callable. Before timing, every backend's output is checked against the
first backend's (max abs diff reported). Timing: warm-up, then the median of --iters runs.
  cpu:  wall clock (time.perf_counter) around each call; torch's thread pool as configured. The
        copy bandwidth of a 1 GiB tensor (dst.copy_(src), torch's threads, bytes read + written per
        second) is measured again right before each shape, and each backend's achieved bandwidth
        (K + V read once, plus Q and O) is reported as a percentage of that shape's figure: the
        roof decode attention can reach, measured under the same load (a shared machine's load
        moves between shapes).
  cuda: CUDA events around each call, with the L2 cache flushed (a 256 MiB buffer overwritten)
        before every run; the device-to-device copy bandwidth of a 1 GiB tensor is measured in the
        same run and each backend's achieved bandwidth (K + V read once, plus Q and O) is reported
        as a percentage of it.
Throughput = sequences (decode tokens) per second; "x first" is the ratio to the first backend.
The CUDA path (issue 6: bf16, block_size 16, FlexAttention with a paged block mask as a peer) was
written without access to a GPU and has not been run yet.

  python benchmarks/bench_attention.py --device cpu [--dtypes float32,bfloat16] [--out FILE]
  python benchmarks/bench_attention.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cpu_timing
from cpu_timing import cpu_name, time_cpu  # noqa: E402

import kv_paged  # noqa: E402
from kv_paged import ops  # noqa: E402
from kv_paged.host_memory import full_on_huge_pages  # noqa: E402

CPU_SHAPES = [  # (batch, context, q heads, kv heads)
    (16, 512, 32, 8),
    (16, 4096, 32, 8),
    (64, 512, 32, 8),
    (64, 4096, 32, 8),
    (16, 512, 32, 32),
    (16, 4096, 32, 32),
    (64, 512, 32, 32),
    (64, 1024, 32, 32),
]
CUDA_SHAPES = [(64, 1024, 32, 32), (16, 4096, 32, 8), (64, 8192, 32, 8), (1, 65536, 32, 8)]


@dataclass
class Work:
    """One decode step. query: [B, H, D]; k_cache/v_cache: [num_blocks, block_size, KVH, D];
    block_tables: int32 [B, L / block_size]; cu_seqlens_q: int32 [B + 1]; seq_lens_kv: int32 [B]."""

    query: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens_kv: torch.Tensor
    batch: int
    context: int

    def contiguous_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same K/V as [B, KVH, L, D] contiguous tensors."""
        B, L = self.batch, self.context
        idx = self.block_tables.long()
        out = []
        for cache in (self.k_cache, self.v_cache):
            dense = cache[idx].reshape(B, L, *cache.shape[2:]).transpose(1, 2)
            out.append(host_tensor(dense.shape, cache.dtype, cache.device).copy_(dense))
        return out[0], out[1]

    def kv_bytes(self) -> int:
        return (
            2
            * self.batch
            * self.context
            * self.k_cache.shape[2]
            * self.k_cache.shape[3]
            * self.k_cache.element_size()
        )


def host_tensor(shape, dtype, device) -> torch.Tensor:
    """An uninitialised tensor; on the CPU on transparent huge pages where the system allows, so
    every backend (and the copy roof) reads memory mapped the same way as kv_paged's pools."""
    return full_on_huge_pages(tuple(shape), 0.0, dtype=dtype, device=torch.device(device))


def make_work(batch, context, heads, kv_heads, head_dim, block_size, dtype, device, gen) -> Work:
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, kv_heads, head_dim)
    # CPU pools on huge pages, as KVCachePool allocates them (kv_paged/host_memory.py).
    k_cache = host_tensor(shape, dtype, device)
    v_cache = host_tensor(shape, dtype, device)
    k_cache.copy_(torch.randn(shape, generator=gen, dtype=torch.float32))
    v_cache.copy_(torch.randn(shape, generator=gen, dtype=torch.float32))
    perm = torch.randperm(num_blocks, generator=gen, dtype=torch.int32)
    return Work(
        query=torch.randn(batch, heads, head_dim, generator=gen).to(dtype).to(device),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=perm.view(batch, blocks_per_seq).to(device),
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens_kv=torch.full((batch,), context, dtype=torch.int32, device=device),
        batch=batch,
        context=context,
    )


# ---- backends: setup(work) -> callable returning [B, H, D] --------------------------------------


def setup_kv_paged(w: Work) -> Callable[[], torch.Tensor]:
    return lambda: ops.paged_attention(
        w.query, w.k_cache, w.v_cache, w.block_tables, w.cu_seqlens_q, w.seq_lens_kv
    )


def setup_sdpa(w: Work) -> Callable[[], torch.Tensor]:
    k, v = w.contiguous_kv()
    q = w.query.unsqueeze(2)  # [B, H, 1, D]
    gqa = q.shape[1] != k.shape[1]
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa).squeeze(2)


def setup_flex_paged(w: Work) -> Callable[[], torch.Tensor]:
    """torch's FlexAttention reading a physical pool [1, KVH, num_blocks * block_size, D] through a
    paged block mask (torch.nn.attention.experimental._paged_attention.PagedAttention)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    num_blocks, block_size, kv_heads, head_dim = w.k_cache.shape
    B, L, dev = w.batch, w.context, w.k_cache.device
    paged = PagedAttention(num_blocks, block_size, B, device=str(dev))
    tables = w.block_tables.long()
    paged.page_table[:, : tables.shape[1]] = tables
    paged.physical_to_logical.scatter_(
        1, tables, torch.arange(tables.shape[1], device=dev).expand(B, -1).contiguous()
    )
    paged.capacity[:] = L
    paged.empty_pages = []

    def visible(b, h, q_idx, kv_idx):
        return kv_idx < L

    logical = create_block_mask(visible, B, None, 1, L, device=dev, BLOCK_SIZE=(128, block_size))
    mask = paged.convert_logical_block_mask(logical)
    k = (
        w.k_cache.permute(2, 0, 1, 3)
        .reshape(1, kv_heads, num_blocks * block_size, head_dim)
        .contiguous()
    )
    v = (
        w.v_cache.permute(2, 0, 1, 3)
        .reshape(1, kv_heads, num_blocks * block_size, head_dim)
        .contiguous()
    )
    q = w.query.unsqueeze(2)
    gqa = q.shape[1] != kv_heads
    flex = torch.compile(flex_attention, fullgraph=True)
    return lambda: flex(q, k, v, block_mask=mask, enable_gqa=gqa).squeeze(2)


BACKENDS: dict[str, dict] = {
    "kv_paged": {"setup": setup_kv_paged, "devices": ("cpu", "cuda")},
    "torch_sdpa": {"setup": setup_sdpa, "devices": ("cpu", "cuda")},
    "flex_paged": {"setup": setup_flex_paged, "devices": ("cuda",)},
}


# ---- timing -------------------------------------------------------------------------------------


def time_cuda(fn, warmup: int, iters: int, flush: torch.Tensor) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()  # evict K/V from L2
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth_cpu(warmup: int, iters: int) -> float:
    """Bytes read + written per second by a 1 GiB host copy on torch's threads (far beyond any
    cache, so this is the memory system's throughput for a streaming read + write)."""
    src = host_tensor((1 << 28,), torch.float32, "cpu").fill_(1.0)
    dst = host_tensor((1 << 28,), torch.float32, "cpu")
    seconds = time_cpu(lambda: dst.copy_(src), warmup, max(iters, 5))
    return 2 * src.numel() * src.element_size() / seconds


def matmul_peak_cpu(warmup: int, iters: int) -> float:
    """fp32 FLOP/s of a 2048^3 torch.mm on torch's threads: the machine's practical FMA roof."""
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    return 2 * 2048**3 / time_cpu(lambda: torch.mm(a, b), warmup, max(iters, 5))


def copy_bandwidth_cuda(flush: torch.Tensor, warmup: int, iters: int) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_cuda(lambda: dst.copy_(src), warmup, iters, flush)
    return 2 * src.numel() / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtypes",
        default=None,
        help="comma list; default float32,bfloat16 on cpu, bfloat16 on cuda",
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument(
        "--shapes",
        default=None,
        help="batch:context:heads:kv_heads,... (default: the device's list)",
    )
    parser.add_argument(
        "--max-gb", type=float, default=1.1, help="cpu: skip shapes whose K+V exceed this"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=None, help="default 5 on cpu, 50 on cuda")
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    args = parser.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    dtypes = [
        getattr(torch, d)
        for d in (args.dtypes or ("float32,bfloat16" if dev == "cpu" else "bfloat16")).split(",")
    ]
    shapes = CPU_SHAPES if dev == "cpu" else CUDA_SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")]
    iters = args.iters or (5 if dev == "cpu" else 50)
    backends = {n: b for n, b in BACKENDS.items() if dev in b["devices"]}
    gen = torch.Generator().manual_seed(0)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev) if dev == "cuda" else None
    copy_bw = copy_bandwidth_cuda(flush, args.warmup, iters) if dev == "cuda" else None
    copy_all: list[float] = []  # cpu: one figure per shape

    lines = []
    peak = None  # cpu: the matmul peak, measured again before each shape like the copy roof
    peak_all: list[float] = []
    roof_col = " | roof: bound, kv_paged % of it" if dev == "cpu" else ""
    header = f"| dtype | batch | context | heads q/kv | {' | '.join(f'{n} tok/s (GB/s)' for n in backends)} | kv_paged x {list(backends)[1]}{roof_col} | max diff |"
    lines.append(header)
    lines.append("|" + "---|" * (header.count("|") - 1))
    for dtype in dtypes:
        for batch, context, heads, kv_heads in shapes:
            w = make_work(
                batch, context, heads, kv_heads, args.head_dim, args.block_size, dtype, dev, gen
            )
            if dev == "cpu" and w.kv_bytes() > args.max_gb * 1e9:
                lines.append(
                    f"| {str(dtype)[6:]} | {batch} | {context} | {heads}/{kv_heads} | skipped: K+V {w.kv_bytes() / 1e9:.1f} GB > --max-gb |"
                )
                continue
            fns = {n: b["setup"](w) for n, b in backends.items()}
            if dev == "cpu":
                copy_bw = copy_bandwidth_cpu(args.warmup, iters)
                copy_all.append(copy_bw)
                peak = matmul_peak_cpu(args.warmup, iters)
                peak_all.append(peak)
            first = None
            diffs = []
            for n, fn in fns.items():
                out = fn().float()
                if first is None:
                    first = out
                else:
                    diffs.append((out - first).abs().max().item())
            moved = w.kv_bytes() + 2 * w.query.numel() * w.query.element_size()
            cells, secs = [], {}
            for n, fn in fns.items():
                s = (
                    time_cpu(fn, args.warmup, iters)
                    if dev == "cpu"
                    else time_cuda(fn, args.warmup, iters, flush)
                )
                secs[n] = s
                gbs = moved / s / 1e9
                pct = f", {100 * moved / s / copy_bw:.0f}% copy" if copy_bw else ""
                cells.append(f"{batch / s:,.0f} ({gbs:.1f}{pct})")
            names = list(fns)
            ratio = secs[names[1]] / secs[names[0]]
            roof = ""
            if peak:
                # The faster of two floors: moving the bytes at copy bandwidth, or the FLOPs (QK^T
                # and PV: 4 per query head, key and head_dim element) at the matmul peak.
                flops = 4 * batch * heads * context * args.head_dim
                t_copy, t_fma = moved / copy_bw, flops / peak
                bound = "copy" if t_copy >= t_fma else "FMA"
                roof = f" | {bound} {100 * max(t_copy, t_fma) / secs[names[0]]:.0f}%"
            line = (
                f"| {str(dtype)[6:]} | {batch} | {context} | {heads}/{kv_heads} | {' | '.join(cells)} | "
                f"{ratio:.2f}x{roof} | {max(diffs):.1e} |"
            )
            lines.append(line)
            print(line, flush=True)
            del fns, w
    info = (
        f"device: {torch.cuda.get_device_name() if dev == 'cuda' else cpu_name()}"
        f", threads {torch.get_num_threads()}; torch {torch.__version__}"
        f"{', CUDA ' + str(torch.version.cuda) if dev == 'cuda' else ''}; kv_paged {kv_paged.__version__}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; head_dim {args.head_dim}, "
        f"block_size {args.block_size}, median of {iters}"
    )
    if dev == "cuda":
        info += f"; measured device-to-device copy bandwidth {copy_bw / 1e9:.0f} GB/s"
    else:
        info += (
            f"; measured host copy bandwidth {min(copy_all, default=0) / 1e9:.1f}-"
            f"{max(copy_all, default=0) / 1e9:.1f} GB/s across shapes (read + write, "
            f"{torch.get_num_threads()} threads; each row's % uses the figure measured before it)"
        )
        info += (
            f"; measured fp32 matmul peak {min(peak_all, default=0) / 1e9:.0f}-"
            f"{max(peak_all, default=0) / 1e9:.0f} GFLOP/s across shapes (2048^3 torch.mm, "
            "measured before each shape like the copy roof); "
            f"kv_paged CPU kernels: {kv_paged._C.cpu_isa()}"
        )
    text = info + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
