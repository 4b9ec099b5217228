"""kv_paged: a paged KV cache, a C++ block manager with prefix caching and copy-on-write, and
fused attention ops (paged decode / chunked prefill, flash attention) for PyTorch models.

Importing the package loads the compiled extension, which registers torch.ops.kv_paged.* and
torch.classes.kv_paged.BlockManager.
"""

from kv_paged._build import load_extension as _load_extension

_C = _load_extension()
with_cuda: bool = bool(getattr(_C, "with_cuda", False))

__version__ = "0.1.0"
from kv_paged import ops  # noqa: E402,F401  (registers the fake implementations)
