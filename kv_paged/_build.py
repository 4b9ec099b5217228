"""Loads the compiled extension kv_paged._C and refuses a missing or stale one with a clear fix.

Stale means: built against another torch version, or (in a source checkout) built from csrc/
files that have changed since. The source hash is computed exactly as setup.py computes it.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import os

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_PACKAGE_DIR)
_REBUILD = (
    "Rebuild it from the repository root with `make build` "
    "(or `pip install --no-build-isolation -e .`)."
)


def source_hash(root: str = _REPO_ROOT) -> str | None:
    """sha256 over root/csrc/**, or None when the sources are not beside the package."""
    files = sorted(glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True))
    files = [p for p in files if os.path.isfile(p)]
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def load_extension():
    try:
        ext = importlib.import_module("kv_paged._C")
    except ImportError as e:
        raise ImportError(
            f"kv_paged's compiled extension kv_paged._C is missing or broken ({e}). {_REBUILD}"
        ) from e
    built_torch = getattr(ext, "torch_version", None)
    if built_torch != torch.__version__:
        raise ImportError(
            f"kv_paged._C was built against torch {built_torch} but torch {torch.__version__} is "
            f"installed. {_REBUILD}"
        )
    if os.environ.get("KV_PAGED_SKIP_STALE_CHECK") != "1":
        current = source_hash()
        built = getattr(ext, "source_hash", None)
        if current is not None and built != current:
            raise ImportError(
                f"kv_paged._C is stale: it was built from sources with hash {built}, but csrc/ now "
                f"hashes to {current}. {_REBUILD} (KV_PAGED_SKIP_STALE_CHECK=1 skips this check.)"
            )
    return ext
