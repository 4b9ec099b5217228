"""Typed Python wrappers over torch.ops.kv_paged.* plus a fake (meta) implementation of each op,
so the ops trace under torch.compile(fullgraph=True) and pass torch.library.opcheck.

Conventions (shared with the CUDA kernels, see csrc/torch_bindings.cpp):
  k_cache / v_cache: [num_blocks, block_size, num_kv_heads, head_dim], slot = block * block_size + offset.
  Packed varlen: sequence i owns rows [cu_seqlens[i], cu_seqlens[i + 1]).
  scale None -> 1 / sqrt(head_dim); sliding_window None or <= 0 -> off, else the query at kv position
  p sees keys in (p - w, p]; softcap None or <= 0 -> off, else logits -> c * tanh(logits / c).
dtypes: float32, float16, bfloat16 (fp32 accumulation inside).
Autograd: flash_attention is differentiable (register_autograd below); paged_attention is
inference-only and its backward raises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "reshape_and_cache",
    "paged_attention",
    "flash_attention",
    "flash_attention_backward",
    "copy_blocks",
    "swap_blocks",
    "shared_prefix_attention",
    "paged_attention_lse",
    "merge_attention_states",
]

_ops = torch.ops.kv_paged


def _scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _window(sliding_window: int | None) -> int:
    return 0 if sliding_window is None or sliding_window <= 0 else int(sliding_window)


def _softcap(softcap: float | None) -> float:
    return 0.0 if softcap is None or softcap <= 0 else float(softcap)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes new keys/values into the paged pools, in place.

    key, value:   [num_tokens, num_kv_heads, head_dim] (any strides but a contiguous head_dim)
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], same dtype as key
    slot_mapping: int64 [num_tokens]; token t goes to slot slot_mapping[t]; -1 skips the token.
    """
    _ops.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens_kv: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    max_seqlen_kv: int | None = None,
) -> torch.Tensor:
    """Attention of packed queries against the paged KV cache: decode rows (one query per sequence)
    and chunked-prefill rows (many) mixed in one call.

    query:        [total_q, num_heads, head_dim]
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]; num_heads % num_kv_heads == 0
    block_tables: int32 [B, max_blocks]; entries past a sequence's last block are ignored (e.g. -1)
    cu_seqlens_q: int32 [B + 1]; sequence i's queries are rows [cu_seqlens_q[i], cu_seqlens_q[i + 1])
    seq_lens_kv:  int32 [B]; kv length including the new tokens (already written by reshape_and_cache)
    returns:      [total_q, num_heads, head_dim], query's dtype, contiguous

    Sequence i's q_len_i queries are its last q_len_i kv positions (bottom-right causal alignment);
    q_len_i may be 0; q_len_i > seq_lens_kv[i] is an error. causal=False lets every query see all
    seq_lens_kv[i] keys (the sliding window still bounds from the left).
    max_seqlen_kv: max(seq_lens_kv) if the caller knows it on the host (AttentionMetadata does):
    the CUDA decode kernel sizes its KV splits from it instead of block_tables' width. Checked
    against seq_lens_kv on CPU; on CUDA a value below the truth is not detected (that would need a
    sync) and only costs parallelism, never correctness.
    """
    return _ops.paged_attention(
        query,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        seq_lens_kv,
        _scale(scale, query.shape[-1]),
        causal,
        _window(sliding_window),
        _softcap(softcap),
        -1 if max_seqlen_kv is None else int(max_seqlen_kv),
    )


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Varlen attention over contiguous (not paged) q/k/v, tile by tile with an online softmax:
    memory O(N), never the [q_len, k_len] score matrix.

    q:            [total_q, num_heads, head_dim]
    k, v:         [total_k, num_kv_heads, head_dim]; num_heads % num_kv_heads == 0
    cu_seqlens_q, cu_seqlens_k: int32 [B + 1]
    max_seqlen_q, max_seqlen_k: upper bounds of the per-sequence lengths
    returns:      [total_q, num_heads, head_dim], q's dtype, contiguous

    When q_len != k_len, causal alignment is bottom-right (FlashAttention 2): query i sits at kv
    position k_len - q_len + i; a query row that sees no key outputs zeros.

    Differentiable in q, k, v (eager and torch.compile): when a gradient is needed the forward also
    saves each row's log-sum-exp and the backward recomputes the probabilities tile by tile
    (flash_attention_backward), so training memory stays O(N) as well.
    """
    args = (
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        _scale(scale, q.shape[-1]),
        causal,
        _window(sliding_window),
        _softcap(softcap),
    )
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _ops.flash_attention_forward(*args)[0]
    return _ops.flash_attention(*args)


def flash_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of flash_attention (the autograd formula calls this; exposed for benchmarks).

    dout, out:    [total_q, num_heads, head_dim] (out: the forward's output)
    lse:          float32 [total_q, num_heads] from torch.ops.kv_paged.flash_attention_forward
    other args:   as flash_attention
    returns:      (dq [total_q, num_heads, head_dim], dk, dv [total_k, num_kv_heads, head_dim]),
                  contiguous, q's dtype; dk/dv are summed over each GQA group.
    """
    return _ops.flash_attention_backward(
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        _scale(scale, q.shape[-1]),
        causal,
        _window(sliding_window),
        _softcap(softcap),
    )


