"""Creates (or reuses) a second Python environment with the OLDEST transformers kv_paged supports,
for `make test-oldest`.

Design decision: the environment does not reinstall torch. It is a venv whose site-packages has a
.pth file that adds the main environment's site directories (where torch and the rest live, their
own .pth files included) after its own, so only transformers and the packages it pins differently
(huggingface-hub < 2, ...) are installed into it and shadow the main ones; the in-place kv_paged
build is shared.

Usage: python tools/oldest_env.py VENV_DIR REQUIREMENT [EXTRA ...]   (run with the main python)
Exit status 0 when VENV_DIR/bin/python imports the required transformers; non-zero otherwise
(e.g. offline with nothing installed yet).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys


def _site_packages(python: str) -> str:
    out = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    )
    return out.strip()


def _has(python: str, version: str, modules: list[str]) -> bool:
    """Whether python imports the required transformers and finds every extra module."""
    check = (
        f"import importlib.util, sys, transformers; sys.exit(transformers.__version__ != {version!r}"
        f" or any(importlib.util.find_spec(m) is None for m in {modules!r}))"
    )
    return subprocess.call([python, "-c", check], stderr=subprocess.DEVNULL) == 0


def _main_site_dirs() -> list[str]:
    """This interpreter's site directories (venv, system, user) that exist: what the oldest
    environment adds after its own."""
    return [
        p
        for p in sys.path
        if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)
    ]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or "==" not in argv[1]:
        print(__doc__, file=sys.stderr)
        return 2
    venv, requirement, extras = argv[0], argv[1], argv[2:]
    version = requirement.split("==", 1)[1]
    if importlib.util.find_spec("torch") is None:
        print(f"{venv}: run this with the python that has torch", file=sys.stderr)
        return 1
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"creating {venv} ({requirement} over this environment's packages)", flush=True)
        if subprocess.call([sys.executable, "-m", "venv", venv]) != 0:
            print(
                f"{venv}: `{sys.executable} -m venv` failed (python3-venv missing?)",
                file=sys.stderr,
            )
            return 1
    pth = os.path.join(_site_packages(python), "zz_kv_paged_main_env.pth")
    with open(pth, "w") as f:
        for site_dir in _main_site_dirs():
            f.write(f"import site; site.addsitedir({site_dir!r})\n")
    modules = [e.split("=")[0].split("<")[0].split(">")[0].replace("-", "_") for e in extras]
    if _has(python, version, modules):
        return 0
    missing = [requirement, *extras]
    print(f"installing {' '.join(missing)} into {venv}", flush=True)
    status = subprocess.call([python, "-m", "pip", "install", "-q", *missing])
    if status != 0 or not _has(python, version, modules):
        print(f"{venv}: could not install {requirement}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
