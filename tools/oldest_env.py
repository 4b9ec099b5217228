"""Creates (or reuses) a second Python environment with the OLDEST transformers kv_paged supports,
for `make test-oldest`.

Design decision: the environment does not reinstall torch. It is a venv whose site-packages has a
.pth line pointing at the main environment's site-packages (where torch and the rest live), so only
transformers and the packages it pins differently (huggingface-hub < 2, ...) are installed into it
and shadow the main ones; the in-place kv_paged build is shared.

Usage: python tools/oldest_env.py VENV_DIR REQUIREMENT [EXTRA ...]   (run with the main python)
Exit status 0 when VENV_DIR/bin/python imports the required transformers; non-zero otherwise
(e.g. offline with nothing installed yet).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def _site_packages(python: str) -> str:
    out = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    )
    return out.strip()


def _has(python: str, version: str) -> bool:
    check = f"import transformers, sys; sys.exit(transformers.__version__ != {version!r})"
    return subprocess.call([python, "-c", check], stderr=subprocess.DEVNULL) == 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or "==" not in argv[1]:
        print(__doc__, file=sys.stderr)
        return 2
    venv, requirement, extras = argv[0], argv[1], argv[2:]
    version = requirement.split("==", 1)[1]
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"creating {venv} ({requirement} over this environment's packages)", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", venv])
    # Where torch lives (the main environment), whatever interpreter runs this.
    main_site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    pth = os.path.join(_site_packages(python), "zz_kv_paged_main_env.pth")
    with open(pth, "w") as f:
        f.write(main_site + "\n")
    if _has(python, version):
        return 0
    missing = [requirement, *extras]
    print(f"installing {' '.join(missing)} into {venv}", flush=True)
    status = subprocess.call([python, "-m", "pip", "install", "-q", *missing])
    if status != 0 or not _has(python, version):
        print(f"{venv}: could not install {requirement}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