def copy_blocks(
    k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor], block_mapping: torch.Tensor
) -> None:
    """Copies block src -> dst in every layer's pools, in place (the block manager's copy-on-write).

    k_caches, v_caches: one [num_blocks, block_size, num_kv_heads, head_dim] tensor per layer
    block_mapping: int64 [n, 2] of (src, dst) block ids; destinations distinct and not sources.
    """
    _ops.copy_blocks(list(k_caches), list(v_caches), block_mapping)


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copies whole blocks between two pools that may live on different devices (offload), in place.

    src: [num_src_blocks, *block_shape]; dst: [num_dst_blocks, *block_shape], same dtype
    block_mapping: int64 [n, 2] of (src_block, dst_block), on the CPU; destinations distinct.
    """
    _ops.swap_blocks(src, dst, block_mapping)


def shared_prefix_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    cu_group_rows: torch.Tensor,
    group_rows: torch.Tensor,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of groups of query rows, each group against ONE shared run of prefix blocks, as a
    batched multi-query pass (each prefix K/V row is read once per kv head and row chunk, not once
    per sequence). No mask: the caller guarantees the prefix lies before every query of the group.

    query:               [total_q, num_heads, head_dim]
    k_cache, v_cache:    [num_blocks, block_size, num_kv_heads, head_dim]
    prefix_block_tables: int32 [G, max_prefix_blocks]; group g's prefix blocks in order
    prefix_lens:         int32 [G]; group g attends to kv positions [0, prefix_lens[g]) of its run
                         (may end mid-block: positions past it are never read)
    cu_group_rows:       int32 [G + 1]; group g's rows are group_rows[cu[g]:cu[g + 1]]
    group_rows:          int32 [R]; query row ids, each in at most one group
    returns (out, lse):  fp32 [total_q, num_heads, head_dim] normalised over the prefix and fp32
                         [total_q, num_heads] log-sum-exp of the (scaled, capped) logits; rows in
                         no group (or with an empty prefix) get (0, -inf).
    """
    return _ops.shared_prefix_attention(
        query,
        k_cache,
        v_cache,
        prefix_block_tables,
        prefix_lens,
        cu_group_rows,
        group_rows,
        _scale(scale, query.shape[-1]),
        _softcap(softcap),
    )


