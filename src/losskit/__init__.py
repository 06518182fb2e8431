"""losskit: training objectives from recent research, correct to the paper.

    >>> import losskit
    >>> loss = losskit.get("softmax", num_classes=10, embedding_dim=64)

The names below are imported on first use (``import losskit`` does not import
torch), so that ``losskit --help`` and ``losskit --version`` start at once;
``losskit.functional``, ``losskit.losses`` and the other subpackages import as
usual.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "KINDS": "losskit.core.registry", "Paper": "losskit.core.registry", "get": "losskit.core.registry",
    "names": "losskit.core.registry", "register": "losskit.core.registry", "spec": "losskit.core.registry",
    "specs": "losskit.core.registry",
    "set_tensor_checks": "losskit.core.checks", "tensor_checks": "losskit.core.checks",
    "PairReference": "losskit.core.context", "PreferenceBatch": "losskit.core.context",
}

__all__ = ["KINDS", "Paper", "PairReference", "PreferenceBatch", "get", "names", "register", "set_tensor_checks",
           "spec", "specs", "tensor_checks", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'losskit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
