"""Plain-Python block manager with the same semantics as kv_paged.BlockManager: the baseline of
benchmarks/bench_block_manager.py.

Designed like the Python block managers of nano-vllm and vLLM v1 (Block objects, a deque of free
ids, a dict from chained block hash to block, an ordered dict as the LRU of evictable cached blocks,
per-sequence Python lists) and written to be readable, not slow: hashes use Python's built-in
tuple hash, the hot loops are plain list operations. It hands out the same block ids as the C++
manager for the same calls, so the benchmark can check agreement before timing.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import torch


class Block:
    __slots__ = (
        "block_id",
        "copy_pending",
        "extra_key",
        "generation",
        "hash",
        "parent",
        "parent_gen",
        "ref_count",
        "token_ids",
    )

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set while the block is in the prefix cache
        self.token_ids: tuple[int, ...] = ()
        self.extra_key: str | None = None
        self.parent = -1
        self.parent_gen = 0
        self.generation = 0
        self.copy_pending = False


class Sequence:
    __slots__ = ("block_hashes", "block_table", "extra_key", "num_computed", "token_ids")

    def __init__(self, token_ids: list[int], extra_key: str | None):
        self.token_ids = token_ids
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.num_computed = 0
        self.extra_key = extra_key


class PyBlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # LRU: first = next victim
        self.hash_to_block: dict[int, int] = {}
        self.seqs: dict[int, Sequence] = {}
        self.pending_copies: list[tuple[int, int]] = []
        self.stats = {
            "prefix_queried_tokens": 0,
            "prefix_hit_tokens": 0,
            "evictions": 0,
            "cow_copies": 0,
        }

    # ---- blocks ----
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids) + len(self.evictable)

    def _take_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        else:
            block_id, _ = self.evictable.popitem(last=False)
            self._uncache(block_id)
            self.stats["evictions"] += 1
        self.blocks[block_id].ref_count = 1
        return block_id

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.evictable.pop(block_id, None)
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0 and not block.copy_pending:
            self._park(block_id)

    def _park(self, block_id: int) -> None:
        if self.blocks[block_id].hash is not None:
            self.evictable[block_id] = None
        else:
            self.free_block_ids.append(block_id)

    def _uncache(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is None:
            return
        del self.hash_to_block[block.hash]
        block.hash = None
        block.generation += 1
        block.parent = -1
        if block_id in self.evictable:
            del self.evictable[block_id]
            self.free_block_ids.append(block_id)

    # ---- prefix cache ----
    def _verify(self, block_id: int, parent: int, tokens: tuple, extra_key: str | None) -> bool:
        b = self.blocks[block_id]
        if b.hash is None or b.extra_key != extra_key or b.parent != parent:
            return False
        if parent != -1 and b.parent_gen != self.blocks[parent].generation:
            return False
        return b.token_ids == tokens

    def _register_computed_blocks(self, seq: Sequence) -> None:
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed, len(seq.token_ids)) // bs
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash((seq.block_hashes[i - 1] if i else 0, tokens, seq.extra_key))
            seq.block_hashes.append(h)
            block_id = seq.block_table[i]
            if self.blocks[block_id].hash is not None:
                continue
            parent = seq.block_table[i - 1] if i else -1
            if parent != -1 and self.blocks[parent].hash is None:
                continue
            other = self.hash_to_block.get(h)
            if other is not None:
                e = self.blocks[other]
                stale = e.parent != -1 and (
                    self.blocks[e.parent].hash is None
                    or e.parent_gen != self.blocks[e.parent].generation
                )
                if not stale:
                    continue
                self._uncache(other)
            b = self.blocks[block_id]
            b.hash, b.token_ids, b.extra_key, b.parent = h, tokens, seq.extra_key, parent
            b.parent_gen = self.blocks[parent].generation if parent != -1 else 0
            self.hash_to_block[h] = block_id

    # ---- API ----
    def can_allocate(self, num_tokens: int) -> bool:
        return -(-num_tokens // self.block_size) <= self.num_free_blocks

    def allocate(self, seq_id: int, token_ids: list[int], extra_key: str | None = None) -> int:
        if seq_id in self.seqs:
            raise ValueError(f"seq_id {seq_id} already exists")
        if not token_ids:
            raise ValueError("token_ids must be non-empty")
        bs = self.block_size
        hits: list[int] = []
        hashes: list[int] = []
        hits_evictable = 0
        if self.enable_prefix_caching:
            parent, parent_hash = -1, 0
            for i in range((len(token_ids) - 1) // bs):
                tokens = tuple(token_ids[i * bs : (i + 1) * bs])
                h = hash((parent_hash, tokens, extra_key))
                block_id = self.hash_to_block.get(h)
                if block_id is None or not self._verify(block_id, parent, tokens, extra_key):
                    break
                hits.append(block_id)
                hashes.append(h)
                parent, parent_hash = block_id, h
                b = self.blocks[block_id]
                hits_evictable += b.ref_count == 0 and not b.copy_pending
        new_blocks = -(-len(token_ids) // bs) - len(hits)
        if new_blocks > self.num_free_blocks - hits_evictable:
            raise RuntimeError(f"allocate: seq_id {seq_id} needs {new_blocks} new blocks")
        seq = Sequence(list(token_ids), extra_key)
        for block_id in hits:
            self._acquire(block_id)
            seq.block_table.append(block_id)
        for _ in range(new_blocks):
            seq.block_table.append(self._take_block())
        seq.block_hashes = hashes
        seq.num_computed = len(hits) * bs
        if self.enable_prefix_caching:
            self.stats["prefix_queried_tokens"] += len(token_ids)
            self.stats["prefix_hit_tokens"] += len(hits) * bs
        self.seqs[seq_id] = seq
        return len(hits) * bs

    def mark_computed(self, seq_ids: list[int], num_computed_tokens: list[int]) -> None:
        for seq_id, n in zip(seq_ids, num_computed_tokens):
            seq = self.seqs[seq_id]
            seq.num_computed = max(seq.num_computed, n)
            self._register_computed_blocks(seq)

    def can_append(self, seq_id: int) -> bool:
        seq = self.seqs[seq_id]
        if len(seq.token_ids) % self.block_size == 0:
            return self.num_free_blocks >= 1
        return self.blocks[seq.block_table[-1]].ref_count == 1 or self.num_free_blocks >= 1

    def append_slot(self, seq_id: int, token_id: int) -> int:
        seq = self.seqs[seq_id]
        pos = len(seq.token_ids)
        if seq.num_computed < pos:
            seq.num_computed = pos
            self._register_computed_blocks(seq)
        if pos % self.block_size == 0:
            seq.block_table.append(self._take_block())
        else:
            last = seq.block_table[-1]
            if self.blocks[last].ref_count > 1:
                copy = self._take_block()
                self.blocks[last].copy_pending = True
                self.pending_copies.append((last, copy))
                self._release(last)
                seq.block_table[-1] = copy
                self.stats["cow_copies"] += 1
        seq.token_ids.append(token_id)
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def append_slots(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        """One decode step; like the engines' Python schedulers, checks can_append per sequence."""
        for seq_id in seq_ids:
            if not self.can_append(seq_id):
                raise RuntimeError(f"append_slots: no block for seq_id {seq_id}")
        slots = [self.append_slot(s, t) for s, t in zip(seq_ids, token_ids)]
        return torch.tensor(slots, dtype=torch.int64)

    def slot_mapping(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        table, bs = self.seqs[seq_id].block_table, self.block_size
        return torch.tensor(
            [table[p // bs] * bs + p % bs for p in range(start, end)], dtype=torch.int64
        )

    def block_tables(self, seq_ids: list[int]) -> torch.Tensor:
        tables = [self.seqs[s].block_table for s in seq_ids]
        width = max((len(t) for t in tables), default=0)
        return torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)

    def seq_lens(self, seq_ids: list[int]) -> torch.Tensor:
        return torch.tensor([len(self.seqs[s].token_ids) for s in seq_ids], dtype=torch.int32)

    def fork(self, parent_seq_id: int, child_seq_id: int) -> None:
        parent = self.seqs[parent_seq_id]
        child = Sequence(list(parent.token_ids), parent.extra_key)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed = parent.num_computed
        for block_id in child.block_table:
            self._acquire(block_id)
        self.seqs[child_seq_id] = child

    def free(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id)
        for block_id in reversed(seq.block_table):
            self._release(block_id)

    def take_copies(self) -> torch.Tensor:
        copies, self.pending_copies = self.pending_copies, []
        for src, _ in copies:
            b = self.blocks[src]
            if b.copy_pending:
                b.copy_pending = False
                if b.ref_count == 0:
                    self._park(src)
        return torch.tensor(copies, dtype=torch.int64).reshape(-1, 2)

    def block_table(self, seq_id: int) -> list[int]:
        return list(self.seqs[seq_id].block_table)
