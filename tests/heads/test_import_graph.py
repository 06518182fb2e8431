"""heads/ imports kernels/ and distributed.collectives; kernels/ imports no
head, loss or distributed module; distributed/ never imports heads/ (no
cycle); every module of the three imports first in a fresh interpreter."""

import ast
import os
import subprocess
import sys

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")
PKGS = ("heads", "kernels", "distributed")


def _modules(pkg):
    root = os.path.join(SRC, "losskit", pkg)
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), os.path.join(SRC))[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), os.path.join(d, f)


def _imports(path):
    """Every losskit module a file imports, at its top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("losskit"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("losskit")}
    return out


def _pkg(mod):
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = {mod: _imports(path) for pkg in PKGS for mod, path in _modules(pkg)}


def test_graph_was_read():
    assert "losskit.heads.backends.sharded" in GRAPH and "losskit.kernels.chunked_lse" in GRAPH
    assert "losskit.distributed.collectives" in GRAPH["losskit.heads.backends.sharded"]


def test_no_cycle_between_heads_kernels_distributed():
    for mod, deps in GRAPH.items():
        pkgs = {_pkg(d) for d in deps}
        if _pkg(mod) == "kernels":
            assert not pkgs & {"heads", "losses", "functional", "distributed"}, (mod, deps)
        if _pkg(mod) == "distributed":
            assert "heads" not in pkgs and "kernels" not in pkgs, (mod, deps)
        if _pkg(mod) == "heads":
            bad = {d for d in deps if _pkg(d) == "distributed" and d != "losskit.distributed.collectives"}
            assert not bad, (mod, bad)


def test_every_module_imports_first_in_a_fresh_interpreter():
    mods = sorted(GRAPH)
    code = ("import importlib, sys, torch\n"
            f"for m in {mods!r}:\n"
            "    for k in [k for k in sys.modules if k == 'losskit' or k.startswith('losskit.')]:\n"
            "        del sys.modules[k]\n"
            "    importlib.import_module(m)\n"
            "print('ok', len(" + repr(mods) + "))\n")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


def test_backends_share_one_interface():
    from losskit.heads.backends import BACKENDS, HeadBackend
    assert set(BACKENDS) == {"auto", "dense", "chunked", "fused", "sampled", "sharded"}
    for name, b in BACKENDS.items():
        assert isinstance(b, HeadBackend) and b.name == name
