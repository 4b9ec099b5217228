"""The build follows the sources' content, not their mtimes (kv_paged/_source_hash.py, used by
setup.py before and after each build), and the import-time staleness check (kv_paged/_build.py)
compares an extension only with the checkout it was built from, never with an unrelated csrc/
folder that happens to lie beside an installed copy.
"""

from __future__ import annotations

import os
import types

import torch

from kv_paged import _build, _source_hash


def make_tree(root, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_file_restored_with_an_old_mtime_is_touched_for_the_next_build(tmp_path):
    make_tree(tmp_path, {"csrc/a.cpp": "int a = 1;", "csrc/b.h": "#pragma once"})
    manifest = str(tmp_path / "build" / "manifest.json")
    # build 1 compiled the edited text
    (tmp_path / "csrc/a.cpp").write_text("int a = 2;")
    _source_hash.write_manifest(manifest, _source_hash.file_hashes(str(tmp_path)))
    # the original text comes back with a mtime older than build 1's object (git checkout, cp -p)
    (tmp_path / "csrc/a.cpp").write_text("int a = 1;")
    os.utime(tmp_path / "csrc/a.cpp", (1_000_000_000, 1_000_000_000))
    os.utime(tmp_path / "csrc/b.h", (1_000_000_000, 1_000_000_000))
    changed = _source_hash.touch_changed(str(tmp_path), manifest)
    assert changed == ["csrc/a.cpp"]
    assert os.path.getmtime(tmp_path / "csrc/a.cpp") > 1_500_000_000  # now newer: ninja rebuilds
    assert os.path.getmtime(tmp_path / "csrc/b.h") == 1_000_000_000  # unchanged: left alone


def test_no_manifest_means_every_file_is_rebuilt(tmp_path):
    make_tree(tmp_path, {"csrc/a.cpp": "x", "csrc/cpu/b.cpp": "y"})
    assert sorted(_source_hash.touch_changed(str(tmp_path), str(tmp_path / "none.json"))) == [
        "csrc/a.cpp",
        "csrc/cpu/b.cpp",
    ]


def test_source_hash_follows_content_and_paths(tmp_path):
    make_tree(tmp_path, {"csrc/a.cpp": "x"})
    h1 = _source_hash.source_hash(str(tmp_path))
    (tmp_path / "csrc/a.cpp").write_text("y")
    h2 = _source_hash.source_hash(str(tmp_path))
    (tmp_path / "csrc/a.cpp").rename(tmp_path / "csrc/b.cpp")
    h3 = _source_hash.source_hash(str(tmp_path))
    assert len({h1, h2, h3}) == 3
    assert _source_hash.source_hash(str(tmp_path / "nothing")) is None


def fake_ext(source_root: str, source_hash: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        torch_version=torch.__version__, source_root=source_root, source_hash=source_hash
    )


def test_an_installed_copy_ignores_an_unrelated_csrc_beside_it(tmp_path):
    site = tmp_path / "site-packages"
    make_tree(site, {"csrc/unrelated.c": "int main() {}"})  # some other project's sources
    ext = fake_ext("/build/kv_paged-checkout", "0123456789abcdef")
    assert _build.stale_reason(ext, str(site)) is None


def test_the_checkout_it_was_built_from_is_compared(tmp_path):
    make_tree(tmp_path, {"csrc/a.cpp": "x"})
    current = _source_hash.source_hash(str(tmp_path))
    assert _build.stale_reason(fake_ext(str(tmp_path), current), str(tmp_path)) is None
    reason = _build.stale_reason(fake_ext(str(tmp_path), "0" * 16), str(tmp_path))
    assert reason is not None and "stale" in reason
    assert _build.stale_reason(fake_ext(str(tmp_path), "0" * 16), str(tmp_path), False) is None


def test_another_torch_is_refused_wherever_the_package_is(tmp_path):
    ext = types.SimpleNamespace(torch_version="0.0.1", source_root="/x", source_hash="y")
    assert "torch 0.0.1" in _build.stale_reason(ext, str(tmp_path))


def test_this_build_matches_this_checkout():
    import kv_paged

    assert kv_paged._C.source_hash == _source_hash.source_hash(_build._REPO_ROOT)
    assert os.path.realpath(kv_paged._C.source_root) == os.path.realpath(_build._REPO_ROOT)
