"""The process boundary, read from the imports: every module belongs to one side or one
contract, and the arrows between them point one way only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "aiodcp"

# Each module's room. A new module must be placed here (the test fails until it is).
ROOMS: dict[str, str] = {
    # the trainer's process
    "_checkpointer": "parent", "_saving": "parent", "_outcomes": "parent",
    "_preempt": "parent", "_parts": "parent", "_guard": "parent", "_handle": "parent",
    "_generation": "parent", "_supervisor": "parent", "_slots": "parent", "_dist": "parent",
    "_load": "parent", "_watch": "parent", "_load_remote": "parent",
    "_publish": "parent", "_follow": "parent",
    # the daemon process
    "_daemon": "daemon", "_persist": "daemon", "_writer": "daemon", "_records": "daemon",
    "_direct": "daemon", "_dcp_errors": "daemon",
    # the contracts between them
    "_protocol": "wire", "_messages": "wire", "_pubwire": "wire",
    "_staging": "staging", "_arena": "staging", "_versions": "staging",
    "_storage": "disk", "_manifest": "disk", "_retention": "disk", "_safe": "disk",
    "_store": "disk", "_roots": "disk", "_store_s3": "disk",
    # tools, and what everything shares
    "_cli": "tools", "_cli_remote": "tools", "_bench": "tools", "_bench_train": "tools",
    "__main__": "tools",
    "_errors": "shared", "__init__": "public",
}  # fmt: skip

# room -> rooms it may import (besides itself and "shared")
ALLOWED: dict[str, set[str]] = {
    "wire": set(),
    "staging": set(),
    "disk": set(),
    "daemon": {"wire", "staging", "disk"},
    "parent": {"wire", "staging", "disk", "public"},
    "public": {"parent", "disk"},
    "tools": {"parent", "daemon", "wire", "staging", "disk", "public"},
    "shared": set(),
}


def imports_of(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The aiodcp modules ``path`` imports (``from . import x``, ``from ._x import y``,
    ``import aiodcp._x``), anywhere in the file unless ``top_level_only``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("aiodcp."):
                found.add(node.module.split(".")[1])
            elif node.module == "aiodcp":
                found.add("__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "aiodcp":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def test_every_module_has_a_room() -> None:
    """A module nobody placed is a module whose boundary nobody checked."""
    unplaced = [p.stem for p in modules() if p.stem not in ROOMS]
    assert not unplaced, f"place these modules in tests/test_layout.py ROOMS: {unplaced}"


def test_imports_cross_the_process_boundary_one_way() -> None:
    """The daemon never imports the trainer's side; the contracts (wire, staging, disk)
    import neither side; nothing but the tools imports the tools."""
    wrong = []
    for path in modules():
        room = ROOMS.get(path.stem)
        if room is None:
            continue
        for target in imports_of(path):
            other = ROOMS.get(target, "?")
            if other in (room, "shared") or other in ALLOWED[room]:
                continue
            wrong.append(f"{path.stem} ({room}) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles() -> None:
    """No two modules import each other, directly or through others (function-level
    imports included: a lazy import is still a circle in the design)."""
    graph = {p.stem: imports_of(p) & set(ROOMS) - {p.stem} for p in modules()}
    graph.pop("__init__", None)
    for deps in graph.values():
        deps.discard("__init__")
    seen: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node)


def test_the_rules_catch_a_wrong_arrow(tmp_path: Path) -> None:
    """The reader sees every import form the package uses."""
    src = tmp_path / "m.py"
    src.write_text(
        "from . import _checkpointer as c\nfrom ._saving import x\nimport aiodcp._load\n"
        "def f():\n    from ._guard import Guard\n"
    )
    assert imports_of(src) == {"_checkpointer", "_saving", "_load", "_guard"}
    assert imports_of(src, top_level_only=True) == {"_checkpointer", "_saving", "_load"}
