"""PagedCache: a transformers `Cache` whose K/V live in kv_paged block pools, managed by a
BlockManager, and the forward wrapper that drives it.

Design decision: `attach(model)` wraps the model's forward (as accelerate's hooks do) instead of
using torch forward hooks, because torch skips `always_call` hooks on KeyboardInterrupt. The wrapper
turns the forward's padded input_ids into ONE AttentionMetadata (PaddedBatch) and runs the forward
inside `forward_context(...)`, which the "kv_paged" attention reads; layers' `update()` do nothing
but check that they run inside it (the attention writes the pool). Beam search reorders rows by
forking and freeing BlockManager sequences: beams share blocks, never copies of them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import utils as generation_utils

from kv_paged.block_manager import BlockManager
from kv_paged.cache import KVCachePool
from kv_paged.forward_context import forward_context, get_forward_context
from kv_paged.integrations.hf.names import ATTN_NAME, PAGED_ATTN_NAME
from kv_paged.integrations.hf.padded_batch import PaddedBatch
from kv_paged.integrations.hf.spec import kv_cache_spec

__all__ = ["CACHE_KWARG", "PagedCache", "PagedLayer", "attach"]

# The keyword forward and generate take the cache under: `cache` since transformers 5.24,
# `past_key_values` before (a deprecated alias there until 5.40 for forward, 6.0 for generate).
CACHE_KWARGS = ("cache", "past_key_values")
CACHE_KWARG = "cache" if "cache" in generation_utils.ALL_CACHE_NAMES else "past_key_values"
ACCEPTED_CACHE_KWARGS = CACHE_KWARGS if CACHE_KWARG == "cache" else ("past_key_values",)


class PagedLayer(CacheLayerMixin):
    """One decoder layer's view of a PagedCache: K/V live in the shared pool, not in this object."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, cache: PagedCache, layer_idx: int, is_sliding: bool) -> None:
        super().__init__()
        # A weak reference: the cache owns its layers, and a cycle would keep the pool (GBs on a
        # GPU) alive after the user drops the cache, until the next gc pass.
        self._cache = weakref.ref(cache)
        self.layer_idx = layer_idx
        self.is_sliding = is_sliding
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Returns this step's K/V unchanged: the "kv_paged" attention writes them to the pool."""
        context = get_forward_context()
        if context is None or context.owner is not self._cache():
            raise RuntimeError(
                "PagedCache.update() ran outside a forward wrapped by kv_paged: build the cache with "
                "PagedCache.for_model(model, ...) (or call kv_paged.integrations.hf.attach(model)) and "
                "pass it to that model's forward or generate"
            )
        return key_states, value_states

    def get_seq_length(self) -> int:
        cache = self._cache()
        return 0 if cache is None else cache.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("reorder a PagedCache as a whole: cache.reorder_cache(beam_idx)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "PagedCache does not support crop (assisted / speculative decoding)"
        )


