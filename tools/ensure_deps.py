"""Installs the Python packages kv_paged's tests and demo need, each only when it is missing.

Never installs torch (the Makefile pins it) and never upgrades anything, so it is a no-op offline
on a machine that already has everything (the GPU machine).
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
}


def main() -> int:
    missing = [req for name, req in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]
    if not missing:
        return 0
    print("installing", " ".join(missing), flush=True)
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", *missing])


if __name__ == "__main__":
    sys.exit(main())
