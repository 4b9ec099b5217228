"""CPU timing helpers shared by the CPU benchmarks: wall-clock timings after warm-up (each run's, or
their median), and the processor's name for the results header (cuda_timing.py is the GPU
counterpart)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable


def time_runs(
    fn: Callable[..., object],
    warmup: int,
    iters: int,
    setup: Callable[[], object] | None = None,
) -> list[float]:
    """Seconds of each of iters runs of fn(), each timed by time.perf_counter, after warmup runs.
    setup: called untimed before every run (warm-up included); fn then gets its result."""
    times = []
    for i in range(warmup + iters):
        args = () if setup is None else (setup(),)
        t0 = time.perf_counter()
        fn(*args)
        t1 = time.perf_counter()
        if i >= warmup:
            times.append(t1 - t0)
    return times


def time_cpu(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median seconds of fn() over iters runs, each timed by time.perf_counter, after warmup runs."""
    return statistics.median(time_runs(fn, warmup, iters))


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
