"""Content hashes of csrc/, shared by setup.py, the Makefile and kv_paged/_build.py (torch-free, so
the Makefile can run it in a fraction of a second).

Design decision: ninja decides what to recompile by mtime, but a source restored with an old mtime
(git checkout, cp -p, an editor's backup) is older than the object built from the edited text. So
setup.py keeps a manifest of the per-file content hashes of the last successful build and, before
building, sets the mtime of every file whose content differs from it to now: ninja then rebuilds
exactly the objects that no longer match their sources. Usage: `python _source_hash.py ROOT`
prints the hash of ROOT/csrc.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys


def file_hashes(root: str) -> dict[str, str]:
    """sha256 of every file under root/csrc, keyed by its path relative to root."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def source_hash(root: str) -> str | None:
    """One hash over the paths and contents of root/csrc/**, or None when there is no csrc/."""
    hashes = file_hashes(root)
    if not hashes:
        return None
    digest = hashlib.sha256()
    for rel, h in hashes.items():
        digest.update(rel.encode())
        digest.update(h.encode())
    return digest.hexdigest()[:16]


def touch_changed(root: str, manifest: str) -> list[str]:
    """Sets the mtime of every csrc/ file whose content differs from the manifest (or that it lacks)
    to now, so an mtime-driven build recompiles it. Returns the paths touched, relative to root."""
    try:
        with open(manifest) as f:
            built = json.load(f)
    except (OSError, ValueError):
        built = {}
    changed = [rel for rel, h in file_hashes(root).items() if built.get(rel) != h]
    for rel in changed:
        os.utime(os.path.join(root, rel))
    return changed


def write_manifest(manifest: str, hashes: dict[str, str]) -> None:
    """Records the content hashes (file_hashes() taken before the build) it was made from."""
    os.makedirs(os.path.dirname(manifest), exist_ok=True)
    tmp = manifest + ".tmp"
    with open(tmp, "w") as f:
        json.dump(hashes, f, indent=0, sort_keys=True)
    os.replace(tmp, manifest)


if __name__ == "__main__":
    print(source_hash(sys.argv[1] if len(sys.argv) > 1 else "."))
