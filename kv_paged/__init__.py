"""kv_paged: a paged KV cache, a C++ block manager with prefix caching and copy-on-write, and
fused attention ops (paged decode / chunked prefill, flash attention) for PyTorch models.

Importing the package loads the compiled extension, which registers torch.ops.kv_paged.* and
defines the pybind11 class kv_paged.BlockManager.
"""

from kv_paged._build import load_extension as _load_extension

_C = _load_extension()
with_cuda: bool = bool(getattr(_C, "with_cuda", False))

from kv_paged import ops  # noqa: E402  (registers the fake implementations)
from kv_paged.block_manager import BlockManager  # noqa: E402  (needs _C loaded)

__version__ = "0.1.0"
__all__ = [
    "BeamSearchParams",
    "BlockManager",
    "Engine",
    "PagedCache",
    "RequestOutput",
    "SamplingParams",
    "ops",
    "with_cuda",
]


def _register_transformers() -> None:
    """Registers the "kv_paged" attention with transformers when it is installed (optional extra)."""
    import importlib.util
    import warnings

    try:
        installed = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return
    try:
        from kv_paged.integrations import hf  # noqa: F401  (registers on import)
    except ImportError as e:
        warnings.warn(f"kv_paged: the transformers integration is unavailable: {e}", stacklevel=3)


_register_transformers()


def __getattr__(
    name: str,
):  # Engine / SamplingParams load lazily: kv_paged.engine imports more modules
    if name in ("Engine", "SamplingParams", "RequestOutput"):
        from kv_paged import engine

        return getattr(engine, name)
    if name == "BeamSearchParams":
        from kv_paged.beam_search import BeamSearchParams

        return BeamSearchParams
    if name == "PagedCache":  # needs transformers: an ImportError says so
        from kv_paged.integrations.hf import PagedCache

        return PagedCache
    raise AttributeError(f"module 'kv_paged' has no attribute {name!r}")
