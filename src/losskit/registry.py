"""The objective registry.

Every objective is registered under a stable kebab-case name with its paper,
its family and the task it solves.  Hyperparameters and their defaults are
read from the module's ``__init__`` signature, so they are never written
twice.  ``get(name, **hparams)`` returns a ready module.

Registration is a class decorator::

    @register("arcface", family="margin", task="embedding",
              paper=Paper("ArcFace: Additive Angular Margin Loss ...", 2019, "1801.07698"))
    class ArcFaceLoss(nn.Module): ...

Modules that register objectives live in ``losskit.losses`` (any submodule);
the registry imports them all on first use, so adding a file is enough.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Paper", "ObjectiveSpec", "register", "get", "spec", "specs", "names", "TASKS", "FAMILIES"]

#: What an objective consumes.  ``embedding``: ``loss(embeddings, labels)``;
#: ``preference``: ``loss(policy_chosen_logps, policy_rejected_logps,
#: ref_chosen_logps, ref_rejected_logps)``; ``logits``: ``loss(logits, labels)``;
#: ``other``: documented on the module.
TASKS = ("embedding", "preference", "logits", "other")

FAMILIES = {
    "baseline": "Baselines",
    "margin": "Margin classification heads",
    "pair": "Pair-based metric learning",
    "contrastive": "Contrastive and multimodal",
    "preference": "Preference optimisation",
    "robust": "Robust and weighted training",
    "optim": "Optimisers, schedules and recipes",
}


@dataclass(frozen=True)
class Paper:
    title: str
    year: int
    arxiv: str | None = None

    def cite(self) -> str:
        tail = f", arXiv:{self.arxiv}" if self.arxiv else ""
        return f"{self.title} ({self.year}{tail})"


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    cls: type
    family: str
    task: str
    paper: Paper | None
    summary: str = ""
    #: hyperparameters with defaults, read from the signature
    hparams: dict[str, Any] = field(default_factory=dict)
    #: arguments without a default (for example ``num_classes``)
    required: tuple[str, ...] = ()

    @property
    def needs_classes(self) -> bool:
        return "num_classes" in self.required or "num_classes" in self.hparams

    def to_json(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, (bool, int, float, str)) or v is None:
                return v
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return repr(v)

        return {
            "name": self.name,
            "family": self.family,
            "task": self.task,
            "summary": self.summary,
            "paper": None
            if self.paper is None
            else {"title": self.paper.title, "year": self.paper.year, "arxiv": self.paper.arxiv},
            "required": list(self.required),
            "hparams": {k: plain(v) for k, v in self.hparams.items()},
            "class": f"{self.cls.__module__}.{self.cls.__qualname__}",
        }


_REGISTRY: dict[str, ObjectiveSpec] = {}
_LOADED = False


def _signature(cls: type) -> tuple[dict[str, Any], tuple[str, ...]]:
    hparams: dict[str, Any] = {}
    required: list[str] = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        else:
            hparams[p.name] = p.default
    return hparams, tuple(required)


def register(
    name: str,
    *,
    family: str,
    task: str = "embedding",
    paper: Paper | None = None,
    summary: str = "",
) -> Callable[[type], type]:
    """Class decorator that registers an objective under ``name``."""
    if name != name.lower() or " " in name or "_" in name:
        raise ValueError(f"objective names are kebab-case; got {name!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}; got {family!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"objective {name!r} is already registered by {_REGISTRY[name].cls}")
        hparams, required = _signature(cls)
        doc = summary or (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        _REGISTRY[name] = ObjectiveSpec(name, cls, family, task, paper, doc, hparams, required)
        cls.registry_name = name
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import losskit.losses as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")


def _closest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.4)
    return f" Closest: {', '.join(close)}." if close else ""


def spec(name: str) -> ObjectiveSpec:
    """The registry entry for ``name``; an unknown name names the closest ones."""
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(
            f"unknown objective {name!r}.{_closest(name, sorted(_REGISTRY))} "
            f"`losskit list` shows all {len(_REGISTRY)}."
        )
    return _REGISTRY[name]


def specs(family: str | None = None, task: str | None = None) -> list[ObjectiveSpec]:
    _load_all()
    out = sorted(_REGISTRY.values(), key=lambda s: (list(FAMILIES).index(s.family), s.name))
    return [s for s in out if (family is None or s.family == family) and (task is None or s.task == task)]


def names(family: str | None = None, task: str | None = None) -> list[str]:
    return [s.name for s in specs(family, task)]


def get(name: str, **hparams: Any):
    """Build the objective ``name`` with ``hparams`` (defaults for the rest)."""
    s = spec(name)
    valid = list(s.hparams) + list(s.required)
    for key in hparams:
        if key not in valid:
            raise TypeError(
                f"objective {name!r} has no hyperparameter {key!r}.{_closest(key, valid)} "
                f"Valid: {', '.join(valid)}."
            )
    missing = [r for r in s.required if r not in hparams]
    if missing:
        raise TypeError(f"objective {name!r} needs {', '.join(missing)} (no default)")
    return s.cls(**hparams)
