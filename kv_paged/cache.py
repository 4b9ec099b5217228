"""Paged KV pools (one k/v pair per decoder layer), the per-step attention metadata and the
attention parameters of a layer.

One `AttentionMetadata` describes a whole forward step (a packed varlen batch of prefill chunks
and decode rows) and is shared by every layer: it is built once per step, never once per layer.
Framework-free: kv_paged/integrations/hf/ and kv_paged/engine/ both drive models through it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from kv_paged import ops
from kv_paged.cascade import CascadePlan, cascade_attention, plan_cascade
from kv_paged.host_memory import full_on_huge_pages

__all__ = ["AttentionMetadata", "AttentionParams", "KVCachePool", "blocks_needed"]


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
        cascade:       CascadePlan or None. Groups of sequences whose tables share leading blocks
                       (kv_paged.cascade): layers without a sliding window attend through it.
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
    cascade: CascadePlan | None = None

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
        cascade_block_size: int | None = None,
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
            cascade_block_size: the tables' block size to plan cascade attention over them
                          (kv_paged.cascade.plan_cascade); None: no plan.
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
        plan = None
        if cascade_block_size is not None and total > 0 and total != sum(kv_lens):
            plan = plan_cascade(block_tables, query_lens, kv_lens, cascade_block_size)
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
            cascade=None if plan is None else plan.to(device),
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


@dataclasses.dataclass(frozen=True)
class AttentionParams:
    """A layer's attention parameters, normalised once (`AttentionParams.of`); later layers trust
    them. scale: None = 1 / sqrt(head_dim). sliding_window: None = off, else > 0 (the query at kv
    position p sees keys in (p - w, p]). softcap: None = off, else > 0 (logits -> c * tanh(x / c))."""

    scale: float | None = None
    sliding_window: int | None = None
    softcap: float | None = None

    @classmethod
    def of(
        cls,
        scale: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> AttentionParams:
        """From the loose forms models use: a window or softcap of None, 0 or below means off."""
        return cls(
            scale=None if scale is None else float(scale),
            sliding_window=int(sliding_window)
            if sliding_window is not None and sliding_window > 0
            else None,
            softcap=float(softcap) if softcap is not None and softcap > 0 else None,
        )


class KVCachePool:
    """The K/V block pools of every layer plus the attention over them.

    k_caches[l], v_caches[l]: [num_blocks, block_size, num_kv_heads, head_dim] (head counts and
    head_dim may differ per layer). Pools start as NaN so a read of an unwritten slot is loud; on
    the CPU they sit on transparent huge pages where the system allows (host_memory.py).
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
            for caches in (self.k_caches, self.v_caches):
                caches.append(
                    full_on_huge_pages(shape, float("nan"), dtype=dtype, device=self.device)
                )

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
        params: AttentionParams,
        *,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of the step's packed queries over each sequence's cached KV.

        query: [T, num_heads, head_dim]; key/value: [T, num_kv_heads, head_dim], this step's new
        K/V, only used on a no-prefix step (flash attention on them, no pool read).
        Returns [T, num_heads, head_dim].
        """
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
                scale=params.scale,
                causal=True,
                sliding_window=params.sliding_window,
                softcap=params.softcap,
            )
        if meta.cascade is not None and params.sliding_window is None:
            # A window would cut into the shared prefix: such layers take the plain path.
            return cascade_attention(
                query,
                self.k_caches[layer_idx],
                self.v_caches[layer_idx],
                meta.block_tables,
                meta.cu_seqlens_q,
                meta.seq_lens_kv,
                meta.cascade,
                scale=params.scale,
                causal=True,
                softcap=params.softcap,
            )
        return ops.paged_attention(
            query,
            self.k_caches[layer_idx],
            self.v_caches[layer_idx],
            meta.block_tables,
            meta.cu_seqlens_q,
            meta.seq_lens_kv,
            scale=params.scale,
            causal=True,
            sliding_window=params.sliding_window,
            softcap=params.softcap,
            max_seqlen_kv=meta.max_seqlen_kv,
        )

    def copy_blocks(self, block_mapping: torch.Tensor) -> None:
        """Apply copy-on-write copies (BlockManager.take_copies(): int64 [n, 2]) to every layer."""
        if block_mapping.numel():
            ops.copy_blocks(self.k_caches, self.v_caches, block_mapping.to(self.device))


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """ceil(num_tokens / block_size): the blocks a sequence of num_tokens tokens occupies."""
    return math.ceil(num_tokens / block_size)
