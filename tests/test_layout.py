"""The layout shows the architecture: the pure core imports no I/O, and no module imports itself in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "proxy"
#: What a module of the pure core may not import: it takes values (and ``now``) and returns values.
IMPURE = frozenset({"asyncio", "aiohttp", "filelock", "os", "socket", "redis", "uvloop", "subprocess", "threading"})


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from x import y`` counts x and x.y), under ``TYPE_CHECKING`` too:
    a cycle hidden from the interpreter is still one a reader must untangle."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("proxy.core.")))
def test_the_core_is_pure(name: str) -> None:
    bad = {m for m in imports(MODULES[name]) if m.split(".")[0] in IMPURE}
    assert not bad, f"{name} imports {sorted(bad)}: the core takes values, the edges do I/O"


def test_the_core_imports_only_the_core() -> None:
    for name, path in MODULES.items():
        if name.startswith("proxy.core."):
            outside = {
                m for m in imports(path) if m.startswith("proxy.") and m in MODULES and not m.startswith("proxy.core")
            }
            outside -= {"proxy.errors", "proxy.config"}  # the exception tree and the frozen config values
            assert not outside, f"{name} imports {sorted(outside)} from outside the core"


def test_no_import_cycles() -> None:
    graph = {name: {m for m in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
