"""credproxy uses other libraries only through their public API: no private attribute of a foreign object
is read, written or overridden anywhere in proxy/, and no internal module of a library is imported.

A private attribute (``_name``, not a dunder) is one of credproxy's own when a class of the same module
defines it: assigns it to ``self``, lists it in ``__slots__``, or defines it in its body. Then:

* ``obj._name`` with ``obj`` other than ``self``/``cls`` must name one of the module's own;
* ``self._name`` / ``cls._name`` must be defined by the class itself or by a base class of credproxy's
  (read from a foreign base class, it is that library's private state);
* ``super()._name`` must be defined by a base class of credproxy's;
* a class may not define a private name that a foreign base class already has (an override of a
  library's private hook), checked on the imported classes;
* ``from x import _name``, ``import x._y``, and modules of aiohttp other than its documented public
  ones (``aiohttp``, ``aiohttp.web``, ``aiohttp.abc``) are refused.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "proxy"
FILES = sorted(PACKAGE.rglob("*.py"))
#: The modules of a library that its documentation presents as its API; any other is internal.
PUBLIC_MODULES = {"aiohttp": {"aiohttp", "aiohttp.web", "aiohttp.abc"}}


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def defined_names(cls: ast.ClassDef) -> set[str]:
    """Private names a class defines: body assignments and defs, ``__slots__``, ``self.x = ...``."""
    names: set[str] = set()
    for node in cls.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
                    if target.id == "__slots__" and node.value is not None:
                        names |= {str(e.value) for e in ast.walk(node.value) if isinstance(e, ast.Constant)}
    for item in ast.walk(cls):
        if not isinstance(item, ast.Attribute) or not isinstance(item.ctx, ast.Store):
            continue
        if isinstance(item.value, ast.Name) and item.value.id in ("self", "cls"):
            names.add(item.attr)
    return {name for name in names if isinstance(name, str) and private(name)}


def classes(tree: ast.Module) -> Iterator[ast.ClassDef]:
    return (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef))


def own_classes() -> dict[str, set[str]]:
    """Every class of proxy/ by simple name -> the private names it defines (bases of the same name merge)."""
    table: dict[str, set[str]] = {}
    for path in FILES:
        for cls in classes(ast.parse(path.read_text())):
            table.setdefault(cls.name, set()).update(defined_names(cls))
    return table


OWN = own_classes()


def base_names(cls: ast.ClassDef) -> list[str]:
    return [ast.unparse(base).rpartition(".")[2] for base in cls.bases]


def inherited(cls: ast.ClassDef, own: dict[str, set[str]]) -> set[str]:
    """The private names ``cls`` and its bases of credproxy's define."""
    names = defined_names(cls)
    for base in base_names(cls):
        names |= own.get(base, set())
    return names


class _Owners(ast.NodeVisitor):
    """The innermost class around each node."""

    def __init__(self) -> None:
        self.owner: dict[int, ast.ClassDef] = {}
        self._stack: list[ast.ClassDef] = []

    def generic_visit(self, node: ast.AST) -> None:
        if self._stack:
            self.owner[id(node)] = self._stack[-1]
        if isinstance(node, ast.ClassDef):
            self._stack.append(node)
            super().generic_visit(node)
            self._stack.pop()
        else:
            super().generic_visit(node)


def violations(source: str, where: str) -> list[str]:
    tree = ast.parse(source)
    module_own: set[str] = set()
    own = {name: set(names) for name, names in OWN.items()}
    for cls in classes(tree):
        module_own |= defined_names(cls)
        own.setdefault(cls.name, set()).update(defined_names(cls))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [f"{where}:{node.lineno}: imports {node.module}.{a.name}" for a in node.names if private(a.name)]
            found += module_problem(where, node.lineno, node.module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found += module_problem(where, node.lineno, alias.name)
    owners = _Owners()
    owners.visit(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not private(node.attr):
            continue
        value = node.value
        owner = owners.owner.get(id(node))
        line = f"{where}:{node.lineno}: {ast.unparse(node)}"
        if isinstance(value, ast.Name) and value.id in ("self", "cls"):
            if owner is None or node.attr not in inherited(owner, own):
                found.append(line + " (not defined by this class: a base class's private state)")
        elif isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
            bases = base_names(owner) if owner is not None else []
            if not any(node.attr in own.get(base, set()) for base in bases):
                found.append(line + " (a foreign base class's private member)")
        elif node.attr not in module_own:
            found.append(line + " (a private attribute of another library's object)")
    return found


def module_problem(where: str, line: int, module: str) -> list[str]:
    top = module.partition(".")[0]
    if top == "proxy":
        return []
    if any(private(part) for part in module.split(".")):
        return [f"{where}:{line}: imports the private module {module}"]
    public = PUBLIC_MODULES.get(top)
    if public is not None and module not in public:
        return [f"{where}:{line}: imports {module}, not a documented public module of {top}"]
    return []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_private_attribute_of_another_library_is_touched(path: Path) -> None:
    assert violations(path.read_text(), str(path.relative_to(PACKAGE.parent))) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_class_overrides_a_private_member_of_a_foreign_base(path: Path) -> None:
    if path.name == "__main__.py":
        return  # importing it runs the command; it defines no class
    module = importlib.import_module(module_name(path))
    overrides = []
    for cls in classes(ast.parse(path.read_text())):
        live = getattr(module, cls.name, None)
        if not inspect.isclass(live):
            continue
        foreign = [base for base in live.__mro__[1:] if not base.__module__.startswith("proxy") and base is not object]
        overrides += [f"{cls.name}.{n}" for n in defined_names(cls) if any(hasattr(base, n) for base in foreign)]
    assert overrides == []


@pytest.mark.parametrize(
    "source",
    [
        "site._server.sockets",
        "class S(Base):\n    def f(self):\n        return self._connections",
        "class S(Base):\n    async def f(self):\n        return await super()._make_server()",
        "response._send_headers_immediately = False",
        "from aiohttp.http_parser import SINGLETON_HEADERS",
        "import logging\nlogging._srcfile = None",
        "from yarl import _quoting",
    ],
)
def test_the_check_sees_each_kind_of_access(source: str) -> None:
    assert violations(source + "\n", "probe.py") != []


def test_the_check_allows_a_modules_own_private_names() -> None:
    source = (
        "class A:\n    __slots__ = ('_x',)\n    def __init__(self):\n        self._x = 1\n"
        "    def _helper(self) -> int:\n        return 0\n"
        "    def peer(self, other: 'A') -> int:\n        return other._x + self._x\n"
        "class B(A):\n    def f(self):\n        return self._x + super()._helper()\n"
    )
    assert violations(source, "probe.py") == []
