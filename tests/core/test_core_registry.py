"""core/registry.py: kinds, building by kind, hparams capture, the CLI listing,
errors with close matches, kebab-case names and atomic discovery.

Every fake registration is removed afterwards (the ``clean_registry`` fixture
restores the registry, DISCOVER and the loaded flag)."""

from __future__ import annotations

import inspect
import json
import sys
import textwrap

import pytest
import torch

import losskit
from losskit.cli import main
from losskit.core import registry as R


@pytest.fixture
def clean_registry(monkeypatch):
    R._load_all()  # discover first, so the snapshot is the full registry
    snap = dict(R._REGISTRY)
    mods = set(sys.modules)
    yield
    R._REGISTRY.clear()
    R._REGISTRY.update(snap)
    for m in set(sys.modules) - mods:
        if m.startswith("lk_fake"):
            del sys.modules[m]


# ---------------------------------------------------------------- kinds

def test_the_seven_kinds_with_their_contracts():
    for k in ("objective", "weighter", "miner", "memory", "optimizer", "scheduler", "recipe"):
        assert k in R.KINDS and R.KINDS[k].name == k and R.KINDS[k].contract
    assert R.KINDS["optimizer"].positional == ("params",)
    assert R.KINDS["scheduler"].positional == ("optimizer",)
    assert R.KINDS["objective"].positional == ()


def test_register_kind_refuses_a_different_kind_under_a_taken_name():
    assert R.register_kind(R.KINDS["objective"]) is R.KINDS["objective"]  # same: accepted
    with pytest.raises(ValueError, match="kind 'objective' is already registered"):
        R.register_kind(R.Kind("objective", "something else"))


def test_registered_entries_carry_their_kind():
    for s in losskit.specs(kind=None):
        assert s.kind in R.KINDS
        assert s.contract == R.KINDS[s.kind].contract
    assert {s.kind for s in losskit.specs()} <= {"objective"}  # default filter: objectives
    with pytest.raises(ValueError, match="kind: expected one of"):
        losskit.specs(kind="loss")


class _FakeSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-g["lr"])


