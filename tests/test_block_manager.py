"""kv_paged.BlockManager through the Python API: the contract (prefix hits, eviction, fork and
copy-on-write), tensor outputs of the batched hot path, every error leaving the state exactly
unchanged, and a seeded random-operation test checking the allocator invariants after every step.
Copy-on-write with real KV tensors lives in test_block_manager_cow.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from kv_paged import BlockManager

SEEDS = [0, 1, 2]
BLOCK_SIZES = [1, 3, 16]


def snapshot(bm: BlockManager, seq_ids: list[int]) -> tuple:
    """Everything observable: a failed call must leave it identical."""
    tables = tuple(tuple(bm.block_table(s)) if bm.has_seq(s) else None for s in seq_ids)
    lens = tuple(bm.seq_len(s) if bm.has_seq(s) else None for s in seq_ids)
    refs = tuple(bm.ref_count(b) for b in range(bm.num_blocks))
    cached = tuple(bm.is_cached(b) for b in range(bm.num_blocks))
    return (
        tables,
        lens,
        refs,
        cached,
        tuple(bm.evictable_blocks()),
        tuple(sorted(bm.stats().items())),
    )


def test_prefix_hit_shares_written_blocks_and_leaves_the_last_token():
    bm = BlockManager(32, 4)
    prompt = list(range(10))
    assert bm.allocate(1, prompt) == 0
    assert bm.allocate(2, prompt) == 0  # not computed yet: nothing to hit
    bm.mark_computed([1], [10])
    assert bm.allocate(3, prompt) == 8
    t1, t3 = bm.block_table(1), bm.block_table(3)
    assert t3[:2] == t1[:2] and t3[2] != t1[2]
    assert [bm.ref_count(b) for b in t1] == [2, 2, 1]
    assert bm.allocate(4, prompt[:8]) == 4  # block-aligned, fully cached: last block recomputed
    assert bm.allocate(5, prompt, extra_key="lora-7") == 0
    assert bm.allocate(6, torch.tensor(prompt)) == 8  # a 1-D integer tensor works too
    s = bm.stats()
    assert s["prefix_queried_tokens"] == 10 * 5 + 8
    assert s["prefix_hit_tokens"] == 8 + 4 + 8
    bm.check_invariants()


def test_chat_next_turn_reuses_the_decoded_reply():
    bm = BlockManager(32, 4)
    turn1 = [5, 6, 7, 8, 9, 10]
    bm.allocate(1, turn1)
    bm.mark_computed([1], [len(turn1)])
    reply = [50, 51, 52, 53, 54]
    for t in reply:
        bm.append_slot(1, t)
    table = bm.block_table(1)
    bm.free(1)
    turn2 = turn1 + reply + [70, 71, 72]
    assert bm.allocate(2, turn2) == 8  # blocks [5..8] and [9, 10, 50, 51] filled during decode
    assert bm.block_table(2)[:2] == table[:2]


def test_eviction_is_lru_tail_first_and_a_hit_revives():
    bm = BlockManager(6, 2)
    bm.allocate(1, [1, 2, 3, 4, 5])
    bm.mark_computed([1], [5])
    bm.free(1)
    assert bm.evictable_blocks() == [1, 0]
    assert bm.num_free_blocks == 6
    assert bm.allocate(2, [1, 2, 3, 4, 0]) == 4
    assert bm.evictable_blocks() == []
    bm.free(2)
    bm.allocate(3, list(range(100, 109)))  # 4 free blocks, then evicts 1 (tail) before 0
    assert bm.stats()["evictions"] == 1
    assert not bm.is_cached(1) and bm.is_cached(0)


def test_fork_and_copy_on_write_pairs():
    bm = BlockManager(8, 4)
    bm.allocate(1, [1, 2, 3, 4, 5, 6])
    bm.fork(1, 2)
    bm.fork(1, 3)
    assert bm.block_table(2) == bm.block_table(1) == [0, 1]
    assert bm.ref_count(1) == 3
    slots = bm.append_slots([1, 2, 3], [7, 8, 9])
    assert slots.dtype == torch.int64 and slots.shape == (3,)
    assert slots.tolist() == [2 * 4 + 2, 3 * 4 + 2, 1 * 4 + 2]
    copies = bm.take_copies()
    assert copies.dtype == torch.int64 and copies.tolist() == [[1, 2], [1, 3]]
    assert bm.take_copies().shape == (0, 2)
    assert bm.stats()["cow_copies"] == 2


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_batched_outputs_match_the_per_sequence_api(block_size):
    rng = random.Random(block_size)
    bm = BlockManager(256, block_size)
    ids = [11, 3, 7, 42]
    for i in ids:
        bm.allocate(i, [rng.randrange(1000) for _ in range(rng.randrange(1, 40))])
    bt, lens = bm.block_tables(ids), bm.seq_lens(ids)
    assert bt.dtype == torch.int32 and lens.dtype == torch.int32
    assert bt.shape == (4, max(len(bm.block_table(i)) for i in ids))
    for row, i in enumerate(ids):
        table = bm.block_table(i)
        assert bt[row].tolist() == table + [-1] * (bt.shape[1] - len(table))
        assert lens[row] == bm.seq_len(i)
        sm = bm.slot_mapping(i, 0, bm.seq_len(i))
        want = [table[p // block_size] * block_size + p % block_size for p in range(bm.seq_len(i))]
        assert sm.dtype == torch.int64 and sm.tolist() == want
    assert bm.block_tables(ids, max_num_blocks=64).shape == (4, 64)
    assert bm.block_tables([]).shape == (0, 0)
    slots, bt2, lens2 = bm.decode_step(ids, [1, 2, 3, 4])
    assert torch.equal(bt2, bm.block_tables(ids)) and torch.equal(lens2, lens + 1)
    assert slots.tolist() == [
        bm.slot_mapping(i, bm.seq_len(i) - 1, bm.seq_len(i)).item() for i in ids
    ]


BAD_CALLS = [
    # (description, call, exception)
    ("duplicate seq_id", lambda bm: bm.allocate(1, [1, 2]), ValueError),
    ("empty prompt", lambda bm: bm.allocate(9, []), ValueError),
    ("float token", lambda bm: bm.allocate(9, [1, 2.0]), ValueError),
    ("bool token", lambda bm: bm.allocate(9, [1, True]), ValueError),
    ("str tokens", lambda bm: bm.allocate(9, "hello"), ValueError),
    ("None tokens", lambda bm: bm.allocate(9, None), ValueError),
    ("float tensor", lambda bm: bm.allocate(9, torch.ones(3)), ValueError),
    ("2-D tensor", lambda bm: bm.allocate(9, torch.ones(2, 2, dtype=torch.long)), ValueError),
    ("negative token", lambda bm: bm.allocate(9, [1, -1]), ValueError),
    ("token >= 2**31", lambda bm: bm.allocate(9, [2**31]), ValueError),
    ("extra_key type", lambda bm: bm.allocate(9, [1], extra_key=3), ValueError),
    ("out of blocks", lambda bm: bm.allocate(9, list(range(200))), RuntimeError),
    (
        "out of blocks after hits",
        lambda bm: bm.allocate(9, list(range(8)) + [0] * 60),
        RuntimeError,
    ),
    ("unknown seq in batch", lambda bm: bm.append_slots([1, 99], [1, 1]), ValueError),
    ("duplicate seq in batch", lambda bm: bm.append_slots([1, 1], [1, 1]), ValueError),
    ("length mismatch", lambda bm: bm.append_slots([1, 2], [1]), ValueError),
    ("float token in batch", lambda bm: bm.append_slots([1, 2], [1, 0.5]), ValueError),
    ("bool token in batch", lambda bm: bm.append_slots([1, 2], [1, False]), ValueError),
    ("bad token in batch", lambda bm: bm.append_slots([1, 2], [1, -5]), ValueError),
    ("str seq ids", lambda bm: bm.append_slots("12", [1, 1]), ValueError),
    ("unknown seq", lambda bm: bm.append_slot(99, 1), ValueError),
    ("float seq id", lambda bm: bm.append_slot(1.0, 1), ValueError),
    ("mark beyond length", lambda bm: bm.mark_computed([2], [100]), ValueError),
    ("mark negative", lambda bm: bm.mark_computed([2], [-1]), ValueError),
    ("mark unknown", lambda bm: bm.mark_computed([2, 99], [1, 1]), ValueError),
    ("mark mismatch", lambda bm: bm.mark_computed([2], [1, 1]), ValueError),
    ("fork unknown parent", lambda bm: bm.fork(99, 100), ValueError),
    ("fork existing child", lambda bm: bm.fork(1, 2), ValueError),
    ("free unknown", lambda bm: bm.free(99), ValueError),
    ("slot range", lambda bm: bm.slot_mapping(1, 3, 2), ValueError),
    ("slot range end", lambda bm: bm.slot_mapping(1, 0, 100), ValueError),
    ("block_tables unknown", lambda bm: bm.block_tables([1, 99]), ValueError),
    ("seq_lens unknown", lambda bm: bm.seq_lens([99]), ValueError),
    ("decode_step unknown", lambda bm: bm.decode_step([1, 99], [1, 1]), ValueError),
    ("can_allocate 0", lambda bm: bm.can_allocate(0), ValueError),
    ("ref_count range", lambda bm: bm.ref_count(-1), ValueError),
    ("ref_count range high", lambda bm: bm.ref_count(16), ValueError),
]


@pytest.mark.parametrize("desc,call,exc", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_calls_raise_clearly_and_change_nothing(desc, call, exc):
    bm = BlockManager(16, 4)
    bm.allocate(1, list(range(8)))
    bm.mark_computed([1], [8])
    bm.allocate(2, [9, 9, 9])
    bm.fork(2, 3)
    before = snapshot(bm, [1, 2, 3, 9, 99, 100])
    with pytest.raises(exc) as info:
        call(bm)
    assert str(info.value).strip(), "error message must say what is wrong"
    assert snapshot(bm, [1, 2, 3, 9, 99, 100]) == before
    bm.check_invariants()


def test_batched_append_out_of_blocks_is_all_or_nothing():
    bm = BlockManager(3, 2)
    bm.allocate(1, [1, 2])
    bm.allocate(2, [3, 4])  # one free block left, both sequences need one
    assert bm.can_append(1) and bm.can_append(2)
    before = snapshot(bm, [1, 2])
    with pytest.raises(RuntimeError, match="needs 2 new blocks but only 1"):
        bm.append_slots([1, 2], [5, 6])
    assert snapshot(bm, [1, 2]) == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_constructor_rejects_bad_sizes(bad):
    with pytest.raises(ValueError):
        BlockManager(bad, 4)
    with pytest.raises(ValueError):
        BlockManager(4, bad)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES[:2])
def test_random_operations_keep_the_invariants(seed, block_size):
    """Seeded random allocate / append / fork / free / mark_computed with a simulated pool: each
    position of each live sequence must read back its own token (a wrong prefix hit or a missed
    copy-on-write fails), ref counts equal the live tables holding each block, and every block is
    free, evictable or in use."""
    rng = random.Random(seed)
    num_blocks = 24
    bm = BlockManager(num_blocks, block_size)
    pool = [None] * (num_blocks * block_size)  # token id whose KV each slot holds
    seqs: dict[int, list[int]] = {}
    history: list[list[int]] = []
    next_id = 0
    for _step in range(150):
        writes = []  # (slot, token), done by the "forward" after the copies
        for _ in range(rng.randint(0, 2)):
            op = rng.randrange(10) if seqs else 0
            if op < 4:
                prompt = []
                if history and rng.random() < 0.6:
                    past = rng.choice(history)
                    prompt = past[: rng.randint(1, len(past))]
                prompt += [
                    rng.randrange(3) for _ in range(rng.randint(0 if prompt else 1, 3 * block_size))
                ]
                before = snapshot(bm, list(seqs))
                try:
                    cached = bm.allocate(next_id, prompt)
                except RuntimeError:
                    assert snapshot(bm, list(seqs)) == before
                    continue
                assert cached % block_size == 0 and cached < len(prompt)
                slots = bm.slot_mapping(next_id, 0, len(prompt)).tolist()
                writes += [(slots[p], prompt[p]) for p in range(cached, len(prompt))]
                seqs[next_id] = list(prompt)
                history.append(list(prompt))
                next_id += 1
            elif op < 6:
                sid = rng.choice(list(seqs))
                bm.free(sid)
                history.append(seqs.pop(sid))
            elif op < 8:
                sid = rng.choice(list(seqs))
                pending = {s for s, _ in writes}
                if pending.intersection(bm.slot_mapping(sid, 0, bm.seq_len(sid)).tolist()):
                    continue  # fork after the prompt is computed, as engines do
                bm.fork(sid, next_id)
                seqs[next_id] = list(seqs[sid])
                next_id += 1
            else:
                sid = rng.choice(list(seqs))
                pending = {s for s, _ in writes}
                if not pending.intersection(bm.slot_mapping(sid, 0, bm.seq_len(sid)).tolist()):
                    bm.mark_computed([sid], [rng.randint(0, bm.seq_len(sid))])
        pending = {s for s, _ in writes}
        ready = [
            s
            for s in seqs
            if not pending.intersection(bm.slot_mapping(s, 0, bm.seq_len(s)).tolist())
        ]
        batch = [s for s in ready if rng.random() < 0.7]
        tokens = [rng.randrange(3) for _ in batch]
        before = snapshot(bm, list(seqs))
        try:
            slots = bm.append_slots(batch, tokens).tolist()
        except RuntimeError:
            assert snapshot(bm, list(seqs)) == before
            slots = []
            batch = []
        for sid, tok, slot in zip(batch, tokens, slots):
            seqs[sid].append(tok)
            writes.append((slot, tok))
        # forward: copies first, in order, then the new tokens' KV
        for src, dst in bm.take_copies().tolist():
            pool[dst * block_size : (dst + 1) * block_size] = pool[
                src * block_size : (src + 1) * block_size
            ]
        for slot, tok in writes:
            pool[slot] = tok

        bm.check_invariants()
        refs = [0] * num_blocks
        for sid, toks in seqs.items():
            table = bm.block_table(sid)
            assert bm.seq_len(sid) == len(toks)
            assert len(table) == -(-len(toks) // block_size)
            for b in table:
                refs[b] += 1
            got = [pool[s] for s in bm.slot_mapping(sid, 0, len(toks)).tolist()]
            assert got == toks, f"seq {sid} reads another sequence's KV"
        assert [bm.ref_count(b) for b in range(num_blocks)] == refs
        s = bm.stats()
        assert s["blocks_in_use"] == sum(r > 0 for r in refs)
        assert s["free_blocks"] + s["evictable_blocks"] + s["blocks_in_use"] == num_blocks
        assert bm.num_free_blocks == s["free_blocks"] + s["evictable_blocks"]
    s = bm.stats()
    assert s["prefix_hit_tokens"] > 0 and s["evictions"] > 0
    if block_size > 1:
        assert s["cow_copies"] > 0
