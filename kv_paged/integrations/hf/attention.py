"""The "kv_paged" attention and mask functions registered with transformers.

Design: inside a kv_paged forward (kv_paged.forward_context: the Engine's runner or a PagedCache),
attention writes the layer's new K/V into the pool and reads it back through the step's
AttentionMetadata, and the mask function returns None; outside one, the mask function unpads the
dense [B, S] layout once per forward (DenseVarlen) and attention runs varlen flash attention on it.
"paged|kv_paged" serves transformers' own continuous batching through the same function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import masking_utils

from kv_paged import ops
from kv_paged.cache import AttentionParams
from kv_paged.forward_context import ForwardContext, get_forward_context
from kv_paged.integrations.hf.names import ATTN_NAME, PAGED_ATTN_NAME


@dataclasses.dataclass
class DenseVarlen:
    """The "kv_paged" mask for transformers' own caches: how to unpad dense [B, S] Q and [B, S_kv]
    K/V into varlen form. Built once per forward (per mask type) by `kv_paged_mask`."""

    q_index: torch.Tensor | None  # int64 [Tq] into flattened [B * S]; None = no padding
    k_index: torch.Tensor | None  # int64 [Tk] into flattened [B * S_kv]
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]
    cu_seqlens_k: torch.Tensor  # int32 [B + 1]
    max_seqlen_q: int
    max_seqlen_k: int
    q_length: int
    kv_length: int


def _is_causal_or_sliding(mask_function: Any) -> bool:
    """Whether transformers' mask_function is its plain causal or sliding-window causal mask (the
    only patterns varlen attention reproduces); packed-sequence and overlay masks are not."""
    causal = masking_utils.causal_mask_function
    if mask_function is None or mask_function is causal:
        return True
    closure = getattr(mask_function, "__closure__", None)
    if getattr(mask_function, "__name__", "") != "and_mask" or not closure:
        return False
    parts = closure[0].cell_contents
    return (
        isinstance(parts, tuple)
        and len(parts) == 2
        and parts[1] is causal
        and getattr(parts[0], "__qualname__", "").startswith("sliding_window_overlay.")
    )


def kv_paged_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> DenseVarlen | None:
    """AttentionMaskInterface function for "kv_paged". With a PagedCache the forward's metadata
    already holds the batch layout, so this returns None; otherwise it returns a DenseVarlen.

    attention_mask: bool [B, >= kv_length] (left padding only) or None.
    """
    if get_forward_context() is not None:
        return None
    if kwargs.get("use_vmap") or not _is_causal_or_sliding(mask_function):
        raise NotImplementedError(
            "kv_paged attention supports causal and sliding-window masks only, not custom mask "
            "functions (or_mask / and_mask overlays, packed sequences, bidirectional)"
        )
    device = kwargs.get("device")
    if attention_mask is not None:
        device = attention_mask.device
        mask = attention_mask[:, -kv_length:].bool()
        if mask.shape[1] != kv_length:
            raise ValueError(
                f"attention_mask has {mask.shape[1]} columns, fewer than kv_length={kv_length}"
            )
        pads = (~mask).sum(dim=1)
        expected = torch.arange(kv_length, device=device)[None, :] >= pads[:, None]
        if not torch.equal(mask, expected):
            raise ValueError(
                "kv_paged attention supports left padding only (attention_mask rows 0...0 1...1)"
            )
        if bool(mask.all()):
            mask = None
    else:
        mask = None
    if mask is None:
        q_lens = torch.full((batch_size,), q_length, dtype=torch.int32, device=device)
        k_lens = torch.full((batch_size,), kv_length, dtype=torch.int32, device=device)
        q_index = k_index = None
    else:
        q_mask = mask[:, -q_length:]
        q_lens, k_lens = q_mask.sum(dim=1, dtype=torch.int32), mask.sum(dim=1, dtype=torch.int32)
        q_index = q_mask.reshape(-1).nonzero().squeeze(1)
        k_index = mask.reshape(-1).nonzero().squeeze(1)
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    return DenseVarlen(
        q_index=q_index,
        k_index=k_index,
        cu_seqlens_q=torch.cat([zero, q_lens.cumsum(0, dtype=torch.int32)]),
        cu_seqlens_k=torch.cat([zero, k_lens.cumsum(0, dtype=torch.int32)]),
        max_seqlen_q=int(q_lens.max()) if batch_size else 0,
        max_seqlen_k=int(k_lens.max()) if batch_size else 0,
        q_length=q_length,
        kv_length=kv_length,
    )


def _attention_params(
    module: torch.nn.Module, scaling: float | None, kwargs: dict
) -> AttentionParams:
    """The layer's parameters, normalised here once: transformers passes the window and softcap
    per call (or sets module.sliding_window), as None, 0 or a positive number."""
    return AttentionParams.of(
        scale=scaling,
        sliding_window=kwargs.get("sliding_window", getattr(module, "sliding_window", None)),
        softcap=kwargs.get("softcap", None),
    )


def _is_continuous_batching_cache(cache: Any) -> bool:
    """transformers' own continuous-batching cache (passed to attention as kwargs["cache"])."""
    return cache is not None and type(cache).__name__ == "PagedAttentionCache"


