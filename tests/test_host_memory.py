"""host_memory: CPU KV pools on transparent huge pages where the system allows, ordinary tensors
elsewhere, the same values either way."""

from __future__ import annotations

import pathlib
import re
import sys

import pytest
import torch

from kv_paged.cache import KVCachePool
from kv_paged.host_memory import HUGE_PAGE, advise_huge_pages, full_on_huge_pages

THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    """The bracketed THP mode ("always", "madvise", "never"), None without THP."""
    if not sys.platform.startswith("linux") or not THP_MODE.exists():
        return None
    m = re.search(r"\[(\w+)\]", THP_MODE.read_text())
    return m[1] if m else None


def _advised_bytes(t: torch.Tensor) -> int:
    """Bytes of t's storage in mappings advised MADV_HUGEPAGE ("hg" in their VmFlags, from
    /proc/self/smaps; advising splits the allocation's mapping in three). The advice is what
    kv_paged controls; whether the kernel then backs it with huge pages depends on free contiguous
    memory at fault time (a fragmented machine falls back to 4 KiB pages), so that is not asserted:
    a check of AnonHugePages failed 1 run in 4 after a long test run here."""
    lo = t.untyped_storage().data_ptr()
    hi = lo + t.untyped_storage().nbytes()
    total, span = 0, None
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            start, end = int(m[1], 16), int(m[2], 16)
            span = (max(start, lo), min(end, hi)) if start < hi and end > lo else None
        elif span and line.startswith("VmFlags:") and "hg" in line.split()[1:]:
            total += span[1] - span[0]
    return total


needs_thp = pytest.mark.skipif(
    _thp_mode() not in ("always", "madvise"),
    reason=f"transparent huge pages unavailable here (mode {_thp_mode()})",
)


@needs_thp
def test_pool_advised_onto_huge_pages():
    pool = KVCachePool(
        num_layers=2,
        num_blocks=640,  # 40 MiB per pool: above glibc's largest mmap threshold (32 MiB), so
        # fresh pages however much this process allocated and freed before (smaller allocations
        # can reuse heap pages already touched, left to khugepaged)
        block_size=16,
        num_kv_heads=8,
        head_dim=128,
        dtype=torch.float32,
        device="cpu",
    )
    for t in pool.k_caches + pool.v_caches:
        nbytes = t.untyped_storage().nbytes()
        assert _advised_bytes(t) >= nbytes - 2 * HUGE_PAGE, "pool not advised onto huge pages"
        assert torch.isnan(t).all()


@needs_thp
def test_full_on_huge_pages_values():
    t = full_on_huge_pages((3, 7 << 20), 2.5, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert t.shape == (3, 7 << 20) and t.dtype == torch.bfloat16  # 42 MiB
    assert (t == 2.5).all()
    assert _advised_bytes(t) >= t.untyped_storage().nbytes() - 2 * HUGE_PAGE


def test_small_tensor_left_alone():
    t = torch.zeros(1000)
    assert advise_huge_pages(t) is False  # smaller than two huge pages: nothing to ask for
    t = full_on_huge_pages((7, 3), float("nan"), dtype=torch.float16, device=torch.device("cpu"))
    assert t.shape == (7, 3) and t.dtype == torch.float16 and torch.isnan(t).all()


def test_meta_device_is_plain_full():
    t = full_on_huge_pages((4 << 20,), 1.0, dtype=torch.float32, device=torch.device("meta"))
    assert t.device.type == "meta" and t.shape == (4 << 20,)
