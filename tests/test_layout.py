"""The process boundary, read from the tree and the imports: every module lives in one
room (a subpackage: one side of the process boundary or one contract between them), and
the arrows between rooms point one way only.

    aiodcp/_parent/   the trainer's process        aiodcp/_daemon/  the child process
    aiodcp/_wire/     contract: the protocol       aiodcp/_staging/ contract: shared memory
    aiodcp/_disk/     contract: the root's layout  aiodcp/_tools/   CLI and benchmarks
    aiodcp/__init__.py (public), __main__.py (tools), _errors.py (shared by all)
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "aiodcp"

ROOMS = ("_parent", "_daemon", "_wire", "_staging", "_disk", "_tools")
TOP = {"__init__": "public", "__main__": "_tools", "_errors": "shared"}

# room -> rooms it may import (besides itself and "shared")
ALLOWED: dict[str, set[str]] = {
    "_wire": set(),
    "_staging": set(),
    "_disk": set(),
    "_daemon": {"_wire", "_staging", "_disk"},
    "_parent": {"_wire", "_staging", "_disk", "public"},
    "public": {"_parent", "_disk"},
    "_tools": {"_parent", "_daemon", "_wire", "_staging", "_disk", "public"},
    "shared": set(),
}


def name_of(path: Path) -> str:
    """``aiodcp/_parent/_saving.py`` -> ``_parent._saving``; ``_errors.py`` -> ``_errors``."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def room_of(name: str) -> str:
    head = name.split(".")[0]
    if head in ROOMS:
        return head
    return TOP.get(name, "?")


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imports_of(path: Path, *, top_level_only: bool = False, package: str = "") -> set[str]:
    """The aiodcp modules ``path`` imports, as names below ``aiodcp`` (``_parent._saving``;
    a subpackage imported for its modules counts as each of them), anywhere in the file
    unless ``top_level_only``. ``package``: the file's package below aiodcp."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    here = package.split(".") if package else []
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                mod = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "aiodcp":
                mod = node.module.split(".")[1:]
            else:
                continue
            if not mod:
                found.update("__init__" if a.name == "*" else a.name for a in node.names)
            elif len(mod) == 1 and mod[0] in ROOMS:
                found.update(f"{mod[0]}.{a.name}" for a in node.names)
            else:
                found.add(".".join(mod))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "aiodcp":
                    found.add(".".join(parts[1:]) if len(parts) > 1 else "__init__")
    return found


def graph() -> dict[str, set[str]]:
    out = {}
    for path in modules():
        package = ".".join(path.parent.relative_to(PACKAGE).parts)
        out[name_of(path)] = imports_of(path, package=package)
    return out


def test_the_tree_shows_the_rooms() -> None:
    """Only the public package, the entry point and the shared errors live at the top;
    everything else is in a room, and every room says what it is."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "_errors.py"], top
    rooms = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert rooms == sorted(ROOMS), rooms
    for room in ROOMS:
        doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text()))
        assert doc, f"{room}/__init__.py must say what the room owns"


def test_imports_cross_the_process_boundary_one_way() -> None:
    """The daemon never imports the trainer's side; the contracts (wire, staging, disk)
    import neither side; nothing but the tools imports the tools."""
    wrong = []
    for name, targets in graph().items():
        room = room_of(name)
        for target in targets:
            other = room_of(target)
            if other in (room, "shared") or other in ALLOWED[room]:
                continue
            wrong.append(f"{name} ({room}) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles() -> None:
    """No two modules import each other, directly or through others (function-level
    imports included: a lazy import is still a circle in the design)."""
    g = {
        n: {t for t in deps if not t.endswith("__init__") and t != n} for n, deps in graph().items()
    }
    g = {n: deps for n, deps in g.items() if not n.endswith("__init__")}
    seen: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if seen.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = 2

    for node in sorted(g):
        if node not in seen:
            visit(node)


def test_the_rules_catch_a_wrong_arrow(tmp_path: Path) -> None:
    """The reader sees every import form the package uses."""
    src = tmp_path / "m.py"
    src.write_text(
        "from . import _checkpointer as c\nfrom ._saving import x\nimport aiodcp._parent._load\n"
        "from .._disk import _store\nfrom ..__init__ import y\n"
        "from aiodcp._wire._protocol import P\n"
        "def f():\n    from .._daemon._daemon import main\n"
    )
    found = imports_of(src, package="_parent")
    assert found == {
        "_parent._checkpointer", "_parent._saving", "_parent._load", "_disk._store",
        "__init__", "_wire._protocol", "_daemon._daemon",
    }  # fmt: skip
    assert "_daemon._daemon" not in imports_of(src, package="_parent", top_level_only=True)
    assert room_of("_daemon._daemon") == "_daemon" and room_of("_errors") == "shared"
