"""The Engine's ownership rules, read from its source: the Scheduler is the only module of
kv_paged/engine/ that changes the BlockManager (allocate, append, fork, mark computed, free, ...);
the others may only read its stats. A planted call is found, so the check can fail."""

from __future__ import annotations

import ast
import pathlib

ENGINE = pathlib.Path(__file__).resolve().parent.parent / "kv_paged" / "engine"
OWNER = "scheduler.py"
# BlockManager methods that change its state or hand out per-step data of the Scheduler's.
DRIVING = {
    "allocate", "append_slot", "append_slots", "decode_step", "fork", "free", "mark_computed",
    "forget_computed", "slot_mapping", "block_tables", "take_copies",
}  # fmt: skip


def _block_manager_calls(source: str) -> list[str]:
    """Calls `<...>.block_manager.<m>(...)` or `<...>.bm.<m>(...)` with m a driving method."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
        if name in ("block_manager", "bm") and node.func.attr in DRIVING:
            found.append(f"{name}.{node.func.attr} (line {node.lineno})")
    return found


def test_only_the_scheduler_drives_the_block_manager():
    offenders = {
        path.name: calls
        for path in sorted(ENGINE.glob("*.py"))
        if path.name != OWNER and (calls := _block_manager_calls(path.read_text()))
    }
    assert offenders == {}
    assert _block_manager_calls((ENGINE / OWNER).read_text())  # the owner does, so this can see


def test_a_planted_call_is_found():
    planted = "def f(self):\n    self.block_manager.stats()\n    self.block_manager.fork(1, 2)\n"
    assert _block_manager_calls(planted) == ["block_manager.fork (line 3)"]
