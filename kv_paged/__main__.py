"""`python -m kv_paged demo [--model PATH] [--device cuda] ...`: the command-line entry point
(`make demo` runs it). Subcommands are dispatched here; each lives in its own module."""

from __future__ import annotations

import sys

USAGE = "usage: python -m kv_paged demo [--help] [--model PATH] [--device cpu|cuda] ..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from kv_paged.demo import main as demo_main

        return demo_main(rest)
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