class _FakeStep(torch.optim.lr_scheduler.LRScheduler):
    def __init__(self, optimizer, gamma: float = 0.5, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [b * self.gamma ** self.last_epoch for b in self.base_lrs]


def test_optimizer_and_scheduler_kinds_take_their_positional_argument(clean_registry):
    R.register("test-fake-sgd", family="optim", kind="optimizer")(_FakeSGD)
    R.register("test-fake-step", family="optim", kind="scheduler")(_FakeStep)
    s = R.spec("test-fake-sgd")
    assert s.kind == "optimizer" and s.task == "other"
    assert s.hparams == {"lr": 0.1, "momentum": 0.0} and s.required == ()  # params is not a hyperparameter
    w = torch.nn.Parameter(torch.ones(3))
    opt = losskit.get("test-fake-sgd", [w], lr=0.5)
    assert isinstance(opt, _FakeSGD) and opt.param_groups[0]["lr"] == 0.5
    assert opt.hparams == {"lr": 0.5, "momentum": 0.0}
    sched = losskit.get("test-fake-step", opt, gamma=0.1)
    assert sched.hparams == {"gamma": 0.1, "last_epoch": -1}
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(TypeError, match=r"optimizer 'test-fake-sgd' takes params \(then hyperparameters"):
        losskit.get("test-fake-sgd", lr=0.5)
    with pytest.raises(TypeError, match=r"scheduler 'test-fake-step' takes optimizer.*got 2"):
        losskit.get("test-fake-step", opt, opt)
    with pytest.raises(TypeError, match=r"objective 'softmax' takes no positional arguments"):
        losskit.get("softmax", 3, 4)


def test_an_optimizer_must_take_params_first(clean_registry):
    class NoParams(torch.optim.Optimizer):
        def __init__(self, lr=0.1):
            pass

    with pytest.raises(TypeError, match=r"a optimizer takes \('params',\) first.*takes \['lr'\]"):
        R.register("test-fake-noparams", family="optim", kind="optimizer")(NoParams)


def test_recipe_kind_binds_keyword_only_options(clean_registry):
    def fake_recipe(model, data, *, steps: int = 3, lr: float = 0.1):
        return model, data, steps, lr

    R.register("test-fake-recipe", family="optim", kind="recipe")(fake_recipe)
    s = R.spec("test-fake-recipe")
    assert s.kind == "recipe" and s.hparams == {"steps": 3, "lr": 0.1}
    r = losskit.get("test-fake-recipe", steps=7)
    assert r("m", "d") == ("m", "d", 7, 0.1)
    assert r.__wrapped__ is fake_recipe
    with pytest.raises(TypeError, match=r"recipe 'test-fake-recipe' has no hyperparameter 'step'.*Closest: steps"):
        losskit.get("test-fake-recipe", step=7)


# ---------------------------------------------------------------- hparams capture

def test_hparams_are_the_bound_constructor_arguments_with_defaults(clean_registry):
    @R.register("test-fake-obj", family="baseline")
    class Obj(torch.nn.Module):
        def __init__(self, a: int, b: float = 2.0, *, c: str = "x"):
            super().__init__()

    o = Obj(1, c="y")
    assert o.hparams == {"a": 1, "b": 2.0, "c": "y"}
    assert R.spec("test-fake-obj").required == ("a",)
    assert R.spec("test-fake-obj").hparams == {"b": 2.0, "c": "x"}
    assert Obj(5).hparams == {"a": 5, "b": 2.0, "c": "x"}  # per instance, not shared
    assert inspect.signature(Obj.__init__).parameters.keys() == {"self", "a", "b", "c"}  # wraps keep the signature
    with pytest.raises(TypeError, match="Obj: missing a required argument: 'a'"):
        Obj()


def test_hparams_of_a_registered_subclass_are_its_own(clean_registry):
    @R.register("test-fake-base", family="baseline")
    class Base(torch.nn.Module):
        def __init__(self, scale: float = 1.0, reduction: str = "mean"):
            super().__init__()
            self.scale = scale

    @R.register("test-fake-child", family="baseline")
    class Child(Base):
        def __init__(self, margin: float = 0.5, reduction: str = "mean"):
            super().__init__(scale=64.0, reduction=reduction)

    class Unregistered(Base):
        def __init__(self, extra: int = 3):
            super().__init__(scale=2.0)

    c = Child(margin=0.3)
    assert c.hparams == {"margin": 0.3, "reduction": "mean"}  # the outermost call wins
    assert c.scale == 64.0
    assert Base(scale=3.0).hparams == {"scale": 3.0, "reduction": "mean"}
    # an unregistered subclass reports what reached the registered constructor
    assert Unregistered().hparams == {"scale": 2.0, "reduction": "mean"}
    # registering twice does not wrap twice
    R._capture_hparams(Child, R.KINDS["objective"])
    assert Child().hparams == {"margin": 0.5, "reduction": "mean"}


def test_nested_registered_objects_keep_their_own_hparams(clean_registry):
    @R.register("test-fake-inner", family="baseline")
    class Inner(torch.nn.Module):
        def __init__(self, k: int = 1):
            super().__init__()

    @R.register("test-fake-outer", family="baseline")
    class Outer(torch.nn.Module):
        def __init__(self, inner: str = "test-fake-inner", k: int = 9):
            super().__init__()
            self.inner = losskit.get(inner, k=k + 1)

    o = Outer(k=4)
    assert o.hparams == {"inner": "test-fake-inner", "k": 4}
    assert o.inner.hparams == {"k": 5}


def test_registered_objectives_carry_hparams():
    loss = losskit.get("arcface", num_classes=3, embedding_dim=4, margin=0.3)
    assert loss.hparams["margin"] == 0.3 and loss.hparams["num_classes"] == 3
    assert loss.hparams["scale"] == losskit.spec("arcface").hparams["scale"]


# ---------------------------------------------------------------- listing

def test_cli_list_kind_filters(capsys, clean_registry):
    @R.register("test-fake-weighter", family="robust", kind="weighter")
    class W:
        def __init__(self, alpha: float = 1.0):
            pass

    assert main(["list", "--kind", "objective"]) == 0
    out = capsys.readouterr().out
    assert "softmax" in out and "arcface" in out and "test-fake-weighter" not in out
    assert main(["list", "--kind", "weighter"]) == 0
    out = capsys.readouterr().out
    assert "test-fake-weighter" in out and "softmax" not in out
    assert main(["list", "--kind", "weighter", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert "test-fake-weighter" in [r["name"] for r in rows] and {r["kind"] for r in rows} == {"weighter"}
    fake = next(r for r in rows if r["name"] == "test-fake-weighter")
    assert fake["hparams"] == {"alpha": 1.0}
    assert main(["list"]) == 0  # every kind
    out = capsys.readouterr().out
    assert "test-fake-weighter" in out and "softmax" in out
    with pytest.raises(SystemExit):
        main(["list", "--kind", "loss"])


def test_list_orders_by_kind_then_family(clean_registry):
    R.register("test-fake-opt", family="optim", kind="optimizer")(_FakeSGD)
    kinds = [s.kind for s in losskit.specs(kind=None)]
    order = list(R.KINDS)
    assert kinds == sorted(kinds, key=order.index)
    assert "test-fake-opt" in losskit.names(kind="optimizer")


# ---------------------------------------------------------------- errors

def test_unknown_names_name_the_closest():
    with pytest.raises(KeyError, match=r"unknown name 'arcfase'\. Closest: arcface"):
        losskit.get("arcfase")
    with pytest.raises(KeyError, match=r"unknown objective 'cosfase'\. Closest: cosface.*`losskit list` shows all"):
        losskit.spec("cosfase", kind="objective")
    with pytest.raises(KeyError, match="unknown weighter 'arcface'"):
        losskit.spec("arcface", kind="weighter")  # known, but not of that kind
    with pytest.raises(KeyError, match=r"unknown name 'zzzzzzzz'\. `losskit list`"):
        losskit.get("zzzzzzzz")  # nothing close: no "Closest"


def test_unknown_and_missing_hyperparameters_are_named():
    with pytest.raises(TypeError, match=r"objective 'arcface' has no hyperparameter 'margn'\. Closest: margin"):
        losskit.get("arcface", num_classes=3, embedding_dim=4, margn=0.1)
    with pytest.raises(TypeError, match=r"objective 'arcface' needs num_classes, embedding_dim \(no default\)"):
        losskit.get("arcface")


@pytest.mark.parametrize("bad", ["Bad-Name", "bad_name", "bad name", "ArcFace"])
def test_register_refuses_names_that_are_not_kebab_case(bad, clean_registry):
    with pytest.raises(ValueError, match=f"registry names are kebab-case; got {bad!r}"):
        R.register(bad, family="baseline")
    assert bad not in R._REGISTRY


def test_register_refuses_unknown_family_kind_task_and_duplicates(clean_registry):
    with pytest.raises(ValueError, match="family must be one of"):
        R.register("test-fake-x", family="nope")
    with pytest.raises(ValueError, match="kind must be one of"):
        R.register("test-fake-x", family="baseline", kind="loss")
    with pytest.raises(ValueError, match="task must be one of"):
        R.register("test-fake-x", family="baseline", task="vision")

    class Other(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="'softmax' is already registered by"):
        R.register("softmax", family="baseline")(Other)


# ---------------------------------------------------------------- atomic discovery

def _fake_package(tmp_path, name: str, bad_body: str) -> None:
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a_good.py").write_text(textwrap.dedent("""
        import torch
        from losskit.core.registry import register

        @register("test-fake-discovered", family="baseline")
        class Discovered(torch.nn.Module):
            pass
    """))
    (pkg / "b_bad.py").write_text(textwrap.dedent(bad_body))


def test_discovery_failing_on_an_optional_dependency_leaves_the_registry_unchanged(tmp_path, monkeypatch,
                                                                                   clean_registry):
    _fake_package(tmp_path, "lk_fakepkg", """
        raise ImportError("No module named 'flwr'", name="flwr")
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dict(R._REGISTRY)
    monkeypatch.setattr(R, "DISCOVER", [*R.DISCOVER, "lk_fakepkg"])
    monkeypatch.setattr(R, "_LOADED", False)
    with pytest.raises(ImportError, match=r"importing lk_fakepkg\.b_bad failed.*pip install 'losskit\[flower\]'.*"
                                          r"left as it was") as ei:
        losskit.specs()
    assert ei.value.name == "flwr"
    assert isinstance(ei.value.__cause__, ImportError)
    assert R._REGISTRY == before  # the module that did import cleanly registered nothing that stayed
    assert "test-fake-discovered" not in R._REGISTRY
    assert R._LOADED is False  # the next use tries again
    with pytest.raises(ImportError, match=r"losskit\[flower\]"):
        losskit.get("softmax", num_classes=2, embedding_dim=2)


def test_discovery_failure_without_a_known_extra_has_no_install_hint(tmp_path, monkeypatch, clean_registry):
    _fake_package(tmp_path, "lk_fakepkg2", """
        import lk_fake_module_that_does_not_exist
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dict(R._REGISTRY)
    monkeypatch.setattr(R, "DISCOVER", ["lk_fakepkg2"])
    monkeypatch.setattr(R, "_LOADED", False)
    with pytest.raises(ImportError, match=r"importing lk_fakepkg2\.b_bad failed") as ei:
        R.names()
    assert "pip install" not in str(ei.value)
    assert R._REGISTRY == before


def test_no_discovered_module_imports_an_optional_dependency_at_its_top():
    import importlib
    import pkgutil
    import subprocess

    mods = []
    for pkg_name in R.DISCOVER:
        pkg = importlib.import_module(pkg_name)
        mods += [f"{pkg_name}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    blocked = sorted(R.OPTIONAL_EXTRAS)
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in {blocked!r}:
                    raise ImportError(f"blocked optional dependency {{name}}", name=name)
        sys.meta_path.insert(0, Block())
        import losskit
        losskit.specs(kind=None)
        for m in {mods!r}:
            importlib.import_module(m)
    """)
    env_path = str(__import__("pathlib").Path(R.__file__).parents[2])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert r.returncode == 0, r.stderr[-2000:]
