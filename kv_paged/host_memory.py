"""Host tensors on transparent huge pages, for the CPU KV pools.

A decode step reads every block of every sequence once, scattered through the pool by the block
table; with 4 KiB pages each block of a large pool costs TLB misses and page walks that the CPU
kernels then wait on (measured: fp32 decode attention ~1.3x faster over a 268 MB pool on 2 MiB
pages, benchmarks/results/attention_cpu.md). Linux backs an anonymous range with huge pages when it
is advised MADV_HUGEPAGE before its pages are first touched (or later, by khugepaged) and the
system's THP mode is "madvise" or "always". torch's CPU allocator does that itself only under
THP_MEM_ALLOC_ENABLE=1, for every allocation; here only the pools ask.

Elsewhere (not Linux, THP "never", a libc without madvise) the tensor is an ordinary one. An
allocation below glibc's mmap threshold (dynamic, at most 32 MiB) may reuse heap pages the process
already touched; those stay 4 KiB until khugepaged collapses them (pools that size fit the TLB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

HUGE_PAGE = 2 << 20  # bytes; x86-64 and arm64 (4 KiB base pages) PMD size
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_MIN_BYTES = 2 * HUGE_PAGE  # smaller tensors cannot hold a whole aligned huge page worth asking for


@functools.cache
def _madvise():
    """libc's madvise(addr, length, advice) -> int, or None where there is none to call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Asks the kernel to back the whole 2 MiB-aligned pages inside t's storage with huge pages.
    Returns whether the advice was given (False: not a CPU tensor, too small, or no madvise here).
    Untouched pages then fault in as huge pages; touched ones are left to khugepaged."""
    madvise = _madvise()
    nbytes = t.untyped_storage().nbytes()
    if madvise is None or t.device.type != "cpu" or nbytes < _MIN_BYTES:
        return False
    start = t.untyped_storage().data_ptr()
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    return hi > lo and madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0


def full_on_huge_pages(
    shape: tuple[int, ...], value: float, *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """torch.full(shape, value) whose storage is advised onto huge pages before it is first
    written (CPU); on other devices just torch.full."""
    if torch.device(device).type != "cpu":
        return torch.full(shape, value, dtype=dtype, device=device)
    t = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(t)
    return t.fill_(value)
