"""The house's floors: which top-level package may import which (README, "Layout").

``core`` is the shared bottom and imports nothing of the project; ``storage`` imports only
``core``; the two sides, ``relay`` and ``tracker_http``, import ``core`` and ``storage`` and never
each other; ``trackrelay`` (the wiring: CLI, service, metrics) sits on top of everything. Every
import counts, the ones inside functions too, read with the standard library's ``ast``."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "storage", "relay", "tracker_http", "trackrelay")
#: What each package may import of the project (besides itself).
ALLOWED = {
    "core": set(),
    "storage": {"core"},
    "relay": {"core", "storage"},
    "tracker_http": {"core", "storage"},
    "trackrelay": {"core", "storage", "relay", "tracker_http"},
}


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """The project modules ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text("utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


GRAPH = {name: imports_of(name, path) for name, path in modules().items()}


def test_every_module_imports():
    for pkg in PACKAGES:
        root = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(root.__path__, pkg + "."):
            if ".migrations" in info.name:  # alembic's env and versions run inside alembic only
                continue
            importlib.import_module(info.name)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_package_imports_only_the_floors_below_it(pkg):
    wrong = sorted(f"{name} imports {target}" for name, targets in GRAPH.items() if name.split(".")[0] == pkg
                   for target in targets
                   if target.split(".")[0] != pkg and target.split(".")[0] not in ALLOWED[pkg])
    assert wrong == []


def test_the_sides_never_import_each_other():
    crossing = sorted(f"{name} imports {target}" for name, targets in GRAPH.items()
                      for target in targets
                      if {name.split(".")[0], target.split(".")[0]} == {"relay", "tracker_http"})
    assert crossing == []


def _cycles(package: str) -> list[list[str]]:
    names = {n for n in GRAPH if n.split(".")[0] == package}
    edges = {n: {t for t in GRAPH[n] if t in names and t != n} for n in names}
    cycles, state = [], {}

    def visit(n, stack):
        state[n] = "open"
        stack.append(n)
        for t in sorted(edges[n]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[n] = "done"

    for n in sorted(names):
        if n not in state:
            visit(n, [])
    return cycles


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_import_circles_inside_a_package(pkg):
    assert _cycles(pkg) == []


def test_the_checker_sees_function_local_imports(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import storage.models\n"
                   "def f():\n    from relay import smtp\n    import tracker_http.api\n")
    assert imports_of("core.m", mod) == {"relay", "relay.smtp", "tracker_http.api"}
