"""HuggingFace transformers integration: "kv_paged" attention, a paged `Cache`, tiny test models.

The only package that imports transformers; importing it checks the version and registers
"kv_paged" with transformers. Design: `PagedCache.for_model(model)` hooks the model's forward; the
hook sees input_ids + attention_mask, books blocks in the BlockManager and builds ONE
AttentionMetadata per forward; each layer's `update()` writes K/V into its pool and the attention
function reads them back through kv_paged.ops. Without a PagedCache, "kv_paged" still works on
transformers' own caches (varlen flash attention on the unpadded dense K/V).
"""

from __future__ import annotations

try:
    import transformers
    from transformers import cache_utils, masking_utils, modeling_utils
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "kv_paged.integrations.hf needs transformers>=5.17 (`pip install kv_paged[hf]`)"
    ) from e

# Defined before the submodules are imported: they import these names from this package.
ATTN_NAME = "kv_paged"
PAGED_ATTN_NAME = "paged|kv_paged"
MIN_TRANSFORMERS = (5, 17)


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
    _no_mask,
    kv_paged_attention,
    kv_paged_mask,
)
from kv_paged.integrations.hf.cache import (  # noqa: E402
    PagedCache,
    PagedLayer,
    attach,
    kv_cache_spec,
    use_kv_paged_attention,
)
from kv_paged.integrations.hf.models import TINY_ARCHS, tiny_model  # noqa: E402

__all__ = [
    "ATTN_NAME",
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
        masking_utils.AttentionMaskInterface.register(PAGED_ATTN_NAME, _no_mask)


register()
