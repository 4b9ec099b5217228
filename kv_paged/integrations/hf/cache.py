"""PagedCache: a transformers `Cache` whose K/V live in kv_paged block pools, and the forward hooks
that drive it.

Design: the hooks on the model's forward book blocks and build ONE AttentionMetadata per forward;
the running cache is kept in a thread-local so that the attention functions (which transformers calls
without the cache) find it. Each layer's `update()` only writes K/V into the pool.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import kv_paged
from kv_paged.cache import AttentionMetadata, KVCachePool, PaddedBatch
from kv_paged.integrations.hf import ATTN_NAME, PAGED_ATTN_NAME

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
        # A proxy, not a reference: the cache owns its layers, and a cycle would keep the pool (GBs
        # on a GPU) alive after the user drops the cache or the Engine, until the next gc pass.
        self._cache = weakref.proxy(cache)
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
      * an engine: `PagedCache.for_engine(model, pool)`, then `set_step(meta)` before each forward
        on packed input_ids [1, T] with explicit position_ids; the engine owns the BlockManager.
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
