"""HuggingFace transformers integration: "kv_paged" attention, a paged `Cache`, tiny test models.

The only package that imports transformers; importing it checks the version and registers
"kv_paged" with transformers. Design: `PagedCache.for_model(model)` wraps the model's forward; the
wrapper sees input_ids + attention_mask, books blocks in the BlockManager, builds ONE
AttentionMetadata per forward and runs the forward inside kv_paged.forward_context, where the
attention function writes and reads the pool. Without a PagedCache (or the Engine), "kv_paged" still
works on transformers' own caches (varlen flash attention on the unpadded dense K/V).
Its modules import each other and kv_paged's framework-free modules, never this __init__.
"""

from __future__ import annotations

try:
    import transformers
    from transformers import cache_utils, masking_utils, modeling_utils
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "kv_paged.integrations.hf needs transformers>=5.17 (`pip install kv_paged[hf]`)"
    ) from e

from kv_paged.integrations.hf.names import ATTN_NAME, MIN_TRANSFORMERS, PAGED_ATTN_NAME


def _check_transformers() -> None:
    """Raise a clear ImportError when the integration points this package needs are missing."""
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

# The submodules subclass and call into transformers: import them only once the check passed.
from kv_paged.integrations.hf.attention import (  # noqa: E402
    DenseVarlen,
    kv_paged_attention,
    kv_paged_mask,
    no_mask,
)
from kv_paged.integrations.hf.cache import CACHE_KWARG, PagedCache, PagedLayer, attach  # noqa: E402
from kv_paged.integrations.hf.models import TINY_ARCHS, tiny_model  # noqa: E402
from kv_paged.integrations.hf.spec import (  # noqa: E402
    kv_cache_spec,
    tensor_parallel_size,
    use_kv_paged_attention,
)

__all__ = [
    "ATTN_NAME",
    "CACHE_KWARG",
    "PAGED_ATTN_NAME",
    "DenseVarlen",
    "PagedCache",
    "PagedLayer",
    "TINY_ARCHS",
    "attach",
    "kv_cache_spec",
    "kv_paged_attention",
    "kv_paged_mask",
    "register",
    "tensor_parallel_size",
    "tiny_model",
    "use_kv_paged_attention",
]

_HAS_CB_PAGED_NAMES = "paged|eager" in modeling_utils.AttentionInterface._global_mapping and any(
    key.startswith("paged|") and key != "paged|eager"
    for key in modeling_utils.AttentionInterface._global_mapping
)


def register() -> None:
    """Register "kv_paged" in transformers' AttentionInterface and AttentionMaskInterface (and
    "paged|kv_paged" where transformers' continuous batching dispatches on "paged|" names)."""
    modeling_utils.AttentionInterface.register(ATTN_NAME, kv_paged_attention)
    masking_utils.AttentionMaskInterface.register(ATTN_NAME, kv_paged_mask)
    if _HAS_CB_PAGED_NAMES:
        modeling_utils.AttentionInterface.register(PAGED_ATTN_NAME, kv_paged_attention)
        masking_utils.AttentionMaskInterface.register(PAGED_ATTN_NAME, no_mask)


register()