class PagedCache(Cache):
    """A transformers `Cache` whose K/V live in kv_paged block pools, managed by a BlockManager.

    Use it with a model whose attention implementation is "kv_paged":

        cache = PagedCache.for_model(model, num_blocks=256, block_size=16)
        out = model.generate(input_ids, attention_mask=mask, past_key_values=cache)
        cache.reset()                          # frees the batch; full blocks stay prefix-cached
        cache.add_prompts(ids2, mask2)         # books the next prompts, reusing cached prefixes
        out2 = model.generate(ids2, attention_mask=mask2, past_key_values=cache)  # runs the rest

    (`cache=` instead of `past_key_values=` from transformers 5.24 on.) Each forward's input_ids
    [B, S] (left-padded, with the 2D attention_mask over past + new columns) extends the batch; pad
    tokens are never written nor attended; the first forward after reset() starts a new batch.
    Beam search (`num_beams=k`) shares the prompt's blocks between beams and reorders them by
    forking, so only a beam's own partial last block is ever copied.
    """

    def __init__(
        self, pool: KVCachePool, block_manager: BlockManager, *, cascade_attention: bool = False
    ) -> None:
        """pool: the K/V pools (one pair per decoder layer). block_manager: a kv_paged.BlockManager
        over the same num_blocks / block_size. cascade_attention: rows whose blocks are shared
        (beams, a common prompt) attend to the shared blocks once per group (kv_paged.cascade)."""
        if not isinstance(pool, KVCachePool):
            raise TypeError(f"pool must be a kv_paged.cache.KVCachePool, got {type(pool).__name__}")
        if not isinstance(block_manager, BlockManager):
            raise TypeError(
                f"block_manager must be a kv_paged.BlockManager, got {type(block_manager).__name__}"
            )
        if (
            block_manager.num_blocks != pool.num_blocks
            or block_manager.block_size != pool.block_size
        ):
            raise ValueError(
                f"block_manager has num_blocks={block_manager.num_blocks}, block_size="
                f"{block_manager.block_size}; the pool has {pool.num_blocks}, {pool.block_size}"
            )
        self.pool = pool
        self.block_manager = block_manager
        self.cascade_attention = bool(cascade_attention)
        super().__init__(layers=[PagedLayer(self, i, False) for i in range(pool.num_layers)])
        self._batch: PaddedBatch | None = None
        self._next_seq_id = 0
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
        block_manager: BlockManager | None = None,
        dtype: torch.dtype | None = None,
        cascade_attention: bool = False,
    ) -> PagedCache:
        """A cache sized from model.config (layers, kv heads, head_dim, dtype, device) with its own
        BlockManager (or the one given), and model's forward wrapped to drive it."""
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
            block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        cache = cls(pool, block_manager, cascade_attention=cascade_attention)
        for layer, window in zip(cache.layers, spec["sliding_windows"]):
            layer.is_sliding = window is not None
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
        """BlockManager sequence id of each batch row."""
        return [] if self._batch is None else self._batch.seq_ids

    # -- batch lifecycle -----------------------------------------------------------------------

    def reset(self) -> None:
        """Free the current batch. Its computed full blocks stay matchable by the prefix cache."""
        if self._batch is not None:
            self._batch.free()
        self._batch = None
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
        if self._batch is not None:
            raise RuntimeError(
                "PagedCache already holds a batch; call cache.reset() before add_prompts()"
            )
        batch = PaddedBatch(
            self.block_manager, first_seq_id=self._next_seq_id, cascade=self.cascade_attention
        )
        try:
            columns = batch.add_prompts(input_ids, attention_mask)
        finally:
            self._next_seq_id = batch.next_seq_id
        self._batch = batch
        return columns

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._batch.columns if self._batch is not None else 0

    # -- beam search and batch reshaping (generate calls these between forwards) ----------------

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i continues what row beam_idx[i] held: forks of the chosen rows' sequences, the
        others freed. Full blocks are shared; a shared partial last block is copied on the next
        append (copy-on-write). beam_idx: int [B]."""
        self._select(beam_idx, "beam_idx", same_size=True)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (int [B']), in that order; rows may repeat (forks)."""
        self._select(indices, "indices", same_size=False)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row becomes `repeats` consecutive rows sharing its blocks."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        rows = len(self.seq_ids)
        self._select(torch.arange(rows).repeat_interleave(repeats), "repeats", same_size=False)

    def _select(self, index: torch.Tensor, name: str, *, same_size: bool) -> None:
        self._check_usable()
        if self._batch is None:
            raise RuntimeError(f"PagedCache holds no batch to reorder ({name})")
        self._batch.select(index, name, same_size=same_size)
        self._next_seq_id = self._batch.next_seq_id

    # -- one forward ---------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(
                f"PagedCache is unusable after a failed forward ({self._broken}); call reset()"
            )

    @contextlib.contextmanager
    def _forward(self, input_ids: Any, attention_mask: Any) -> Iterator[None]:
        """Books the forward's tokens, applies pending copy-on-write copies and sets the forward
        context for the with-block; the BlockManager hears the K/V is written only on success.
        A failure (KeyboardInterrupt included) leaves the cache refusing work until reset()."""
        self._check_usable()
        if self._batch is None:
            self._batch = PaddedBatch(
                self.block_manager, first_seq_id=self._next_seq_id, cascade=self.cascade_attention
            )
        try:
            meta = self._batch.begin_step(input_ids, attention_mask, device=self.pool.device)
        except BaseException:
            if self._batch.half_done:  # the BlockManager took some of the step's tokens
                self._broken = "a forward's booking failed or was interrupted"
            raise
        finally:
            self._next_seq_id = self._batch.next_seq_id
            if not self._batch.seq_ids:
                self._batch = None
        ok = False
        try:
            self.pool.copy_blocks(self.block_manager.take_copies())
            with forward_context(meta, self.pool, owner=self):
                yield
            ok = True
        finally:
            if ok:
                self._batch.commit_step()
            else:  # the BlockManager holds this step's tokens, their K/V may be half written
                self._broken = "a forward raised or was interrupted"


def _cache_argument(kwargs: dict) -> Any:
    """The PagedCache passed to a forward, under the name(s) the installed transformers reads."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if isinstance(cache, PagedCache):
            if name not in ACCEPTED_CACHE_KWARGS:  # the model would ignore it and go uncached
                raise TypeError(
                    f"transformers {transformers.__version__} takes the cache as "
                    f"{CACHE_KWARG}=, not {name}="
                )
            return cache
    return None


class _PagedForward:
    """module.forward once attached: runs a forward given a PagedCache inside the cache's forward
    context; any other call goes straight through. A callable object (not a closure) so that
    copy.deepcopy and pickling of the module rebind it to the copy; it holds the module, a cycle
    like accelerate's hooks make."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        # Another wrapper already there (accelerate's hooks) runs inside this one.
        self.inner = module.__dict__.get("forward")

    @property
    def __signature__(self) -> inspect.Signature:  # transformers inspects forward's parameters
        return inspect.signature(self.inner or type(self.module).forward.__get__(self.module))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        call = self.inner or functools.partial(type(module).forward, module)
        cache = _cache_argument(kwargs)
        if cache is None:
            return call(*args, **kwargs)
        context = get_forward_context()
        if context is not None and context.owner is cache:
            return call(*args, **kwargs)  # the decoder inside the LM's forward: same step
        impl = getattr(getattr(module, "config", None), "_attn_implementation", ATTN_NAME)
        if impl not in (ATTN_NAME, PAGED_ATTN_NAME):
            raise ValueError(
                f"a PagedCache needs attn_implementation='{ATTN_NAME}', but the model uses '{impl}': "
                f"call model.set_attn_implementation('{ATTN_NAME}')"
            )
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        with cache._forward(input_ids, kwargs.get("attention_mask")):
            return call(*args, **kwargs)


def attach(model: torch.nn.Module) -> None:
    """Wrap model's forward (and its decoder's) so a PagedCache passed as the cache works.
    Idempotent."""
    targets = [model]
    decoder = getattr(model, "model", None)
    if isinstance(decoder, torch.nn.Module):
        targets.append(decoder)
    for target in targets:
        if not isinstance(target.__dict__.get("forward"), _PagedForward):
            target.forward = _PagedForward(target)
