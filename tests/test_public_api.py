"""losskit.functional and losskit.losses export what they hold."""

import importlib
import inspect
import pkgutil

import pytest

import losskit
import losskit.functional
import losskit.losses


@pytest.mark.parametrize("pkg", [losskit.functional, losskit.losses], ids=lambda p: p.__name__)
def test_every_family_module_is_reexported(pkg):
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        assert hasattr(mod, "__all__"), f"{mod.__name__} has no __all__"
        for name in mod.__all__:
            assert getattr(pkg, name, None) is getattr(mod, name), f"{pkg.__name__}.{name} (from {mod.__name__})"
            assert name in pkg.__all__


def test_family_modules_list_their_public_functions_and_classes():
    for pkg in (losskit.functional, losskit.losses):
        for info in pkgutil.iter_modules(pkg.__path__):
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
            own = [n for n, v in vars(mod).items() if not n.startswith("_") and (inspect.isfunction(v) or
                   inspect.isclass(v)) and v.__module__ == mod.__name__]
            missing = sorted(set(own) - set(mod.__all__))
            assert not missing, f"{mod.__name__}: public but not in __all__: {missing}"


def test_every_registered_objective_class_is_exported_from_losses():
    for s in losskit.specs(kind="objective"):
        if s.cls.__module__.startswith("losskit.losses."):
            assert getattr(losskit.losses, s.cls.__name__, None) is s.cls, s.name


def test_recipes_drift_is_the_module():
    import losskit.recipes.drift as d

    assert inspect.ismodule(d) and inspect.ismodule(losskit.recipes.drift)
