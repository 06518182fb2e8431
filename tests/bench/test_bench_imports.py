"""No import cycle among the bench's (and the data package's) modules.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``
(at the top of a module and inside functions alike: a lazy import hides a cycle, it does
not remove it), except those under ``if TYPE_CHECKING:``.  The implicit import of a parent
package is not an edge (Python runs a package's ``__init__`` before its submodules, and a
submodule importing its siblings is fine).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGES = ("losskit.bench", "losskit.data")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        root = SRC / pkg.replace(".", "/")
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(SRC).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[str] = []  # candidate module names, most specific first per alias

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for n in node.orelse:
                self.visit(n)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [a.name for a in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[:len(base) - (node.level - 1)]
            full = ".".join(base + ([node.module] if node.module else []))
        else:
            full = node.module
        for a in node.names:
            self.found.append((full, f"{full}.{a.name}"))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        v = _Imports(mod, path.name == "__init__.py")
        v.visit(ast.parse(path.read_text(), str(path)))
        for item in v.found:
            if isinstance(item, tuple):  # from FULL import NAME: NAME is a submodule or a name in FULL
                full, sub = item
                target = sub if sub in mods else full
            else:
                target = item
            if target in mods and target != mod:
                graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_top_level_lazy_and_relative_imports():
    g = import_graph()
    assert "losskit.bench.report" in g["losskit.bench.runner"]  # from . import report
    assert "losskit.bench.tasks.base" in g["losskit.bench.tasks.embedding"]  # from .base import ...
    assert "losskit.data.samplers" in g["losskit.bench.tasks.embedding"]  # absolute
    assert "losskit.data" in g["losskit.bench.config"]  # inside a function
    assert "losskit.bench.config" not in g["losskit.bench.tasks.base"]  # under TYPE_CHECKING only


def test_bench_and_data_modules_have_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_each_bench_module_imports_first_in_a_fresh_interpreter():
    # every module imported first (all of losskit dropped from sys.modules in between): one
    # subprocess for all of them, so the check costs one torch start-up
    mods = sorted(_modules(), reverse=True)
    code = (
        "import importlib, sys, traceback\n"
        f"mods = {mods!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'losskit' or k.startswith('losskit.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception:\n"
        "        bad.append(m + ': ' + traceback.format_exc(limit=-3))\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode:
        pytest.fail(r.stdout + r.stderr)
