"""PaddedBatch: the generate-style batch of a PagedCache. B left-padded rows, one BlockManager
sequence each, fed column by column; each forward's padded input_ids [B, S] become one
AttentionMetadata.

Design decision: every check runs before the BlockManager changes, and the BlockManager only hears
that K/V is written (mark_computed) once the forward succeeded, so a failed step never lets the
prefix cache serve K/V that was not written.
"""

from __future__ import annotations

import dataclasses

import torch

from kv_paged.beam_search import continuations
from kv_paged.cache import AttentionMetadata, blocks_needed

__all__ = ["PaddedBatch", "left_padding"]


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

    def __init__(self, block_manager, *, first_seq_id: int = 0, cascade: bool = False) -> None:
        self.block_manager = block_manager
        self.cascade = cascade  # plan cascade attention over the step's tables
        self.block_size: int = block_manager.block_size
        self.next_seq_id = first_seq_id
        self.rows: list[_Row] = []
        self.columns = 0  # padded input columns whose K/V is in the pool (or prefix-cached)
        self._pending: tuple[list[int], int] | None = None  # (kv lens, columns) after the step
        self._booked_only = False  # prompts booked by add_prompts, no forward run yet
        self._orphans: list[int] = []  # sequences of dropped rows still to free
        # begin_step changed the BlockManager but did not finish: the batch no longer matches it.
        self.half_done = False

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
        _check_token_ids(input_ids)
        self._admit(input_ids, attention_mask)
        self._booked_only = True
        skip = min(r.pad + r.written for r in self.rows)
        self.columns = min(skip, input_ids.shape[1] - 1)
        return self.columns

    def _admit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Book a sequence per row. A row equal to the one before it (generate's expansion of a
        prompt for beams or samples) forks it instead: one copy of the prompt's blocks, written once
        (the fork's prompt slots are -1; its queries read what the first row writes). All rows or
        none: on any failure the sequences booked so far are freed. input_ids: checked by the
        caller (_check_token_ids)."""
        bsz, length = input_ids.shape
        pads = left_padding(attention_mask, bsz, length)
        prompts = [row[p:] for row, p in zip(input_ids.tolist(), pads)]
        repeats = [
            i > 0 and bool(prompts[i]) and (prompts[i], pads[i]) == (prompts[i - 1], pads[i - 1])
            for i in range(bsz)
        ]
        need = sum(
            blocks_needed(len(p), self.block_size) for p, r in zip(prompts, repeats) if not r
        )
        free = self.block_manager.num_free_blocks
        if need > free:
            raise RuntimeError(
                f"PagedCache out of blocks: the prompts need {need} blocks of {self.block_size} tokens, "
                f"{free} of {self.block_manager.num_blocks} are free"
            )
        rows: list[_Row] = []
        try:
            for prompt, pad, repeat in zip(prompts, pads, repeats):
                seq_id = self.next_seq_id
                self.next_seq_id += 1
                if repeat:
                    self.block_manager.fork(rows[-1].seq_id, seq_id)
                    written = len(prompt)
                else:
                    written = self.block_manager.allocate(seq_id, prompt) if prompt else 0
                rows.append(_Row(seq_id=seq_id, pad=pad, tokens=list(prompt), written=int(written)))
        except BaseException:
            self._free_rows(rows)
            raise
        self.rows.extend(rows)

    def select(self, index: torch.Tensor | list[int], name: str, *, same_size: bool) -> None:
        """Row i becomes a continuation of old row index[i] (beam search's reorder, generate's
        batch selection): the first continuation of a row keeps its sequence, later ones fork it
        (blocks shared, copy-on-write on append), rows nobody continues are freed.

        index: int [B'] (B' == B when same_size), values in [0, B).
        """
        if self._pending is not None:
            raise RuntimeError(f"cannot reorder a PagedCache ({name}) while a forward is running")
        if isinstance(index, torch.Tensor):
            if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
                raise ValueError(
                    f"{name} must be a 1-D integer tensor, got {index.dtype} {tuple(index.shape)}"
                )
            index = index.tolist()
        index = list(index)
        rows = self.rows
        if same_size and len(index) != len(rows):
            raise ValueError(f"{name} must have one entry per row ({len(rows)}), got {len(index)}")
        for i in index:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(rows):
                raise ValueError(f"{name} entries must be ints in [0, {len(rows)}), got {i!r}")
            if not self.block_manager.has_seq(rows[i].seq_id):
                raise ValueError(
                    f"{name}: row {i} holds no tokens (an all-padding row) to continue"
                )
        forks, dropped = continuations(index, len(rows))
        children: list[_Row] = []
        try:
            for i, fork in zip(index, forks):
                if fork:
                    parent = rows[i]
                    child = dataclasses.replace(
                        parent, seq_id=self.next_seq_id, tokens=list(parent.tokens)
                    )
                    self.next_seq_id += 1
                    self.block_manager.fork(parent.seq_id, child.seq_id)
                    children.append(child)
        except BaseException:  # nothing happened: the forks so far are undone
            self._free_rows(children)
            raise
        forked = iter(children)
        self.rows = [next(forked) if fork else rows[i] for i, fork in zip(index, forks)]
        self._free_rows([rows[i] for i in dropped])

    def _free_rows(self, rows: list[_Row]) -> None:
        """Free rows' sequences. Those not freed yet wait in _orphans (free() finishes them), so
        an interrupt here leaks nothing."""
        self._orphans.extend(r.seq_id for r in rows)
        while self._orphans:
            seq_id = self._orphans[-1]
            if self.block_manager.has_seq(seq_id):  # an all-padding row holds no sequence
                self.block_manager.free(seq_id)
            self._orphans.pop()

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
        _check_token_ids(input_ids)
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
        if self._booked_only and bsz != len(self.rows) and bsz % len(self.rows) == 0:
            # generate expanded the booked prompts (num_beams, num_return_sequences): each row
            # becomes bsz // B rows sharing its blocks. A later check may still refuse the step;
            # the batch is then consistent, only already expanded.
            expand = bsz // len(self.rows)
            self.select(
                torch.arange(len(self.rows)).repeat_interleave(expand), "input_ids", same_size=False
            )
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
            if new_tokens and known % self.block_size and self._shares_last_block(row):
                need += 1  # the copy-on-write copy of the shared partial last block
            plans.append((row, start, end, new_tokens))
        free = self.block_manager.num_free_blocks
        if need > free:
            raise RuntimeError(
                f"PagedCache out of blocks: this step needs {need} new blocks, {free} of "
                f"{self.block_manager.num_blocks} are free"
            )

        slots: list[torch.Tensor] = []
        self.half_done = True  # until _pending is set: a failure in between breaks the batch
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
        meta = AttentionMetadata.build(
            query_lens=query_lens,
            kv_lens=kv_lens,
            block_tables=self.block_manager.block_tables(self.seq_ids),
            slot_mapping=slot_mapping,
            device=device,
            token_index=token_index,
            num_rows=bsz * seq,
            cascade_block_size=self.block_size if self.cascade else None,
        )
        self._pending = (kv_lens, c0 + seq)
        self.half_done = False
        return meta

    def commit_step(self) -> None:
        """The step's K/V is written: tell the BlockManager (prefix-cache matching) and advance."""
        if self._pending is None:
            raise RuntimeError("commit_step() without begin_step()")
        (kv_lens, columns), self._pending = self._pending, None
        self.block_manager.mark_computed(self.seq_ids, kv_lens)
        for row, n in zip(self.rows, kv_lens):
            row.written = max(row.written, n)
        self.columns = columns
        self._booked_only = False

    def _shares_last_block(self, row: _Row) -> bool:
        table = self.block_manager.block_table(row.seq_id)
        return bool(table) and self.block_manager.ref_count(table[-1]) > 1

    def free(self) -> None:
        """Release every row's sequence; computed full blocks stay in the prefix cache."""
        self._free_rows(self.rows)
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


def _check_token_ids(input_ids: torch.Tensor) -> None:
    """input_ids: an integer tensor of token ids in [0, 2^31) (what the BlockManager stores)."""
    if (
        input_ids.dtype.is_floating_point
        or input_ids.dtype.is_complex
        or input_ids.dtype == torch.bool
    ):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= 1 << 31):
        raise ValueError(
            f"input_ids must be token ids in [0, 2^31), got values in "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]"
        )


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
