"""Copy-on-write with real KV tensors: a prompt is prefilled into paged pools, forked into
children (parallel sampling), and every sequence then decodes its own tokens. The block manager's
copy pairs are applied with copy_blocks before each step's writes (reshape_and_cache); afterwards
every sequence's gathered K/V must equal its own dense history exactly, so an append that leaked
into a sibling's (or the parent's) cached data fails. Slots no sequence owns hold NaN.

BACKENDS: "torch" is an obviously-correct reference of the two cache ops written here;
"kv_paged.ops" runs the extension's ops (skipped, loudly, until the ops branch provides them).
"""

from __future__ import annotations

import pytest
import torch

from kv_paged import BlockManager

NUM_KV_HEADS, HEAD_DIM = 2, 8
BLOCK_SIZES = [1, 4, 5]


def torch_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping):
    # key, value: [T, H, D]; k_cache, v_cache: [num_blocks, block_size, H, D];
    # slot_mapping: int64 [T], -1 skips the token
    keep = slot_mapping >= 0
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping[keep]] = key[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping[keep]] = value[keep]


def torch_copy_blocks(k_caches, v_caches, block_mapping):
    # block_mapping: int64 [n, 2] of (src, dst), applied in order
    for src, dst in block_mapping.tolist():
        for cache in (*k_caches, *v_caches):
            cache[dst] = cache[src]


def _ops_backend():
    try:
        from kv_paged import ops
    except ImportError as e:
        pytest.skip(f"kv_paged.ops not available yet: {e}")
    return ops.reshape_and_cache, ops.copy_blocks


BACKENDS = {
    "torch": lambda: (torch_reshape_and_cache, torch_copy_blocks),
    "kv_paged.ops": _ops_backend,
}


def kv_for(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh random K and V rows, each [n, H, D]."""
    k = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float32)
    v = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float32)
    return k, v


def gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return cache.view(-1, *cache.shape[2:])[slots]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_children", [1, 3])
def test_fork_then_decode_never_changes_a_siblings_kv(backend, block_size, num_children):
    reshape_and_cache, copy_blocks = BACKENDS[backend]()
    gen = torch.Generator().manual_seed(1000 * block_size + num_children)
    num_blocks = 64
    k_cache = torch.full((num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    bm = BlockManager(num_blocks, block_size)

    prompt = torch.randint(
        0, 100, (2 * block_size + 2,), generator=gen
    ).tolist()  # partial last block
    assert bm.allocate(0, prompt) == 0
    k, v = kv_for(len(prompt), gen)
    reshape_and_cache(k, v, k_cache, v_cache, bm.slot_mapping(0, 0, len(prompt)))
    bm.mark_computed([0], [len(prompt)])
    dense = {0: (k.clone(), v.clone())}  # seq -> its own K/V history [len, H, D]
    for child in range(1, num_children + 1):
        bm.fork(0, child)
        dense[child] = (k.clone(), v.clone())
    assert all(bm.ref_count(b) == num_children + 1 for b in bm.block_table(0))

    seq_ids = list(range(num_children + 1))
    for step in range(2 * block_size + 1):
        tokens = torch.randint(0, 100, (len(seq_ids),), generator=gen).tolist()
        slots = bm.append_slots(seq_ids, tokens)
        copies = bm.take_copies()
        if copies.numel():
            copy_blocks([k_cache], [v_cache], copies)
        k_new, v_new = kv_for(len(seq_ids), gen)
        reshape_and_cache(k_new, v_new, k_cache, v_cache, slots)
        for i, sid in enumerate(seq_ids):
            dk, dv = dense[sid]
            dense[sid] = (torch.cat([dk, k_new[i : i + 1]]), torch.cat([dv, v_new[i : i + 1]]))
        for sid in seq_ids:
            sm = bm.slot_mapping(sid, 0, bm.seq_len(sid))
            assert torch.equal(gather(k_cache, sm), dense[sid][0]), (
                f"seq {sid} K corrupted at step {step}"
            )
            assert torch.equal(gather(v_cache, sm), dense[sid][1]), (
                f"seq {sid} V corrupted at step {step}"
            )

    # Only the shared prompt blocks stay shared; every sequence wrote its own tail.
    full_prompt_blocks = len(prompt) // block_size
    for sid in seq_ids:
        table = bm.block_table(sid)
        assert table[:full_prompt_blocks] == bm.block_table(0)[:full_prompt_blocks]
    tails = [tuple(bm.block_table(s)[full_prompt_blocks:]) for s in seq_ids]
    assert len({b for t in tails for b in t}) == sum(len(t) for t in tails), "tail blocks shared"
    expected_copies = num_children if len(prompt) % block_size else 0
    assert bm.stats()["cow_copies"] == expected_copies
    # Slots no sequence owns were never written.
    owned = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for sid in seq_ids:
        owned[bm.slot_mapping(sid, 0, bm.seq_len(sid))] = True
    assert torch.isnan(k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[~owned]).all()