def kv_paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function for "kv_paged".

    query: [B, num_heads, S, head_dim]; key/value: [B, num_kv_heads, S_kv, head_dim] (with a
    PagedCache: only this step's K/V, already written to the pool by update()).
    Returns ([B, S, num_heads, head_dim], None); rows at padding positions are zeros.
    """
    if dropout and module.training:
        raise NotImplementedError(
            "kv_paged attention does not implement attention dropout (training)"
        )
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            "kv_paged attention cannot return attention weights (output_attentions)"
        )
    if _is_continuous_batching_cache(kwargs.get("cache")):
        return _continuous_batching_attention(module, query, key, value, scaling, kwargs)
    params = _attention_params(module, scaling, kwargs)
    bsz, heads, seq, dim = query.shape
    q = query.transpose(1, 2).reshape(bsz * seq, heads, dim)
    context = get_forward_context()
    if context is not None:
        return _paged_attention(context, module.layer_idx, q, key, value, params).view(
            bsz, seq, heads, -1
        ), None

    if getattr(module.config, "_attn_implementation", None) == PAGED_ATTN_NAME:
        raise ValueError(
            f"'{PAGED_ATTN_NAME}' serves transformers' continuous batching (generate_batch) or a "
            f"PagedCache; use attn_implementation='{ATTN_NAME}' for a standard forward"
        )
    if attention_mask is not None and not isinstance(attention_mask, DenseVarlen):
        raise ValueError(
            "kv_paged attention got a mask it did not build (a custom 4D mask?): it supports causal "
            "and sliding-window attention with a 2D left-padding attention_mask"
        )
    kv_len = key.shape[2]
    varlen = attention_mask
    if varlen is None or varlen.q_length != seq or varlen.kv_length != kv_len:
        varlen = kv_paged_mask(bsz, seq, kv_len, device=query.device)
    kv_heads = key.shape[1]
    k = key.transpose(1, 2).reshape(bsz * kv_len, kv_heads, dim)
    v = value.transpose(1, 2).reshape(bsz * kv_len, kv_heads, value.shape[-1])
    if varlen.q_index is not None:
        q = q.index_select(0, varlen.q_index)
        k, v = k.index_select(0, varlen.k_index), v.index_select(0, varlen.k_index)
    out = ops.flash_attention(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        varlen.cu_seqlens_q,
        varlen.cu_seqlens_k,
        varlen.max_seqlen_q,
        varlen.max_seqlen_k,
        scale=params.scale,
        causal=bool(kwargs.get("is_causal", getattr(module, "is_causal", True))),
        sliding_window=params.sliding_window,
        softcap=params.softcap,
    )
    if varlen.q_index is not None:
        out = out.new_zeros((bsz * seq, *out.shape[1:])).index_copy_(0, varlen.q_index, out)
    return out.view(bsz, seq, heads, -1), None


def _paged_attention(
    context: ForwardContext,
    layer_idx: int,
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    params: AttentionParams,
) -> torch.Tensor:
    """The step's new K/V into the pool, then attention over each sequence's blocks.

    q: [num_rows, num_heads, head_dim] in the model's flattened input layout; key/value:
    [B, num_kv_heads, S, head_dim], this step's only. Returns [num_rows, num_heads, head_dim].
    """
    meta, pool = context.meta, context.pool
    bsz, kv_heads, seq, dim = key.shape
    k = meta.pack(key.transpose(1, 2).reshape(bsz * seq, kv_heads, dim))
    v = meta.pack(value.transpose(1, 2).reshape(bsz * seq, kv_heads, value.shape[-1]))
    pool.write(layer_idx, k, v, meta)
    out = pool.attend(layer_idx, meta.pack(q), meta, params, key=k, value=v)
    return meta.unpack(out)


def _continuous_batching_attention(module, query, key, value, scaling, kwargs):
    """transformers' own continuous batching ("paged|kv_paged", transformers 5.17-5.22): K/V go
    through its PagedAttentionCache (kwargs["cache"]), which returns each sequence's past + new K/V
    packed as [Tk, num_kv_heads, head_dim] in cu_seq_lens_k order; attention runs on kv_paged's
    varlen flash attention. query: [1, num_heads, T, head_dim].
    Returns ([1, T, num_heads, head_dim], None).
    """
    cache = kwargs["cache"]
    params = _attention_params(module, scaling, kwargs)
    cu_k = kwargs["cu_seq_lens_k"]
    max_k = kwargs.get("max_seqlen_k", kwargs.get("max_length_k"))
    if isinstance(cu_k, dict):
        layer_type = "sliding_attention" if params.sliding_window is not None else "full_attention"
        cu_k, max_k = cu_k[layer_type], max_k[layer_type]
    cu_q = kwargs["cu_seq_lens_q"]
    max_q = kwargs.get("max_seqlen_q", kwargs.get("max_length_q"))
    k, v = cache.update(
        key_states=key,
        value_states=value,
        layer_idx=module.layer_idx,
        read_index=kwargs["read_index"],
        write_index=kwargs["write_index"],
    )
    q = query.transpose(1, 2).squeeze(0)
    out = ops.flash_attention(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        cu_q.to(torch.int32),
        cu_k.to(torch.int32),
        int(max_q),
        int(max_k),
        scale=params.scale,
        causal=True,
        sliding_window=params.sliding_window,
        softcap=params.softcap,
    )
    return out.unsqueeze(0), None


def no_mask(*args, **kwargs) -> None:
    """Mask function of "paged|kv_paged": continuous batching passes cu_seq_lens, no mask is read."""
