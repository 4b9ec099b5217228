"""The names kv_paged registers with transformers, and the oldest transformers it supports.

A leaf module: the rest of the hf package imports these from here, never from the package itself,
so no module of the package imports its own __init__.
"""

ATTN_NAME = "kv_paged"
PAGED_ATTN_NAME = "paged|kv_paged"
MIN_TRANSFORMERS = (5, 17)
