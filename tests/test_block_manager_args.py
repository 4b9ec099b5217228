"""kv_paged.BlockManager refuses every malformed argument with a ValueError that names it, and
changes nothing: bools where ints belong, ints outside int64, ranges and widths that would size a
huge output, floats and strings in lists and tensors. Also: the table of extra keys stays as small
as what uses it, and what take_copies returns is always accepted by ops.copy_blocks.
"""

from __future__ import annotations

import random
import resource

import pytest
import torch
from test_block_manager import snapshot

import kv_paged
from kv_paged import BlockManager

BIG = 2**63  # one past int64

# (description, call, the argument name the message must contain)
BAD_ARGS = [
    ("bool seq id in append_slots", lambda bm: bm.append_slots([True], [5]), "seq_ids[0]"),
    ("bool seq id in decode_step", lambda bm: bm.decode_step([False], [5]), "seq_ids[0]"),
    ("bool seq id in block_tables", lambda bm: bm.block_tables([True]), "seq_ids[0]"),
    ("bool seq id in seq_lens", lambda bm: bm.seq_lens([1, True]), "seq_ids[1]"),
    ("bool seq id in mark_computed", lambda bm: bm.mark_computed([True], [1]), "seq_ids[0]"),
    ("bool seq id", lambda bm: bm.free(True), "seq_id"),
    ("bool token", lambda bm: bm.append_slot(1, False), "token_id"),
    ("bool tensor of tokens", lambda bm: bm.append_slots([1], torch.tensor([True])), "token_ids"),
    ("float tensor of ids", lambda bm: bm.append_slots(torch.tensor([1.0]), [1]), "seq_ids"),
    ("2-D tensor of ids", lambda bm: bm.seq_lens(torch.ones(1, 1, dtype=torch.long)), "seq_ids"),
    ("seq id >= 2**63", lambda bm: bm.allocate(BIG, [1]), "seq_id"),
    ("seq id < -2**63", lambda bm: bm.has_seq(-BIG - 1), "seq_id"),
    ("seq id >= 2**63 in a list", lambda bm: bm.append_slots([1, BIG], [1, 1]), "seq_ids[1]"),
    ("token >= 2**63", lambda bm: bm.allocate(9, [1, BIG]), "token_ids[1]"),
    ("token >= 2**64 in decode", lambda bm: bm.decode_step([1], [2**64]), "token_ids[0]"),
    ("count >= 2**63", lambda bm: bm.mark_computed([1], [BIG]), "num_computed_tokens[0]"),
    ("slot range end 2**40", lambda bm: bm.slot_mapping(1, 0, 2**40), "end"),
    ("slot range end 2**63", lambda bm: bm.slot_mapping(1, 0, BIG), "end"),
    ("slot range start", lambda bm: bm.slot_mapping(1, -(2**40), 2), "start"),
    ("can_allocate 2**63", lambda bm: bm.can_allocate(BIG), "num_tokens"),
    ("block_tables width 2**40", lambda bm: bm.block_tables([1], 2**40), "max_num_blocks"),
    ("block_tables width < 0", lambda bm: bm.block_tables([1], -1), "max_num_blocks"),
    ("decode_step width 2**40", lambda bm: bm.decode_step([1], [3], 2**40), "max_num_blocks"),
    ("ref_count 2**63", lambda bm: bm.ref_count(BIG), "block_id"),
    ("extra_key bytes", lambda bm: bm.allocate(9, [1], extra_key=b"k"), "extra_key"),
    ("float seq id", lambda bm: bm.fork(1.0, 9), "parent_seq_id"),
    ("str child id", lambda bm: bm.fork(1, "9"), "child_seq_id"),
    ("dict of ids", lambda bm: bm.seq_lens({1: 2}), "seq_ids"),
    ("str of ids", lambda bm: bm.block_tables("12"), "seq_ids"),
    ("forget_computed 2**63", lambda bm: bm.forget_computed(1, BIG), "num_tokens"),
]


@pytest.mark.parametrize("desc,call,name", BAD_ARGS, ids=[c[0] for c in BAD_ARGS])
def test_bad_argument_is_a_value_error_naming_it_and_changes_nothing(desc, call, name):
    bm = BlockManager(16, 4)
    bm.allocate(1, list(range(8)))
    bm.mark_computed([1], [8])
    bm.allocate(2, [9, 9, 9])
    bm.fork(2, 3)
    before = snapshot(bm, [1, 2, 3, 9])
    with pytest.raises(ValueError) as info:
        call(bm)
    assert name in str(info.value), f"the message must name {name}: {info.value}"
    assert snapshot(bm, [1, 2, 3, 9]) == before
    bm.check_invariants()


