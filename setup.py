"""Builds kv_paged._C against the torch already installed (pip install --no-build-isolation .).

CUDA sources (csrc/ops/*.cu) are compiled only when this torch is a CUDA build and nvcc is found;
KV_PAGED_CUDA=1 forces them (and fails loudly without nvcc), KV_PAGED_CUDA=0 forces a CPU build.
A hash of every csrc/ file is compiled into the extension so kv_paged/__init__.py can tell a stale
build from a fresh one.
"""

import glob
import hashlib
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def source_hash() -> str:
    """sha256 over csrc/**: the same function kv_paged/_build.py uses at import time."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def want_cuda() -> bool:
    forced = os.environ.get("KV_PAGED_CUDA")
    if forced == "1":
        if CUDA_HOME is None or torch.version.cuda is None:
            raise RuntimeError(
                "KV_PAGED_CUDA=1 but no CUDA toolkit (nvcc) or no CUDA build of torch was found "
                f"(torch {torch.__version__}, CUDA_HOME={CUDA_HOME})"
            )
        return True
    if forced == "0":
        return False
    if forced not in (None, ""):
        raise RuntimeError(f"KV_PAGED_CUDA must be 0 or 1, got {forced!r}")
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = ["csrc/torch_bindings.cpp", "csrc/block_manager.cpp"]
    sources += rel("csrc/cpu/*.cpp") + rel("csrc/ops/*.cpp")
    with_cuda = want_cuda()
    defines = [
        f'-DKV_PAGED_SOURCE_HASH="{source_hash()}"',
        f'-DKV_PAGED_TORCH_VERSION="{torch.__version__}"',
    ]
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-march=native" if os.environ.get("KV_PAGED_NATIVE") else "-mavx2", "-mfma"] + defines
    if os.uname().machine not in ("x86_64", "AMD64"):
        cxx = [f for f in cxx if f not in ("-mavx2", "-mfma")]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return CppExtension(
            "kv_paged._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    sources += rel("csrc/ops/*.cu")
    nvcc = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"] + defines
    nvcc += ["-DKV_PAGED_WITH_CUDA"]
    return CUDAExtension(
        "kv_paged._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + ["-DKV_PAGED_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
