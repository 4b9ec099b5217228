"""CPU timing helpers shared by the CPU benchmarks: the median of wall-clock timings after warm-up,
and the processor's name for the results header (cuda_timing.py is the GPU counterpart)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable


def time_cpu(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median seconds of fn() over iters runs, each timed by time.perf_counter, after warmup runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