def test_huge_counts_are_answered_not_overflowed():
    bm = BlockManager(8, 16)
    assert not bm.can_allocate(2**63 - 1)
    assert bm.can_allocate(128) and not bm.can_allocate(129)


def test_integer_likes_are_read_as_ints():
    bm = BlockManager(16, 4)
    assert bm.allocate(torch.tensor(5), (1, 2, 3)) == 0  # 0-d tensor id (__index__), tuple prompt
    assert bm.allocate(6, torch.tensor([1, 2, 3], dtype=torch.int32)) == 0
    slots, tables, lens = bm.decode_step(torch.tensor([5, 6]), torch.tensor([7, 8]))
    assert lens.tolist() == [4, 4] and tables.shape == (2, 1) and slots.shape == (2,)


def test_a_list_mutated_while_it_is_read_is_read_safely():
    """__index__ runs Python while the list is being read: shrinking the list then must not make
    the reader step past its end (a crash on a borrowed-pointer loop)."""
    bm = BlockManager(16, 4)
    ids: list[object] = []

    class Shrinker:
        def __index__(self) -> int:
            ids.clear()
            return 1

    bm.allocate(1, [1, 2])
    ids.extend([Shrinker(), 1, 1, 1])
    out = bm.seq_lens(ids)
    assert out.tolist() == [2]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_extra_keys_are_forgotten_when_no_block_uses_them():
    """300k requests, each with its own cache salt, allocated, computed and freed: the key table
    holds only keys that cached blocks still carry (at most num_blocks), and memory stays flat."""
    bm = BlockManager(8, 4)
    prompt = list(range(8))
    n = 300_000
    peak = 0
    rss_before = None
    for i in range(n):
        bm.allocate(i, prompt, extra_key=f"salt-{i}")
        bm.mark_computed([i], [8])
        bm.free(i)
        if i == 20_000:
            rss_before = _rss_mb()
        if i % 1000 == 0:
            peak = max(peak, bm.stats()["extra_keys"])
    assert peak <= bm.num_blocks
    assert bm.stats()["extra_keys"] <= bm.num_blocks
    assert _rss_mb() - rss_before < 8, "the extra-key table grew with distinct freed keys"
    bm.check_invariants()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_take_copies_output_is_accepted_by_copy_blocks(seed):
    """Forks and appends between drains (the case that used to chain pairs): every drain goes to
    ops.copy_blocks on a real pool, followed by the step's writes; each sequence then reads back
    its tokens (positions appended but unwritten when their sequence was forked excepted: their
    KV goes to the parent's block only, whatever the copies)."""
    rng = random.Random(seed)
    bs, num_blocks = 4, 64
    k = torch.full((num_blocks, bs, 1, 1), -1.0)
    v = torch.full((num_blocks, bs, 1, 1), -1.0)
    bm = BlockManager(num_blocks, bs)
    toks = {0: [0, 1, 2]}
    unknown: dict[int, set[int]] = {0: set()}
    pending: dict[int, set[int]] = {0: set()}
    bm.allocate(0, toks[0])
    k.view(-1)[bm.slot_mapping(0, 0, 3)] = torch.tensor([0.0, 1.0, 2.0])
    writes: list[tuple[int, int]] = []
    copied = 0
    for step in range(60):
        if bm.num_free_blocks < 2:
            break
        parent = rng.choice(list(toks))
        child = max(toks) + 1
        bm.fork(parent, child)
        toks[child] = list(toks[parent])
        unknown[child] = unknown[parent] | pending[parent]
        pending[child] = {len(toks[child])}
        tok = 100 + step
        writes.append((bm.append_slot(child, tok), tok))
        toks[child].append(tok)
        if rng.random() < 0.25:
            bm.free(parent)
            del toks[parent]
        if rng.random() < 0.6:
            continue
        copies = bm.take_copies()
        copied += copies.shape[0]
        kv_paged.ops.copy_blocks([k], [v], copies)  # refused chains before
        for slot, t in writes:
            k.view(-1)[slot] = float(t)
        writes.clear()
        for s in pending:
            pending[s] = set()
        for s, ts in toks.items():
            got = k.view(-1)[bm.slot_mapping(s, 0, len(ts))].tolist()
            for p, t in enumerate(ts):
                if p not in unknown[s]:
                    assert got[p] == t, f"seq {s} position {p}"
        bm.check_invariants()
    assert copied > 0
