"""HuggingFace transformers integration: "kv_paged" attention, a paged `Cache`, tiny test models.

The only module that imports transformers. Design: `PagedCache.for_model(model)` hooks the model's
forward; the hook sees input_ids + attention_mask, books blocks in the BlockManager and builds ONE
AttentionMetadata per forward; each layer's `update()` writes K/V into its pool and the attention
function reads them back through kv_paged.ops. Without a PagedCache, "kv_paged" still works on
transformers' own caches (varlen flash attention on the unpadded dense K/V).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import torch

import kv_paged
from kv_paged.cache import AttentionMetadata, KVCachePool, PaddedBatch

try:
    import transformers
    from transformers import cache_utils, masking_utils, modeling_utils
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "kv_paged.integrations.hf needs transformers>=5.17 (`pip install kv_paged[hf]`)"
    ) from e

ATTN_NAME = "kv_paged"
PAGED_ATTN_NAME = "paged|kv_paged"
MIN_TRANSFORMERS = (5, 17)


def _check_transformers() -> None:
    """Raise a clear ImportError when the integration points this module needs are missing."""
    version = transformers.__version__
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        major_minor = MIN_TRANSFORMERS
    missing = [
        name
        for owner, name in (
            (modeling_utils, "AttentionInterface"),
            (modeling_utils, "ALL_ATTENTION_FUNCTIONS"),
            (masking_utils, "AttentionMaskInterface"),
            (masking_utils, "ALL_MASK_ATTENTION_FUNCTIONS"),
            (cache_utils, "Cache"),
            (cache_utils, "CacheLayerMixin"),
        )
        if not hasattr(owner, name)
    ]
    if major_minor < MIN_TRANSFORMERS or missing:
        raise ImportError(
            f"kv_paged's transformers integration needs transformers>=5.17 with AttentionInterface, "
            f"AttentionMaskInterface and cache_utils.CacheLayerMixin; the installed transformers "
            f"{version} lacks {missing or 'the minimum version'}."
        )


_check_transformers()

Cache = cache_utils.Cache
CacheLayerMixin = cache_utils.CacheLayerMixin
_HAS_CB_PAGED_NAMES = "paged|eager" in modeling_utils.AttentionInterface._global_mapping and any(
    key.startswith("paged|") and key != "paged|eager"
    for key in modeling_utils.AttentionInterface._global_mapping
)

# The PagedCache whose forward is running on this thread (None outside a hooked forward).
_state = threading.local()


def _active_cache() -> PagedCache | None:
    return getattr(_state, "cache", None)


# ---------------------------------------------------------------------------------------------
# PagedCache
# ---------------------------------------------------------------------------------------------


class PagedLayer(CacheLayerMixin):
    """One decoder layer's view of a PagedCache: K/V live in the shared pool, not in this object."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, cache: PagedCache, layer_idx: int, sliding_window: int | None) -> None:
        super().__init__()
        self._cache = cache
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._cache._write(self.layer_idx, key_states, value_states)

    def get_seq_length(self) -> int:
        return self._cache.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("PagedCache does not support beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PagedCache does not support crop (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError(
            "PagedCache does not support batch_repeat_interleave: expand the prompts before generate"
        )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("PagedCache does not support batch_select_indices")