def paged_attention_lse(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens_kv: torch.Tensor,
    kv_start: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """paged_attention restricted to each sequence's kv positions [kv_start[i], seq_lens_kv[i])
    (the suffix after a shared prefix), returning the attention state instead of a cast output.

    Arguments as paged_attention, plus kv_start: int32 [B], 0 <= kv_start[i] <= seq_lens_kv[i]
    (equal: an empty suffix). Returns (out fp32 [total_q, num_heads, head_dim], lse fp32
    [total_q, num_heads]); a row that sees no key gets (0, -inf).
    """
    return _ops.paged_attention_lse(
        query,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        seq_lens_kv,
        kv_start,
        _scale(scale, query.shape[-1]),
        causal,
        _window(sliding_window),
        _softcap(softcap),
    )


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state of attention over the union of two disjoint key sets, from the two states:
    out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b), lse = log(e^lse_a + e^lse_b).

    out_a, out_b: fp32 [total_q, num_heads, head_dim]; lse_a, lse_b: fp32 [total_q, num_heads],
    all contiguous. A side with lse -inf contributes nothing (its out is never read).
    """
    return _ops.merge_attention_states(out_a, lse_a, out_b, lse_b)


# ---- fake implementations: shapes only, for FakeTensor tracing / torch.compile -----------------


def _check_same_device(first: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        torch._check(
            t.device == first.device,
            lambda: f"{name}: expected a tensor on {first.device}, got {t.device}",  # noqa: B023
        )


@torch.library.register_fake("kv_paged::reshape_and_cache")
def _reshape_and_cache_fake(key, value, k_cache, v_cache, slot_mapping) -> None:
    _check_same_device(
        key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping
    )
    return None


@torch.library.register_fake("kv_paged::paged_attention")
def _paged_attention_fake(
    query,
    k_cache,
    v_cache,
    block_tables,
    cu_seqlens_q,
    seq_lens_kv,
    scale,
    causal,
    sliding_window,
    softcap,
    max_seqlen_kv=-1,
) -> torch.Tensor:
    torch._check(query.dim() == 3, lambda: "query: expected [total_q, num_heads, head_dim]")
    _check_same_device(
        query,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        cu_seqlens_q=cu_seqlens_q,
        seq_lens_kv=seq_lens_kv,
    )
    return query.new_empty(query.shape)


@torch.library.register_fake("kv_paged::flash_attention")
def _flash_attention_fake(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    causal,
    sliding_window,
    softcap,
) -> torch.Tensor:
    torch._check(q.dim() == 3, lambda: "q: expected [total_q, num_heads, head_dim]")
    _check_same_device(q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return q.new_empty(q.shape)


@torch.library.register_fake("kv_paged::flash_attention_forward")
def _flash_attention_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, *args):
    out = _flash_attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, *args)
    return out, q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)


@torch.library.register_fake("kv_paged::flash_attention_backward")
def _flash_attention_backward_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *args):
    torch._check(q.dim() == 3, lambda: "q: expected [total_q, num_heads, head_dim]")
    torch._check(k.dim() == 3, lambda: "k: expected [total_k, num_kv_heads, head_dim]")
    _check_same_device(
        q,
        dout=dout,
        k=k,
        v=v,
        out=out,
        lse=lse,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
    )
    return q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape)


@torch.library.register_fake("kv_paged::copy_blocks")
def _copy_blocks_fake(k_caches, v_caches, block_mapping) -> None:
    return None


@torch.library.register_fake("kv_paged::swap_blocks")
def _swap_blocks_fake(src, dst, block_mapping) -> None:
    return None


def _state_like(query) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        query.new_empty(query.shape, dtype=torch.float32),
        query.new_empty(query.shape[:2], dtype=torch.float32),
    )


@torch.library.register_fake("kv_paged::shared_prefix_attention")
def _shared_prefix_attention_fake(
    query,
    k_cache,
    v_cache,
    prefix_block_tables,
    prefix_lens,
    cu_group_rows,
    group_rows,
    scale,
    softcap,
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(query.dim() == 3, lambda: "query: expected [total_q, num_heads, head_dim]")
    _check_same_device(
        query,
        k_cache=k_cache,
        v_cache=v_cache,
        prefix_block_tables=prefix_block_tables,
        prefix_lens=prefix_lens,
        cu_group_rows=cu_group_rows,
        group_rows=group_rows,
    )
    return _state_like(query)


@torch.library.register_fake("kv_paged::paged_attention_lse")
def _paged_attention_lse_fake(
    query,
    k_cache,
    v_cache,
    block_tables,
    cu_seqlens_q,
    seq_lens_kv,
    kv_start,
    scale,
    causal,
    sliding_window,
    softcap,
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(query.dim() == 3, lambda: "query: expected [total_q, num_heads, head_dim]")
    _check_same_device(
        query,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        cu_seqlens_q=cu_seqlens_q,
        seq_lens_kv=seq_lens_kv,
        kv_start=kv_start,
    )
    return _state_like(query)


@torch.library.register_fake("kv_paged::merge_attention_states")
def _merge_attention_states_fake(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(out_a.dim() == 3, lambda: "out_a: expected [total_q, num_heads, head_dim]")
    _check_same_device(out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    return torch.empty_like(out_a), torch.empty_like(lse_a)


# ---- autograd --------------------------------------------------------------------------------
# flash_attention_forward saves (q, k, v, out, lse); its backward is one flash_attention_backward
# call. The plain flash_attention op (no lse) is differentiable too: its backward first reruns the
# forward for the lse. The non-tensor arguments (max_seqlen_*, scale, causal, window, softcap) are
# inputs 5..10 of both ops and pass through unchanged.


def _flash_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens_q, cu_seqlens_k = inputs[:5]
    if isinstance(output, tuple):
        out, lse = output
        ctx.mark_non_differentiable(lse)
    else:
        out, lse = output, None
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.scalars = tuple(inputs[5:])


def _flash_backward(ctx, grad_out, *unused):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if lse is None:
        out, lse = _ops.flash_attention_forward(q, k, v, cu_q, cu_k, *ctx.scalars)
    dq, dk, dv = _ops.flash_attention_backward(
        grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.scalars
    )
    return (dq, dk, dv) + (None,) * (2 + len(ctx.scalars))


def _paged_attention_backward(ctx, grad_out):
    raise RuntimeError(
        "paged_attention is inference-only: it has no backward (its K/V live in a KV-cache pool "
        "written in place). To train, run the model without a PagedCache / Engine, where "
        'attn_implementation="kv_paged" uses the differentiable flash_attention'
    )


torch.library.register_autograd(
    "kv_paged::flash_attention_forward", _flash_backward, setup_context=_flash_setup_context
)
torch.library.register_autograd(
    "kv_paged::flash_attention", _flash_backward, setup_context=_flash_setup_context
)


def _no_context(ctx, inputs, output) -> None:
    return None


torch.library.register_autograd(
    "kv_paged::paged_attention", _paged_attention_backward, setup_context=_no_context
)
