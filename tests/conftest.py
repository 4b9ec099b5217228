"""Shared test helpers for the ops: devices, a seeded pairwise (covering) grid generator, and
builders of adversarial paged batches (shuffled block tables, NaN in every slot past a sequence's
length and in every unused block, a zero-length sequence, non-contiguous views)."""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import random
from dataclasses import dataclass

import pytest
import torch

import kv_paged  # noqa: F401  (loads the extension and the fake implementations)

if os.environ.get("KV_PAGED_SANITIZED_BM"):
    # tools/asan_python.sh: the block manager tests run against the ASan + UBSan build of the
    # binding and the C++ core (module _bm_sanitized) instead of kv_paged._C's.
    _spec = importlib.util.spec_from_file_location(
        "_bm_sanitized", os.environ["KV_PAGED_SANITIZED_BM"]
    )
    _sanitized = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_sanitized)
    kv_paged.BlockManager = kv_paged.block_manager.BlockManager = _sanitized.BlockManager

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pairwise_grid(axes: dict[str, list], seed: int = 0, candidates: int = 60) -> list[dict]:
    """A seeded covering design: every value of every axis meets every value of every other axis in
    at least one row. Greedy: each new row is the best of `candidates` random rows (most new pairs)."""
    rng = random.Random(seed)
    names = list(axes)
    uncovered = {
        (a, i, b, j)
        for a, b in itertools.combinations(names, 2)
        for i in range(len(axes[a]))
        for j in range(len(axes[b]))
    }
    rows: list[dict[str, int]] = []
    while uncovered:
        a, i, b, j = min(uncovered)  # seed each row with one uncovered pair so progress is certain
        best, best_gain = None, -1
        for _ in range(candidates):
            row = {n: rng.randrange(len(axes[n])) for n in names}
            row[a], row[b] = i, j
            gain = sum(
                (x, row[x], y, row[y]) in uncovered for x, y in itertools.combinations(names, 2)
            )
            if gain > best_gain:
                best, best_gain = row, gain
        rows.append(best)
        uncovered -= {(x, best[x], y, best[y]) for x, y in itertools.combinations(names, 2)}
    return [{n: axes[n][r[n]] for n in names} for r in rows]


def covers_all_pairs(axes: dict[str, list], rows: list[dict]) -> bool:
    for a, b in itertools.combinations(list(axes), 2):
        seen = {(repr(r[a]), repr(r[b])) for r in rows}
        if len(seen) < len(axes[a]) * len(axes[b]):
            return False
    return True


@pytest.fixture
def gen() -> torch.Generator:
    """Fresh random inputs each run from a logged seed (rerun with KV_PAGED_TEST_SEED=...)."""
    import os

    seed = int(os.environ.get("KV_PAGED_TEST_SEED", random.randrange(2**31)))
    print(f"KV_PAGED_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, gen, device="cpu", pad_last: int = 0) -> torch.Tensor:
    """Normal values; pad_last > 0 returns a non-contiguous view (head_dim still stride 1)."""
    full = torch.randn(*shape[:-1], shape[-1] + pad_last, generator=gen, dtype=torch.float32)
    return full.to(dtype).to(device)[..., : shape[-1]]


@dataclass
class PagedBatch:
    query: torch.Tensor  # [total_q, num_heads, head_dim] (a non-contiguous view)
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [B, max_blocks], -1 past each sequence's last block
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]
    seq_lens_kv: torch.Tensor  # int32 [B]

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        """The six leading arguments of ops.paged_attention, in its order."""
        return (
            self.query,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.cu_seqlens_q,
            self.seq_lens_kv,
        )


def make_paged_batch(
    seq_lens_kv: list[int],
    q_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
    *,
    kv_fused: bool = False,
    spare_blocks: int = 3,
) -> PagedBatch:
    """Pools with NaN everywhere but the sequences' positions, blocks handed out by a random
    permutation; kv_fused makes K and V strided views of one [num_blocks, 2, ...] tensor."""
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens_kv]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if kv_fused:
        pool = torch.full(
            (num_blocks, 2, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype
        )
        k_cache, v_cache = pool[:, 0], pool[:, 1]
    else:
        k_cache = torch.full(shape, float("nan"), dtype=dtype)
        v_cache = torch.full(shape, float("nan"), dtype=dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_per_seq + [0]) + 1
    block_tables = torch.full((len(seq_lens_kv), width), -1, dtype=torch.int32)
    for i, (n, nb) in enumerate(zip(seq_lens_kv, blocks_per_seq)):
        ids = [perm.pop() for _ in range(nb)]
        block_tables[i, :nb] = torch.tensor(ids, dtype=torch.int32)
        for pos in range(n):
            b, o = ids[pos // block_size], pos % block_size
            k_cache[b, o] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
            v_cache[b, o] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
    total_q = sum(q_lens)
    query = randn((total_q, num_heads, head_dim), dtype, gen, pad_last=8)
    cu = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32)
    return PagedBatch(
        query=query.to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        block_tables=block_tables.to(device),
        cu_seqlens_q=cu.to(device),
        seq_lens_kv=torch.tensor(seq_lens_kv, dtype=torch.int32).to(device),
    )


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().cpu().double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(
    out: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor
) -> None:
    """err(ours) <= 2 * err(torch's dense attention in the same dtype) + 1e-5, outputs finite."""
    assert torch.isfinite(out).all(), "output has non-finite values (NaN from an unused slot?)"
    ours, theirs = max_err(out, ref64), max_err(torch_same_dtype, ref64)
    assert ours <= 2 * theirs + 1e-5, f"max error {ours:.3g} vs torch same-dtype {theirs:.3g}"


# ---- bad-input case builders: each returns a mutation of an argument dict -------------------------


def set_arg(key, f):
    """A mutation that replaces argument `key` with f(args)."""

    def apply(args):
        args[key] = f(args)

    return apply


def write_arg(key, index, value):
    """A mutation that writes `value` at `index` of a copy of argument `key`."""

    def apply(args):
        args[key] = args[key].clone()
        args[key][index] = value

    return apply
