"""kv_paged's modules import each other without cycles (every import statement, also those inside
functions; a package's __init__ is the package's module), and only kv_paged.integrations.hf imports
transformers (besides the demo application)."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "kv_paged"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    """A .py module, a package, or a compiled extension with its .pyi stub (kv_paged._C)."""
    rel = pathlib.Path(*name.split("."))
    return (
        (ROOT.parent / rel).with_suffix(".py").exists()
        or (ROOT.parent / rel).with_suffix(".pyi").exists()
        or (ROOT.parent / rel).is_dir()
    )


def _imports(path: pathlib.Path) -> set[str]:
    """kv_paged modules the file imports anywhere (lazy imports inside functions too: one run at
    import time is as eager as any), and "transformers" if it imports transformers."""
    out: set[str] = set()
    for stmt in ast.walk(ast.parse(path.read_text())):
        if isinstance(stmt, ast.Import):
            names = [a.name for a in stmt.names]
        elif isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
            # `from kv_paged import ops` imports the submodule; `from kv_paged import X` the package
            names = [f"{stmt.module}.{a.name}" for a in stmt.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "transformers":
                out.add("transformers")
            elif name.split(".")[0] == "kv_paged":
                while not _is_module(name):
                    name = name.rsplit(".", 1)[0]
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        graph[name] = {m for m in _imports(path) if m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import cycle of graph (module -> modules it imports), or None."""
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node) :] + [node]
        if node in done or node not in graph:
            return None
        for dep in sorted(graph[node]):
            cycle = visit(dep, stack + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_planted_cycle_is_found() -> None:
    """The old hf/cache.py imported the kv_paged package, whose __init__ imports the hf package."""
    graph = _graph()
    graph["kv_paged"].add("kv_paged.integrations.hf")
    graph["kv_paged.integrations.hf.cache"].add("kv_paged")
    assert find_cycle(graph) is not None


def test_only_the_hf_package_imports_transformers() -> None:
    """The library reaches transformers through kv_paged.integrations.hf only; the demo (an
    application: it builds and loads HF models) is the one other user."""
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if "transformers" in deps)
    library = [m for m in users if m != "kv_paged.demo"]
    assert library and all(m.startswith("kv_paged.integrations.hf") for m in library), users