class PagedCache(Cache):
    """A transformers `Cache` whose K/V live in kv_paged block pools, managed by a BlockManager.

    Use it with a model whose attention implementation is "kv_paged":

        cache = PagedCache.for_model(model, num_blocks=256, block_size=16)
        out = model.generate(input_ids, attention_mask=mask, past_key_values=cache)
        cache.reset()                          # frees the batch; full blocks stay prefix-cached
        cache.add_prompts(ids2, mask2)         # books the next prompts, reusing cached prefixes
        out2 = model.generate(ids2, attention_mask=mask2, past_key_values=cache)  # runs the rest

    Two ways to drive it:
      * generate / a hand-written loop: each forward's input_ids [B, S] (left-padded, with the
        2D attention_mask over past + new columns) extends the cache's batch; pad tokens are never
        written nor attended. The first forward after reset() starts a new batch.
      * an engine: `set_step(meta)` before a forward on packed input_ids [1, T] with explicit
        position_ids; the engine owns sequence bookkeeping in `cache.block_manager`.
    """

    def __init__(
        self,
        pool: KVCachePool,
        block_manager: Any = None,
        *,
        sliding_windows: Sequence[int | None] | None = None,
    ) -> None:
        """pool: the K/V pools (one pair per decoder layer). block_manager: a kv_paged.BlockManager
        over the same num_blocks / block_size, needed by the generate / hand-loop path; None for an
        engine that books blocks itself and only calls set_step(). sliding_windows: per layer,
        informational (the attention takes each layer's window from the model)."""
        if not isinstance(pool, KVCachePool):
            raise TypeError(f"pool must be a kv_paged.cache.KVCachePool, got {type(pool).__name__}")
        if block_manager is not None and (
            block_manager.num_blocks != pool.num_blocks
            or block_manager.block_size != pool.block_size
        ):
            raise ValueError(
                f"block_manager has num_blocks={block_manager.num_blocks}, block_size="
                f"{block_manager.block_size}; the pool has {pool.num_blocks}, {pool.block_size}"
            )
        self.pool = pool
        self.block_manager = block_manager
        num_layers = pool.num_layers
        windows = list(sliding_windows) if sliding_windows is not None else [None] * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"sliding_windows needs {num_layers} entries, got {len(windows)}")
        self.sliding_windows = [w if w is not None and w > 0 else None for w in windows]
        layers = [PagedLayer(self, i, w) for i, w in enumerate(self.sliding_windows)]
        super().__init__(layers=layers)
        self._batch: PaddedBatch | None = None  # the generate / hand-loop batch
        self._next_seq_id = 0
        self._meta: AttentionMetadata | None = None
        self._external_meta: AttentionMetadata | None = None
        self._stepping = False  # the running forward is a PaddedBatch step (not an engine step)
        self._new_kv: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._owner: torch.nn.Module | None = None
        self._broken: str | None = None

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int = 16,
        *,
        enable_prefix_caching: bool = True,
        block_manager: Any = None,
        dtype: torch.dtype | None = None,
    ) -> PagedCache:
        """A cache sized from model.config (layers, kv heads, head_dim, sliding windows, dtype,
        device) and hooked into model's forward."""
        spec = kv_cache_spec(model)
        pool = KVCachePool(
            num_layers=len(spec["num_kv_heads"]),
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=spec["num_kv_heads"],
            head_dim=spec["head_dim"],
            dtype=dtype or spec["dtype"],
            device=spec["device"],
        )
        if block_manager is None:
            block_manager = kv_paged.BlockManager(num_blocks, block_size, enable_prefix_caching)
        cache = cls(pool, block_manager, sliding_windows=spec["sliding_windows"])
        attach(model)
        return cache

    @classmethod
    def for_engine(cls, model: torch.nn.Module, pool: KVCachePool) -> PagedCache:
        """A cache over an engine's pool, hooked into model; the engine drives every forward with
        set_step(meta) and owns the BlockManager."""
        cache = cls(pool, None, sliding_windows=kv_cache_spec(model)["sliding_windows"])
        attach(model)
        return cache

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def seq_ids(self) -> list[int]:
        """BlockManager sequence id of each batch row (generate / hand-loop path)."""
        return [] if self._batch is None else self._batch.seq_ids

    # -- batch lifecycle -----------------------------------------------------------------------

    def reset(self) -> None:
        """Free the current batch. Its computed full blocks stay matchable by the prefix cache."""
        if self._batch is not None:
            self._batch.free()
        self._batch = None
        self._meta = self._external_meta = self._new_kv = None
        self._stepping = False
        self._broken = None

    def add_prompts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> int:
        """Start a new batch: book blocks for each (left-padded) prompt, reusing prefix-cached ones.

        input_ids: int [B, L]; attention_mask: [B, L] of 0/1, left padding only (or None).
        Returns the number of leading columns already in the cache (what get_seq_length() reports,
        so generate runs only input_ids[:, returned:]); always < L.
        """
        self._check_usable()
        if self.block_manager is None:
            raise RuntimeError("this PagedCache has no BlockManager (built for an engine)")
        if self._batch is not None:
            raise RuntimeError(
                "PagedCache already holds a batch; call cache.reset() before add_prompts()"
            )
        batch = PaddedBatch(self.block_manager, first_seq_id=self._next_seq_id)
        columns = batch.add_prompts(input_ids, attention_mask)
        self._batch, self._next_seq_id = batch, batch.next_seq_id
        return columns

    def set_step(self, meta: AttentionMetadata | None) -> None:
        """Engine path: the next forward (packed input_ids [1, T] with explicit position_ids) uses
        `meta` as is, with no sequence bookkeeping here. None clears a step that was not run."""
        if meta is not None and not isinstance(meta, AttentionMetadata):
            raise TypeError(
                f"meta must be a kv_paged.cache.AttentionMetadata or None, got {type(meta).__name__}"
            )
        self._external_meta = meta

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._batch.columns if self._batch is not None else 0

    # -- per-forward metadata ------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(
                f"PagedCache is unusable after a failed forward ({self._broken}); call reset()"
            )

    def _begin_step(self, input_ids: torch.Tensor | None, attention_mask: Any) -> None:
        self._check_usable()
        if self._external_meta is not None:
            self._meta, self._external_meta = self._external_meta, None
            self._stepping = False
            return
        if self.block_manager is None:
            raise RuntimeError(
                "this PagedCache has no BlockManager (built for an engine): call set_step(meta) before "
                "each forward, or build it with PagedCache.for_model(model, num_blocks=...)"
            )
        if self._batch is None:
            self._batch = PaddedBatch(self.block_manager, first_seq_id=self._next_seq_id)
        try:
            self._meta = self._batch.begin_step(input_ids, attention_mask, device=self.pool.device)
        finally:
            self._next_seq_id = self._batch.next_seq_id
            if not self._batch.seq_ids:
                self._batch = None
        self._stepping = True

    def _end_step(self, ok: bool) -> None:
        stepping, self._stepping = self._stepping, False
        self._meta = self._new_kv = None
        if not stepping:
            return
        if ok:
            self._batch.commit_step()
        else:  # the BlockManager already holds this step's tokens, their K/V may be half written
            self._broken = "a forward raised"

    def _write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        """key, value: [B, num_kv_heads, S, head_dim] -> pool; returned unchanged."""
        meta = self._meta
        if meta is None or _active_cache() is not self:
            raise RuntimeError(
                "PagedCache.update() ran outside a forward hooked by kv_paged: build the cache with "
                "PagedCache.for_model(model, ...) (or call kv_paged.integrations.hf.attach(model)) and "
                "pass it as past_key_values to that model"
            )
        bsz, heads, seq, dim = key.shape
        k = meta.pack(key.transpose(1, 2).reshape(bsz * seq, heads, dim))
        v = meta.pack(value.transpose(1, 2).reshape(bsz * seq, heads, value.shape[-1]))
        self.pool.write(layer_idx, k, v, meta)
        self._new_kv = (layer_idx, k, v)
        return key, value


