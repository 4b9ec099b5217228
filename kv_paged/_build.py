"""Loads the compiled extension kv_paged._C and refuses a missing or stale one with a clear fix.

Stale means: built against another torch version, or built from a source checkout whose csrc/ has
changed since. The second check runs only when this package sits in the checkout the extension was
built from (its recorded source_root): an installed copy never compares itself with a csrc/ folder
that happens to lie beside it. The source hash is computed as setup.py computes it
(kv_paged/_source_hash.py); setup.py makes the objects follow content, not mtimes.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from kv_paged._source_hash import source_hash

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_PACKAGE_DIR)
_REBUILD = (
    "Rebuild it from the repository root with `make build` "
    "(or `pip install --no-build-isolation -e .`)."
)


def stale_reason(
    ext: ModuleType, package_root: str = _REPO_ROOT, check_sources: bool = True
) -> str | None:
    """Why the loaded extension does not match its sources, or None. Only a package in the checkout
    the extension was built from (same real path) is compared with that checkout's csrc/."""
    built_torch = getattr(ext, "torch_version", None)
    if built_torch != torch.__version__:
        return (
            f"kv_paged._C was built against torch {built_torch} but torch {torch.__version__} is "
            "installed."
        )
    built_root = getattr(ext, "source_root", None)
    if (
        not check_sources
        or built_root is None
        or os.path.realpath(package_root) != os.path.realpath(built_root)
    ):
        return None  # an installed copy: its sources are not beside it
    current = source_hash(package_root)
    built = getattr(ext, "source_hash", None)
    if current is not None and built != current:
        return (
            f"kv_paged._C is stale: it was built from sources with hash {built}, but csrc/ now "
            f"hashes to {current}."
        )
    return None


def load_extension() -> ModuleType:
    try:
        ext = importlib.import_module("kv_paged._C")
    except ImportError as e:
        raise ImportError(
            f"kv_paged's compiled extension kv_paged._C is missing or broken ({e}). {_REBUILD}"
        ) from e
    reason = stale_reason(ext, check_sources=os.environ.get("KV_PAGED_SKIP_STALE_CHECK") != "1")
    if reason is not None:
        raise ImportError(
            f"{reason} {_REBUILD} (KV_PAGED_SKIP_STALE_CHECK=1 skips the source check.)"
        )
    return ext
