"""CUDA timing helpers shared by the GPU benchmarks: median of CUDA-event timings after warm-up, and
the device-to-device copy bandwidth that bandwidth figures are reported against."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over iters runs, each bracketed by CUDA events, after warmup runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_gbps(warmup: int, iters: int) -> float:
    """Device-to-device copy bandwidth of a 1 GiB tensor, counting bytes read plus bytes written."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup, iters)
    return 2 * n / ms / 1e6
