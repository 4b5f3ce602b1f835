"""No two modules of miras_ext import each other, directly or through others, counting the imports inside
functions (a deferred import hides a cycle from Python, not from a reader)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import miras_ext

ROOT = Path(miras_ext.__file__).parent


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the miras_ext modules it imports. A submodule's own packages are left out: Python loads
    them before it, whatever it imports."""
    modules = {_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("miras_ext"):
                target = node.module
            else:
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            deps.update(subs + ([target] if len(subs) < len(node.names) else []))
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    return graph


def test_the_graph_sees_imports() -> None:
    graph = import_graph()
    assert "miras_ext.cli.arguments" in graph["miras_ext.cli.compare"]
    assert "miras_ext.reference.bias" in graph["miras_ext.reference.memory"]  # `from . import bias`
    assert "miras_ext.cli.trainer" in graph["miras_ext.cli.commands"]  # only imported inside functions


def test_no_import_cycle() -> None:
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
