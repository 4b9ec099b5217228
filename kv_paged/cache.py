"""Paged KV pools (one k/v pair per decoder layer) and the per-step attention metadata.

One `AttentionMetadata` describes a whole forward step (a packed varlen batch of prefill chunks
and decode rows) and is shared by every layer: it is built once per step, never once per layer.
Framework-free: kv_paged/integrations/hf/ and kv_paged/engine.py both drive models through it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from kv_paged import ops

__all__ = ["AttentionMetadata", "KVCachePool", "PaddedBatch", "blocks_needed", "left_padding"]


@dataclasses.dataclass
class AttentionMetadata:
    """Everything the attention of one forward step needs, shared by all layers.

    The step's query tokens are packed: sequence i owns tokens cu_seqlens_q[i]:cu_seqlens_q[i+1] of
    the packed [T, ...] tensors, and those are the LAST q_len_i positions of its seq_lens_kv[i]
    tokens (bottom-right causal alignment), so prefill chunks and decode rows mix freely.

    Fields:
        slot_mapping:  int64 [T]. Pool slot (block * block_size + offset) each new token's K/V is
                       written to; -1 = do not write (already cached, e.g. a recomputed prefix).
        block_tables:  int32 [B, max_blocks]. Sequence i's blocks in order, padded with -1.
        cu_seqlens_q:  int32 [B + 1]. Prefix sums of the per-sequence query lengths; [-1] == T.
        seq_lens_kv:   int32 [B]. KV length of each sequence INCLUDING this step's tokens.
        max_seqlen_q:  int. max(q_len_i).
        max_seqlen_kv: int. max(seq_lens_kv).
        token_index:   int64 [T] or None. Where each packed token sits in the model's flattened
                       [batch * seq] input; None when the input is already packed ([1, T]).
        num_rows:      int. Flattened input length batch * seq (== T when token_index is None).
        no_prefix:     bool. Every sequence's KV is exactly its new tokens (a first prefill with no
                       cached prefix): attention may then run on the new K/V without the pool.
    All tensors live on the model's device.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens_kv: torch.Tensor
    max_seqlen_q: int
    max_seqlen_kv: int
    token_index: torch.Tensor | None = None
    num_rows: int = -1
    no_prefix: bool = False

    def __post_init__(self) -> None:
        if self.num_rows < 0:
            self.num_rows = int(self.slot_mapping.numel())

    @property
    def num_tokens(self) -> int:
        """T, the number of packed query tokens of the step."""
        return int(self.slot_mapping.numel())

    @property
    def num_seqs(self) -> int:
        """B, the number of sequences of the step."""
        return int(self.seq_lens_kv.numel())

    @classmethod
    def build(
        cls,
        *,
        query_lens: Sequence[int],
        kv_lens: Sequence[int],
        block_tables: torch.Tensor,
        slot_mapping: torch.Tensor,
        device: torch.device | str | None = None,
        token_index: torch.Tensor | None = None,
        num_rows: int | None = None,
    ) -> AttentionMetadata:
        """Metadata of one step from host-side lengths, validated.

        Args:
            query_lens:   B ints, new tokens of each sequence this step (0 allowed).
            kv_lens:      B ints, KV length of each sequence including this step's tokens.
            block_tables: int32 [B, max_blocks] (e.g. BlockManager.block_tables(seq_ids)).
            slot_mapping: int64 [sum(query_lens)] (e.g. BlockManager.slot_mapping / append_slots).
            device:       where the tensors go (default: block_tables' device).
            token_index:  int64 [sum(query_lens)] or None, see the class docstring.
            num_rows:     flattened input length when token_index is given.
        """
        query_lens = [int(n) for n in query_lens]
        kv_lens = [int(n) for n in kv_lens]
        if len(query_lens) != len(kv_lens):
            raise ValueError(
                f"query_lens has {len(query_lens)} entries but kv_lens has {len(kv_lens)}; "
                "both need one per sequence"
            )
        for i, (q, k) in enumerate(zip(query_lens, kv_lens)):
            if q < 0 or k < q:
                raise ValueError(f"sequence {i}: need 0 <= query_lens <= kv_lens, got {q} and {k}")
        if block_tables.dim() != 2 or block_tables.shape[0] != len(kv_lens):
            raise ValueError(
                f"block_tables must be [B={len(kv_lens)}, max_blocks], got {tuple(block_tables.shape)}"
            )
        total = sum(query_lens)
        if slot_mapping.dim() != 1 or slot_mapping.numel() != total:
            raise ValueError(
                f"slot_mapping must be int64 [sum(query_lens)={total}], got {tuple(slot_mapping.shape)}"
            )
        if token_index is not None and (token_index.dim() != 1 or token_index.numel() != total):
            raise ValueError(f"token_index must be int64 [{total}], got {tuple(token_index.shape)}")
        device = torch.device(device) if device is not None else block_tables.device
        cu = [0]
        for q in query_lens:
            cu.append(cu[-1] + q)
        return cls(
            slot_mapping=slot_mapping.to(device=device, dtype=torch.int64),
            block_tables=block_tables.to(device=device, dtype=torch.int32),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            seq_lens_kv=torch.tensor(kv_lens, dtype=torch.int32, device=device),
            max_seqlen_q=max(query_lens, default=0),
            max_seqlen_kv=max(kv_lens, default=0),
            token_index=None
            if token_index is None
            else token_index.to(device=device, dtype=torch.int64),
            num_rows=total if num_rows is None else int(num_rows),
            no_prefix=all(q == k for q, k in zip(query_lens, kv_lens)),
        )

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[num_rows, ...] (the model's flattened input layout) -> [T, ...] packed tokens."""
        if x.shape[0] != self.num_rows:
            raise ValueError(
                f"expected {self.num_rows} rows, got a tensor of shape {tuple(x.shape)}"
            )
        return x if self.token_index is None else x.index_select(0, self.token_index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] packed tokens -> [num_rows, ...], zeros where the input had padding."""
        if self.token_index is None:
            return x
        out = x.new_zeros((self.num_rows, *x.shape[1:]))
        return out.index_copy_(0, self.token_index, x)


class KVCachePool:
    """The K/V block pools of every layer plus the attention over them.

    k_caches[l], v_caches[l]: [num_blocks, block_size, num_kv_heads, head_dim] (head counts and
    head_dim may differ per layer). Pools start as NaN so a read of an unwritten slot is loud.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int | Sequence[int],
        head_dim: int | Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        heads = [num_kv_heads] * num_layers if isinstance(num_kv_heads, int) else list(num_kv_heads)
        dims = [head_dim] * num_layers if isinstance(head_dim, int) else list(head_dim)
        if len(heads) != num_layers or len(dims) != num_layers:
            raise ValueError(f"num_kv_heads and head_dim need one entry per layer ({num_layers})")
        if any(h <= 0 for h in heads) or any(d <= 0 for d in dims):
            raise ValueError(f"num_kv_heads {heads} and head_dim {dims} must be positive")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.dtype, self.device = dtype, torch.device(device)
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []
        for h, d in zip(heads, dims):
            shape = (num_blocks, block_size, h, d)
            self.k_caches.append(torch.full(shape, float("nan"), dtype=dtype, device=self.device))
            self.v_caches.append(torch.full(shape, float("nan"), dtype=dtype, device=self.device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_caches + self.v_caches)

    def write(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Store one layer's new K/V.

        key, value: [T, num_kv_heads, head_dim] packed like meta (slot_mapping [T], -1 skipped).
        """
        k_cache, v_cache = self.k_caches[layer_idx], self.v_caches[layer_idx]
        ops.reshape_and_cache(
            key.to(k_cache.dtype), value.to(v_cache.dtype), k_cache, v_cache, meta.slot_mapping
        )

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        meta: AttentionMetadata,
        *,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        scale: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Causal attention of the step's packed queries over each sequence's cached KV.

        query: [T, num_heads, head_dim]; key/value: [T, num_kv_heads, head_dim], this step's new
        K/V, only used on a no-prefix step (flash attention on them, no pool read).
        Returns [T, num_heads, head_dim].
        """
        window = sliding_window if sliding_window is not None and sliding_window > 0 else None
        cap = softcap if softcap is not None and softcap > 0 else None
        if meta.num_tokens == 0:
            return query.new_zeros(query.shape)
        if meta.no_prefix and key is not None and value is not None:
            return ops.flash_attention(
                query,
                key,
                value,
                meta.cu_seqlens_q,
                meta.cu_seqlens_q,
                meta.max_seqlen_q,
                meta.max_seqlen_q,
                scale=scale,
                causal=True,
                sliding_window=window,
                softcap=cap,
            )
        return ops.paged_attention(
            query,
            self.k_caches[layer_idx],
            self.v_caches[layer_idx],
            meta.block_tables,
            meta.cu_seqlens_q,
            meta.seq_lens_kv,
            scale=scale,
            causal=True,
            sliding_window=window,
            softcap=cap,
        )

    def copy_blocks(self, block_mapping: torch.Tensor) -> None:
        """Apply copy-on-write copies (BlockManager.take_copies(): int64 [n, 2]) to every layer."""
        if block_mapping.numel():
            ops.copy_blocks(self.k_caches, self.v_caches, block_mapping.to(self.device))


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """ceil(num_tokens / block_size): the blocks a sequence of num_tokens tokens occupies."""
    return math.ceil(num_tokens / block_size)


@dataclasses.dataclass
class _Row:
    """One batch row: a BlockManager sequence."""

    seq_id: int
    pad: int  # leading padding columns of this row in the padded input
    tokens: list[int]  # every token the BlockManager holds for the sequence
    written: int  # leading tokens whose K/V is in the pool (prefix-cached or computed)


class PaddedBatch:
    """A generate-style batch over a BlockManager: B left-padded rows, one sequence each, fed
    column by column (a prompt, then continuations / decode tokens of the same width for all rows).

    Turns each step's padded input_ids [B, S] into AttentionMetadata: pad tokens get no slot and no
    query; prompt tokens already prefix-cached get slot -1 (kept, not rewritten). Every check runs
    before the BlockManager changes, so a bad step leaves the batch as it was.
    """

    def __init__(self, block_manager, *, first_seq_id: int = 0) -> None:
        self.block_manager = block_manager
        self.block_size: int = block_manager.block_size
        self.next_seq_id = first_seq_id
        self.rows: list[_Row] = []
        self.columns = 0  # padded input columns whose K/V is in the pool (or prefix-cached)
        self._pending: tuple[list[int], int] | None = None  # (kv lens, columns) after the step

    @property
    def seq_ids(self) -> list[int]:
        return [r.seq_id for r in self.rows]

    def add_prompts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> int:
        """Book blocks for the prompts of a new batch, reusing prefix-cached blocks.

        input_ids: int [B, L]; attention_mask: [B, L] of 0/1, left padding only (or None).
        Returns the leading columns already in the pool for every row (always < L): the next step
        feeds input_ids[:, returned:].
        """
        if self.rows:
            raise RuntimeError("this batch already holds prompts")
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dim() != 2
            or input_ids.shape[1] == 0
        ):
            raise ValueError(
                f"input_ids must be an int tensor [B, L] with L > 0, got {_shape(input_ids)}"
            )
        self._admit(input_ids, attention_mask)
        skip = min(r.pad + r.written for r in self.rows)
        self.columns = min(skip, input_ids.shape[1] - 1)
        return self.columns

    def _admit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        bsz, length = input_ids.shape
        pads = left_padding(attention_mask, bsz, length)
        prompts = [row[p:] for row, p in zip(input_ids.tolist(), pads)]
        need = sum(blocks_needed(len(p), self.block_size) for p in prompts)
        free = self.block_manager.num_free_blocks
        if need > free:
            raise RuntimeError(
                f"PagedCache out of blocks: the prompts need {need} blocks of {self.block_size} tokens, "
                f"{free} of {self.block_manager.num_blocks} are free"
            )
        for prompt, pad in zip(prompts, pads):
            seq_id = self.next_seq_id
            self.next_seq_id += 1
            cached = self.block_manager.allocate(seq_id, prompt) if prompt else 0
            self.rows.append(_Row(seq_id=seq_id, pad=pad, tokens=list(prompt), written=int(cached)))

    def begin_step(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        *,
        device: torch.device,
    ) -> AttentionMetadata:
        """Book the step's tokens and return its metadata; commit_step() after a successful forward.

        input_ids: int [B, S], the next S columns; attention_mask: [B, columns + S] or None.
        """
        if input_ids is None:
            raise ValueError(
                "PagedCache needs input_ids: the block manager hashes token ids for prefix caching "
                "(inputs_embeds alone are not supported)"
            )
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got {_shape(input_ids)}")
        bsz, seq = input_ids.shape
        if attention_mask is not None and not (
            isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        ):
            raise ValueError(
                "PagedCache supports a 2D attention_mask [batch, past + new] of 0/1 only, got "
                f"{_shape(attention_mask)}"
            )
        c0 = self.columns
        if attention_mask is not None and tuple(attention_mask.shape) != (bsz, c0 + seq):
            raise ValueError(
                f"attention_mask must cover the cached and new columns: expected shape "
                f"{(bsz, c0 + seq)}, got {tuple(attention_mask.shape)}"
            )
        if not self.rows:
            self._admit(input_ids, attention_mask)
        rows = self.rows
        if len(rows) != bsz:
            raise ValueError(
                f"input_ids has batch {bsz} but the cache holds {len(rows)} sequences; reset() first"
            )
        if attention_mask is not None:
            pads = torch.tensor([r.pad for r in rows], device=attention_mask.device)
            cols = torch.arange(c0, c0 + seq, device=attention_mask.device)
            if not torch.equal(attention_mask[:, c0:].bool(), cols[None, :] >= pads[:, None]):
                raise ValueError(
                    "attention_mask must be left padding only (each row 0...0 1...1), consistent "
                    "with the earlier steps of the batch"
                )

        # Plan every row before touching the BlockManager.
        plans = []  # (row, first token position, end position, tokens new to the BlockManager)
        need = 0
        for row, row_ids in zip(rows, input_ids.tolist()):
            start, end = max(c0 - row.pad, 0), max(c0 + seq - row.pad, 0)
            step_tokens = row_ids[max(c0, row.pad) - c0 :]
            known = len(row.tokens)
            overlap = max(min(end, known) - start, 0)
            if step_tokens[:overlap] != row.tokens[start : start + overlap]:
                raise ValueError(
                    "input_ids do not match the tokens this PagedCache holds for the batch"
                )
            new_tokens = step_tokens[overlap:]
            need += blocks_needed(known + len(new_tokens), self.block_size) - blocks_needed(
                known, self.block_size
            )
            plans.append((row, start, end, new_tokens))
        free = self.block_manager.num_free_blocks
        if need > free:
            raise RuntimeError(
                f"PagedCache out of blocks: this step needs {need} new blocks, {free} of "
                f"{self.block_manager.num_blocks} are free"
            )

        slots: list[torch.Tensor] = []
        if all(len(new) == 1 and end - start == 1 for _, start, end, new in plans):  # decode
            slots.append(
                self.block_manager.append_slots(self.seq_ids, [new[0] for *_, new in plans])
            )
        else:
            for row, start, end, new_tokens in plans:
                known = len(row.tokens)
                lo = max(start, row.written)
                if start < lo:
                    slots.append(torch.full((min(lo, end) - start,), -1, dtype=torch.int64))
                if lo < min(end, known):
                    slots.append(self.block_manager.slot_mapping(row.seq_id, lo, min(end, known)))
                if new_tokens:
                    appended = [self.block_manager.append_slot(row.seq_id, t) for t in new_tokens]
                    slots.append(torch.tensor(appended, dtype=torch.int64))
        for row, *_, new_tokens in plans:
            row.tokens.extend(new_tokens)
        slot_mapping = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.int64)

        query_lens = [end - start for _, start, end, _ in plans]
        kv_lens = [end for _, _, end, _ in plans]
        token_index = None
        if sum(query_lens) != bsz * seq:  # padding: the valid columns are each row's last q_len
            index = [i * seq + seq - n + j for i, n in enumerate(query_lens) for j in range(n)]
            token_index = torch.tensor(index, dtype=torch.int64)
        self._pending = (kv_lens, c0 + seq)
        return AttentionMetadata.build(
            query_lens=query_lens,
            kv_lens=kv_lens,
            block_tables=self.block_manager.block_tables(self.seq_ids),
            slot_mapping=slot_mapping,
            device=device,
            token_index=token_index,
            num_rows=bsz * seq,
        )

    def commit_step(self) -> None:
        """The step's K/V is written: tell the BlockManager (prefix-cache matching) and advance."""
        if self._pending is None:
            raise RuntimeError("commit_step() without begin_step()")
        (kv_lens, columns), self._pending = self._pending, None
        self.block_manager.mark_computed(self.seq_ids, kv_lens)
        for row, n in zip(self.rows, kv_lens):
            row.written = max(row.written, n)
        self.columns = columns

    def free(self) -> None:
        """Release every row's sequence; computed full blocks stay in the prefix cache."""
        for row in self.rows:
            self.block_manager.free(row.seq_id)
        self.rows, self.columns, self._pending = [], 0, None


def left_padding(attention_mask: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """Leading padding count of each row of attention_mask [batch, length]; raises unless every
    row is 0...0 1...1. None means no padding."""
    if attention_mask is None:
        return [0] * batch
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (
        batch,
        length,
    ):
        raise ValueError(
            f"attention_mask must be [batch={batch}, {length}] of 0/1, got {_shape(attention_mask)}"
        )
    mask = attention_mask.bool()
    pads = (~mask).sum(dim=1)
    if not torch.equal(mask, torch.arange(length, device=mask.device)[None, :] >= pads[:, None]):
        raise ValueError("attention_mask must be left padding only (each row 0...0 1...1)")
    return pads.tolist()


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
