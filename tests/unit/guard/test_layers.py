"""The guard core imports nothing of the edge, and its modules import each other without a circle.

Read from the source with `ast` (every import, also those inside functions and
under TYPE_CHECKING), so a lazy import cannot hide an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

GUARD = Path(__file__).resolve().parents[3] / "src" / "edgeward" / "guard"
EDGE = ("edgeward.edge", "edgeward.net", "edgeward.admin", "edgeward.cli", "edgeward.app", "edgeward.runtime",
        "edgeward.status", "edgeward.guard_adapter", "edgeward.webfront", "edgeward.http", "edgeward.events",
        "edgeward.admission")
# The adapter that wires the guard into the running edge lives outside guard/ (src/edgeward/guard_adapter.py).


def imports(path: Path) -> set[str]:
    """Absolute names of the edgeward modules `path` imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from ..server import Edge
                base = "edgeward.guard".rsplit(".", node.level - 1)[0] if node.level > 1 else "edgeward.guard"
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # "from edgeward.guard import x"
    return {m for m in out if m.startswith("edgeward")}


def modules() -> dict[str, set[str]]:
    return {p.stem: imports(p) for p in sorted(GUARD.glob("*.py")) if p.stem != "__init__"}


def test_the_guard_core_imports_nothing_of_the_edge() -> None:
    found = modules()
    assert len(found) >= 10
    bad = {name: sorted(m for m in mods if m.startswith(EDGE)) for name, mods in found.items()}
    assert {k: v for k, v in bad.items() if v} == {}
    # the adapter really is the one that reaches both (this test would miss a rename)
    adapter = (GUARD.parent / "guard_adapter.py").read_text(encoding="utf-8")
    assert "from .guard." in adapter and "from .events import" in adapter


def test_no_import_circle_inside_the_guard() -> None:
    found = modules()
    graph = {
        name: {m.split(".")[2] for m in mods if m.startswith("edgeward.guard.") and m.split(".")[2] in found}
        for name, mods in found.items()
    }
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        if node in path:
            raise AssertionError("import circle: " + " -> ".join((*path[path.index(node):], node)))
        if node in done:
            return
        for nxt in sorted(graph[node] - {node}):
            visit(nxt, (*path, node))
        done.add(node)

    for name in graph:
        visit(name, ())
    assert graph["matcher"] and "service" not in graph["matcher"]
