"""kv_paged.BlockManager: the typed Python face of the C++ block manager
(torch.classes.kv_paged.BlockManager over csrc/block_manager.cpp + csrc/prefix_cache.cpp).

The hot path (append_slots, block_tables, seq_lens, decode_step) forwards straight to C++, which
builds the result tensors itself, so a decode step over B sequences is O(1) Python calls. Argument
checks happen in C++ (one pass, before any mutation); this wrapper only turns the TorchScript
argument-conversion errors into ValueErrors that name the argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BlockManager"]


def _token_list(token_ids: Sequence[int] | torch.Tensor, name: str) -> list[int]:
    """Token ids as a list of Python ints; rejects bools, floats and non-1-D tensors by name."""
    if type(token_ids) is list and set(map(type, token_ids)) <= {int}:
        return token_ids  # the common case, checked at C speed (no per-element Python)
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.dtype.is_floating_point or token_ids.dtype.is_complex:
            raise ValueError(
                f"{name} must be a 1-D integer tensor, got dtype {token_ids.dtype} "
                f"shape {tuple(token_ids.shape)}"
            )
        if token_ids.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer token ids, got a bool tensor")
        return token_ids.tolist()
    if isinstance(token_ids, (str, bytes)):
        raise ValueError(
            f"{name} must be a sequence of int token ids, got {type(token_ids).__name__}"
        )
    try:
        out = list(token_ids)
    except TypeError:
        raise ValueError(
            f"{name} must be a sequence of int token ids, got {type(token_ids).__name__}"
        ) from None
    for i, t in enumerate(out):
        if type(t) is not int:
            if isinstance(t, bool) or not hasattr(t, "__index__"):
                raise ValueError(
                    f"{name}[{i}] must be an int token id, got {type(t).__name__} {t!r}"
                )
            out[i] = t.__index__()  # numpy / torch integer scalars
    return out


def _int_list(values: Sequence[int] | torch.Tensor, name: str) -> list[int]:
    return _token_list(values, name)


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value.__index__()


class BlockManager:
    """Maps each sequence's logical KV blocks to physical blocks of a pool of ``num_blocks``
    blocks of ``block_size`` tokens, with automatic prefix caching and copy-on-write.

    ``slot = block_id * block_size + offset`` everywhere. Every method validates its arguments
    before changing anything: on error (ValueError for bad arguments, RuntimeError when the pool
    is out of blocks) the state is exactly as before.

    Args:
        num_blocks: blocks in the pool (> 0).
        block_size: tokens per block (> 0).
        enable_prefix_caching: share computed full blocks between sequences with the same prefix
            (and extra_key).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        num_blocks = _check_int(num_blocks, "num_blocks")
        block_size = _check_int(block_size, "block_size")
        self._bm = torch.classes.kv_paged.BlockManager(
            num_blocks, block_size, bool(enable_prefix_caching)
        )
        self.num_blocks: int = num_blocks
        self.block_size: int = block_size
        self.enable_prefix_caching: bool = bool(enable_prefix_caching)

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"BlockManager(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"in_use={s['blocks_in_use']}, free={s['free_blocks']}, "
            f"evictable={s['evictable_blocks']})"
        )

    # ---- capacity --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free plus evictable (cached, unreferenced)."""
        return self._bm.num_free_blocks()

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a prompt of ``num_tokens`` fits, not counting prefix hits (conservative)."""
        return self._bm.can_allocate(_check_int(num_tokens, "num_tokens"))

    def can_append(self, seq_id: int) -> bool:
        """Whether ``append_slot(seq_id, ...)`` has the block it may need (new or copy-on-write)."""
        return self._bm.can_append(_check_int(seq_id, "seq_id"))

    # ---- sequence lifetime -----------------------------------------------------------------
    def allocate(
        self,
        seq_id: int,
        token_ids: Sequence[int] | torch.Tensor,
        extra_key: str | None = None,
    ) -> int:
        """Blocks for a new sequence's whole prompt.

        Args:
            seq_id: a new sequence id.
            token_ids: the prompt, [num_tokens] ints in [0, 2**31): a list, or a 1-D integer
                tensor (read directly in C++, the fastest input).
            extra_key: separates prefix-cache tenants (LoRA adapter id, cache salt); prompts only
                share blocks with prompts of the same extra_key.

        Returns:
            num_cached_tokens: leading prompt tokens whose KV is already in the pool (a multiple of
            block_size, always < len(token_ids)); compute positions [num_cached_tokens, len).
        """
        seq_id = _check_int(seq_id, "seq_id")
        if extra_key is not None and not isinstance(extra_key, str):
            raise ValueError(f"extra_key must be a str or None, got {type(extra_key).__name__}")
        if isinstance(token_ids, torch.Tensor):  # read in C++: no per-element Python
            if (
                token_ids.dim() != 1
                or token_ids.dtype.is_floating_point
                or token_ids.dtype.is_complex
            ):
                raise ValueError(
                    f"token_ids must be a 1-D integer tensor, got dtype {token_ids.dtype} "
                    f"shape {tuple(token_ids.shape)}"
                )
            if token_ids.dtype == torch.bool:
                raise ValueError("token_ids must hold integer token ids, got a bool tensor")
            return self._bm.allocate_tensor(seq_id, token_ids, extra_key)
        return self._bm.allocate(seq_id, _token_list(token_ids, "token_ids"), extra_key)

    def mark_computed(self, seq_ids: Sequence[int], num_computed_tokens: Sequence[int]) -> None:
        """The KV of each sequence's first ``num_computed_tokens[i]`` tokens is written (e.g.
        after a prefill chunk); its full blocks become matchable by later prompts. Never
        decreases a sequence's computed count."""
        ids = _int_list(seq_ids, "seq_ids")
        counts = _int_list(num_computed_tokens, "num_computed_tokens")
        self._bm.mark_computed(ids, counts)

    def forget_computed(self, seq_id: int, num_tokens: int) -> None:
        """Undoes mark_computed past ``num_tokens`` (a step marked before its forward ran, then
        undone): the sequence's blocks from ``num_tokens // block_size`` on leave the prefix
        cache, so no later prompt hits K/V that was never written."""
        self._bm.forget_computed(_check_int(seq_id, "seq_id"), _check_int(num_tokens, "num_tokens"))

    def fork(self, parent_seq_id: int, child_seq_id: int) -> None:
        """``child_seq_id`` shares every block of ``parent_seq_id`` (parallel sampling, beams);
        the first append into a shared partial block copies it."""
        self._bm.fork(
            _check_int(parent_seq_id, "parent_seq_id"), _check_int(child_seq_id, "child_seq_id")
        )

    def free(self, seq_id: int) -> None:
        """Releases the sequence's blocks (tail first). Cached full blocks stay reusable by
        prefix hits until evicted, least recently released first."""
        self._bm.free(_check_int(seq_id, "seq_id"))

    # ---- hot path --------------------------------------------------------------------------
    def append_slot(self, seq_id: int, token_id: int) -> int:
        """Appends one token to ``seq_id`` and returns its slot (copy-on-write first if the last
        block is shared). Implies every earlier token of the sequence is computed."""
        return self._bm.append_slot(_check_int(seq_id, "seq_id"), _check_int(token_id, "token_id"))

    def append_slots(self, seq_ids: list[int], token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """One decode step: appends ``token_ids[i]`` to ``seq_ids[i]`` for every i, all or nothing.

        Returns:
            slot_mapping: int64 [B], the new tokens' slots.
        """
        if isinstance(token_ids, torch.Tensor):
            token_ids = _token_list(token_ids, "token_ids")
        elif bool in set(map(type, token_ids)):  # TorchScript would take True as 1
            _token_list(token_ids, "token_ids")
        try:
            return self._bm.append_slots(seq_ids, token_ids)
        except RuntimeError as e:
            self._raise_conversion_error(e, seq_ids=seq_ids, token_ids=token_ids)
            raise

    def slot_mapping(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """Slots of positions [start, end) of ``seq_id`` (e.g. a prefill chunk).

        Returns:
            int64 [end - start].
        """
        return self._bm.slot_mapping(
            _check_int(seq_id, "seq_id"), _check_int(start, "start"), _check_int(end, "end")
        )

    def block_tables(self, seq_ids: list[int], max_num_blocks: int = 0) -> torch.Tensor:
        """Block tables of ``seq_ids``.

        Args:
            max_num_blocks: minimum width (e.g. a fixed width for CUDA graphs); the width is
                max(max_num_blocks, longest table).

        Returns:
            int32 [B, width], padded with -1.
        """
        try:
            return self._bm.block_tables(seq_ids, max_num_blocks)
        except RuntimeError as e:
            self._raise_conversion_error(e, seq_ids=seq_ids)
            raise

    def seq_lens(self, seq_ids: list[int]) -> torch.Tensor:
        """Returns int32 [B], each sequence's length (KV length including appended tokens)."""
        try:
            return self._bm.seq_lens(seq_ids)
        except RuntimeError as e:
            self._raise_conversion_error(e, seq_ids=seq_ids)
            raise

    def decode_step(
        self, seq_ids: list[int], token_ids: list[int] | torch.Tensor, max_num_blocks: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """append_slots + block_tables + seq_lens in one C++ call.

        Returns:
            slot_mapping int64 [B], block_tables int32 [B, width] (-1 padded), seq_lens int32 [B].
        """
        if isinstance(token_ids, torch.Tensor):
            token_ids = _token_list(token_ids, "token_ids")
        elif bool in set(map(type, token_ids)):
            _token_list(token_ids, "token_ids")
        try:
            return self._bm.decode_step(seq_ids, token_ids, max_num_blocks)
        except RuntimeError as e:
            self._raise_conversion_error(e, seq_ids=seq_ids, token_ids=token_ids)
            raise

    def take_copies(self) -> torch.Tensor:
        """Drains the pending copy-on-write pairs, in issue order, for kv_paged.ops.copy_blocks.
        A source block stays reserved (not reallocated) until drained, so no pair's dst can
        overwrite another pair's src. Drain once per step, after the appends and before the
        forward; a dst becomes a later pair's src only if fork() is called between appends
        without draining, and then the pairs must be applied in order.

        Returns:
            int64 [n, 2] of (src_block, dst_block).
        """
        return self._bm.take_copies()

    # ---- introspection ---------------------------------------------------------------------
    def has_seq(self, seq_id: int) -> bool:
        return self._bm.has_seq(_check_int(seq_id, "seq_id"))

    def block_table(self, seq_id: int) -> list[int]:
        """Physical block ids of the sequence's logical blocks, in order."""
        return self._bm.block_table(_check_int(seq_id, "seq_id"))

    def seq_len(self, seq_id: int) -> int:
        return self._bm.seq_len(_check_int(seq_id, "seq_id"))

    def num_computed_tokens(self, seq_id: int) -> int:
        """Leading tokens whose KV is known to be written (prefix hits, mark_computed, appends)."""
        return self._bm.num_computed_tokens(_check_int(seq_id, "seq_id"))

    def ref_count(self, block_id: int) -> int:
        """Number of live sequences whose block table holds ``block_id``."""
        return self._bm.ref_count(_check_int(block_id, "block_id"))

    def is_cached(self, block_id: int) -> bool:
        """Whether ``block_id`` is in the prefix cache (matchable by a later prompt)."""
        return self._bm.is_cached(_check_int(block_id, "block_id"))

    def evictable_blocks(self) -> list[int]:
        """Evictable blocks, next victim first. O(evictable): for tests and debugging."""
        return self._bm.evictable_blocks()

    def check_invariants(self) -> None:
        """Recounts the whole state; raises RuntimeError on an inconsistency. O(pool)."""
        self._bm.check_invariants()

    def stats(self) -> dict[str, int]:
        """prefix_queried_tokens, prefix_hit_tokens, evictions, cow_copies, blocks_in_use,
        free_blocks, evictable_blocks, cached_blocks, pending_copies, num_seqs."""
        return dict(self._bm.stats())

    # ---- errors ----------------------------------------------------------------------------
    @staticmethod
    def _raise_conversion_error(error: RuntimeError, **lists: object) -> None:
        """Turns a TorchScript argument-conversion failure into a ValueError naming the argument
        (the C++ call never ran, so nothing changed). Other errors propagate unchanged."""
        for name, value in lists.items():
            try:
                _int_list(value, name)  # type: ignore[arg-type]
            except ValueError as e:
                raise e from error
        if "Expected a value of type" in str(error):
            raise ValueError(str(error)) from error
