"""The benchmark's plain-Python baseline (benchmarks/python_block_manager.py) must have the same
semantics as kv_paged.BlockManager, or bench_block_manager.py compares different work: the same
seeded random workload (prefix hits, forks, copy-on-write, eviction) must give the same block
tables, slots, copy pairs and counters from both."""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

from kv_paged import BlockManager

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)
from python_block_manager import PyBlockManager  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1])
def test_python_baseline_matches_the_cpp_manager(seed):
    rng = random.Random(seed)
    block_size, num_blocks = 4, 48
    managers = [BlockManager(num_blocks, block_size), PyBlockManager(num_blocks, block_size)]
    live: list[int] = []
    history: list[list[int]] = []
    next_id = 0
    for _ in range(300):
        op = rng.randrange(10) if live else 0
        if op < 4:
            prompt = (
                list(rng.choice(history)[: rng.randint(1, 12)])
                if history and rng.random() < 0.6
                else []
            )
            prompt += [rng.randrange(3) for _ in range(rng.randint(0 if prompt else 1, 10))]
            if -(-len(prompt) // block_size) > min(m.num_free_blocks for m in managers):
                continue
            cached = [m.allocate(next_id, prompt) for m in managers]
            assert cached[0] == cached[1]
            computed = rng.randint(cached[0], len(prompt))
            for m in managers:
                m.mark_computed([next_id], [computed])
            live.append(next_id)
            history.append(prompt)
            next_id += 1
        elif op < 6:
            sid = live.pop(rng.randrange(len(live)))
            for m in managers:
                m.free(sid)
        elif op < 8:
            parent = rng.choice(live)
            for m in managers:
                m.fork(parent, next_id)
            live.append(next_id)
            next_id += 1
        else:
            batch = [s for s in live if rng.random() < 0.7]
            if len(batch) > min(m.num_free_blocks for m in managers):
                continue
            tokens = [rng.randrange(3) for _ in batch]
            slots = [m.append_slots(batch, tokens) for m in managers]
            assert torch.equal(slots[0], slots[1])
            copies = [m.take_copies() for m in managers]
            assert torch.equal(copies[0], copies[1])
        for sid in live:
            assert managers[0].block_table(sid) == managers[1].block_table(sid)
        assert managers[0].num_free_blocks == managers[1].num_free_blocks
    stats = managers[0].stats()
    for key, value in managers[1].stats.items():
        assert stats[key] == value, key
    assert stats["prefix_hit_tokens"] > 0 and stats["cow_copies"] > 0 and stats["evictions"] > 0