def _sliding_windows(config: Any) -> list[int | None]:
    """Per-layer sliding window from a transformers config (None = full attention)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if getattr(config, "use_sliding_window", True) is False:
        return [None] * config.num_hidden_layers
    return [window] * config.num_hidden_layers


def kv_cache_spec(model: torch.nn.Module) -> dict[str, Any]:
    """What the K/V pools of `model` look like, from its config: per-layer num_kv_heads,
    head_dim and sliding window (lists), dtype and device of its parameters."""
    config = model.config.get_text_config(decoder=True)
    num_layers = config.num_hidden_layers
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    param = next(model.parameters())
    return {
        "num_kv_heads": [num_kv_heads] * num_layers,
        "head_dim": [head_dim] * num_layers,
        "sliding_windows": _sliding_windows(config),
        "dtype": param.dtype,
        "device": param.device,
    }


def use_kv_paged_attention(model: torch.nn.Module) -> None:
    """Switch model to the "kv_paged" attention (and mask) implementation."""
    model.set_attn_implementation(ATTN_NAME)


# ---------------------------------------------------------------------------------------------
# Forward hooks: one metadata build per forward
# ---------------------------------------------------------------------------------------------


def _pre_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, PagedCache) or cache._owner is not None:
        return  # not ours, or an inner hooked module of a forward already begun
    impl = getattr(getattr(module, "config", None), "_attn_implementation", ATTN_NAME)
    if impl not in (ATTN_NAME, PAGED_ATTN_NAME):
        raise ValueError(
            f"a PagedCache needs attn_implementation='{ATTN_NAME}', but the model uses '{impl}': "
            f"call model.set_attn_implementation('{ATTN_NAME}')"
        )
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache._begin_step(input_ids, kwargs.get("attention_mask"))
    cache._owner = module
    _state.cache = cache


def _post_forward(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, PagedCache) or cache._owner is not module:
        return
    cache._owner = None
    _state.cache = None
    cache._end_step(output is not None)


def attach(model: torch.nn.Module) -> None:
    """Hook model's forward (and its decoder's) so a PagedCache passed as past_key_values works.
    Idempotent."""
    targets = [model]
    decoder = getattr(model, "model", None)
    if isinstance(decoder, torch.nn.Module):
        targets.append(decoder)
    for target in targets:
        if getattr(target, "_kv_paged_hooked", False):
            continue
        target.register_forward_pre_hook(_pre_forward, with_kwargs=True)
        target.register_forward_hook(_post_forward, with_kwargs=True, always_call=True)
        target._kv_paged_hooked = True


# ---------------------------------------------------------------------------------------------
# Attention and mask functions
# ---------------------------------------------------------------------------------------------


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
    if _active_cache() is not None:
        return None
    if kwargs.get("use_vmap"):
        raise NotImplementedError(
            "kv_paged attention supports causal and sliding-window masks only, not custom mask functions"
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


def _window_and_cap(module: torch.nn.Module, kwargs: dict) -> tuple[int | None, float | None]:
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    softcap = kwargs.get("softcap", None)
    window = int(window) if window is not None and window > 0 else None
    softcap = float(softcap) if softcap is not None and softcap > 0 else None
    return window, softcap


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
    if kwargs.get("cache") is not None and not isinstance(kwargs.get("cache"), PagedCache):
        return _continuous_batching_attention(module, query, key, value, scaling, kwargs)
    window, softcap = _window_and_cap(module, kwargs)
    bsz, heads, seq, dim = query.shape
    q = query.transpose(1, 2).reshape(bsz * seq, heads, dim)
    cache = _active_cache()
    if cache is not None and cache._meta is not None:
        meta = cache._meta
        layer_idx = module.layer_idx
        new_kv = (
            cache._new_kv if cache._new_kv is not None and cache._new_kv[0] == layer_idx else None
        )
        out = cache.pool.attend(
            layer_idx,
            meta.pack(q),
            meta,
            key=None if new_kv is None else new_kv[1],
            value=None if new_kv is None else new_kv[2],
            scale=scaling,
            sliding_window=window,
            softcap=softcap,
        )
        return meta.unpack(out).view(bsz, seq, heads, -1), None

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
    out = kv_paged.ops.flash_attention(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        varlen.cu_seqlens_q,
        varlen.cu_seqlens_k,
        varlen.max_seqlen_q,
        varlen.max_seqlen_k,
        scale=scaling,
        causal=bool(kwargs.get("is_causal", getattr(module, "is_causal", True))),
        sliding_window=window,
        softcap=softcap,
    )
    if varlen.q_index is not None:
        out = out.new_zeros((bsz * seq, *out.shape[1:])).index_copy_(0, varlen.q_index, out)
    return out.view(bsz, seq, heads, -1), None


def _continuous_batching_attention(module, query, key, value, scaling, kwargs):
    """transformers' own continuous batching ("paged|kv_paged", transformers 5.17-5.22): K/V go
    through its PagedAttentionCache (kwargs["cache"]), which returns each sequence's past + new K/V
    packed as [Tk, num_kv_heads, head_dim] in cu_seq_lens_k order; attention runs on kv_paged's
    varlen flash attention. query: [1, num_heads, T, head_dim].
    Returns ([1, T, num_heads, head_dim], None).
    """
    cache = kwargs["cache"]
    window, softcap = _window_and_cap(module, kwargs)
    cu_k = kwargs["cu_seq_lens_k"]
    max_k = kwargs.get("max_seqlen_k", kwargs.get("max_length_k"))
    if isinstance(cu_k, dict):
        layer_type = "sliding_attention" if window is not None else "full_attention"
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
    out = kv_paged.ops.flash_attention(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        cu_q.to(torch.int32),
        cu_k.to(torch.int32),
        int(max_q),
        int(max_k),
        scale=scaling,
        causal=True,
        sliding_window=window,
        softcap=softcap,
    )
    return out.unsqueeze(0), None


# ---------------------------------------------------------------------------------------------
# Tiny random-weight models (tests, demo): built in code, no download
# ---------------------------------------------------------------------------------------------

_COMMON_CONFIG = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": None,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,
}
# arch -> (config class, model class, overrides). Windows and softcaps are small so that 32
# generated tokens cross them and random weights make them matter.
TINY_ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 7}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "sliding_window": 6,
            "attn_logit_softcapping": 3.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"head_dim": None, "sliding_window": None}),
}


def tiny_model(
    arch: str,
    *,
    attn_implementation: str = ATTN_NAME,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **config_overrides: Any,
) -> torch.nn.Module:
    """A tiny random-weight causal LM of `arch` (see TINY_ARCHS), in eval mode.

    Same `seed` -> same weights whatever attn_implementation, so "eager" and "kv_paged" copies of
    a model can be compared. config_overrides replace TINY_ARCHS / common config fields.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {sorted(TINY_ARCHS)}, got {arch!r}")
    config_name, model_name, overrides = TINY_ARCHS[arch]
    fields = {**_COMMON_CONFIG, **overrides, **config_overrides}
    fields = {k: v for k, v in fields.items() if v is not None or k == "eos_token_id"}
    config = getattr(transformers, config_name)(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    model.set_attn_implementation(attn_implementation)
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def register() -> None:
    """Register "kv_paged" in transformers' AttentionInterface and AttentionMaskInterface (and
    "paged|kv_paged" where transformers' continuous batching dispatches on "paged|" names)."""
    modeling_utils.AttentionInterface.register(ATTN_NAME, kv_paged_attention)
    masking_utils.AttentionMaskInterface.register(ATTN_NAME, kv_paged_mask)
    if _HAS_CB_PAGED_NAMES:
        modeling_utils.AttentionInterface.register(PAGED_ATTN_NAME, kv_paged_attention)
        masking_utils.AttentionMaskInterface.register(PAGED_ATTN_NAME, kv_paged_mask)


register()
