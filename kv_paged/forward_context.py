"""The per-forward attention context: what every "kv_paged" attention layer of one model forward
needs (the step's AttentionMetadata and the KV pool it reads and writes).

Design decision: one thread-local slot, set only by the `forward_context(...)` with-block, whose exit
clears it on every exit (KeyboardInterrupt included) and which refuses to nest, so a forward can
never see a stale or a foreign step. The Engine's model runner and PagedCache's forward wrapper set
it; the attention function reads it and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

from kv_paged.cache import AttentionMetadata, KVCachePool

__all__ = ["ForwardContext", "forward_context", "get_forward_context"]


@dataclasses.dataclass(frozen=True)
class ForwardContext:
    """One forward step: its metadata (built once, shared by every layer), the pool, and who set it
    (a PagedCache or the Engine's runner: a nested forward of the same owner joins this step)."""

    meta: AttentionMetadata
    pool: KVCachePool
    owner: object


_local = threading.local()


def get_forward_context() -> ForwardContext | None:
    """The context of the forward running on this thread, or None outside one."""
    return getattr(_local, "context", None)


@contextlib.contextmanager
def forward_context(
    meta: AttentionMetadata, pool: KVCachePool, owner: object
) -> Iterator[ForwardContext]:
    """Makes (meta, pool) the attention context of this thread for the with-block.

    Raises RuntimeError when a context is already set: a kv_paged forward inside another one is a
    bug (two caches, or a model called from inside its own forward), never silently merged.
    """
    if not isinstance(meta, AttentionMetadata):
        raise TypeError(
            f"meta must be a kv_paged.cache.AttentionMetadata, got {type(meta).__name__}"
        )
    if not isinstance(pool, KVCachePool):
        raise TypeError(f"pool must be a kv_paged.cache.KVCachePool, got {type(pool).__name__}")
    active = get_forward_context()
    if active is not None:
        raise RuntimeError(
            f"a kv_paged forward (set by {type(active.owner).__name__}) is already running on this "
            f"thread; {type(owner).__name__} cannot start another one inside it"
        )
    context = ForwardContext(meta=meta, pool=pool, owner=owner)
    _local.context = context
    try:
        yield context
    finally:
        _local.context = None
