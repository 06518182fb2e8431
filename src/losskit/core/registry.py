"""The registry: every public method under a stable kebab-case name, with its
paper, its family and its **kind**.

A kind is a call contract plus a way to build:

============  ======================================================  ==============================
kind          built as                                                called as
============  ======================================================  ==============================
objective     ``get(name, **hp)``                                     ``loss(inputs..., sample_weight=None) -> Tensor``
weighter      ``get(name, **hp)``                                     ``w(losses [B], ids) -> weights [B]``
miner         ``get(name, **hp)``                                     ``m(embeddings, labels) -> indices``
memory        ``get(name, **hp)`` (wraps an objective)                ``mem(embeddings, labels) -> Tensor``
optimizer     ``get(name, params, **hp)`` (a ``torch.optim.Optimizer``)  ``opt.step()``
scheduler     ``get(name, optimizer, **hp)`` (an ``LRScheduler``)     ``sched.step()``
recipe        ``get(name, **hp)`` (a procedure with its options bound)  ``recipe(model, data, ...)``
============  ======================================================  ==============================

More kinds can be added with :func:`register_kind`.  Hyperparameters and
their defaults are read from one place, the class's ``__init__`` signature
(for a recipe function: its keyword-only parameters), and a registered
class's instances carry them as ``self.hparams`` (captured at construction,
so no module restates its signature).

Modules that register live in the packages of :data:`DISCOVER`; they are all
imported on first use (atomically: a module that fails to import leaves the
registry as it was and raises an ImportError naming the extra to install).
Discovered modules import optional dependencies lazily, never at their top.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Paper", "Spec", "ObjectiveSpec", "Kind", "KINDS", "register", "register_kind", "get", "spec",
           "specs", "names", "TASKS", "FAMILIES", "DISCOVER", "OPTIONAL_EXTRAS"]

#: What an objective consumes.  ``embedding``: ``loss(embeddings, labels)``;
#: ``preference``: ``loss(policy_chosen_logps, policy_rejected_logps,
#: ref_chosen_logps, ref_rejected_logps)``; ``logits``: ``loss(logits, labels)``;
#: ``paired``: ``loss(a, b)``, row i of ``a`` and row i of ``b`` a positive pair (two towers);
#: ``other``: documented on the object.
TASKS = ("embedding", "preference", "logits", "paired", "other")

FAMILIES = {
    "baseline": "Baselines",
    "margin": "Margin classification heads",
    "pair": "Pair-based metric learning",
    "contrastive": "Contrastive and multimodal",
    "preference": "Preference optimisation",
    "robust": "Robust and weighted training",
    "continual": "Training on changing data",
    "optim": "Optimisers, schedules and recipes",
    "federated": "Federated learning",
    "unlearning": "Unlearning, distillation and data efficiency",
    "theory": "Theory papers, reproduced",
}

#: packages whose submodules register entries (imported on first use)
DISCOVER = ["losskit.losses", "losskit.weighting", "losskit.mining", "losskit.optim", "losskit.recipes"]

#: top-level module of an optional dependency -> the losskit extra that installs it
OPTIONAL_EXTRAS = {"flwr": "flower", "trl": "trl", "transformers": "trl", "faiss": "faiss",
                   "sklearn": "bench", "matplotlib": "bench", "tqdm": "bench", "PIL": "bench",
                   "pytorch_metric_learning": "dev", "trak": "trak", "scipy": "fits"}


@dataclass(frozen=True)
class Paper:
    title: str
    year: int
    arxiv: str | None = None

    def cite(self) -> str:
        tail = f", arXiv:{self.arxiv}" if self.arxiv else ""
        return f"{self.title} ({self.year}{tail})"


@dataclass(frozen=True)
class Kind:
    """A registry kind: its call contract and how :func:`get` builds it."""

    name: str
    contract: str
    #: leading constructor arguments that are not hyperparameters (``params`` for an optimizer)
    positional: tuple[str, ...] = ()
    #: a callable ``(obj, positional_args, hparams) -> instance``; default ``obj(*args, **hparams)``
    build: Callable[..., Any] | None = None


def _build_recipe(obj, args, hparams):
    if inspect.isclass(obj):
        return obj(*args, **hparams)
    bound = functools.partial(obj, **hparams)
    functools.update_wrapper(bound, obj)
    return bound


KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    if kind.name in KINDS and KINDS[kind.name] != kind:
        raise ValueError(f"kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


for _k in (
    Kind("objective", "loss(inputs..., sample_weight=None) -> Tensor ([B] for reduction='none', else a scalar)"),
    Kind("weighter", "w(losses [B], sample_ids=None) -> detached Tensor [B] (also w.weights, w.loss, w.step()); "
                     "state_dict()/load_state_dict()"),
    Kind("miner", "miner(embeddings [B, D], labels [B], reference=None) -> index tensors"),
    Kind("memory", "memory(embeddings [B, D], labels [B], sample_weight=None) -> Tensor; wraps an objective"),
    Kind("optimizer", "a torch.optim.Optimizer: get(name, params, **hp); step(closure=None)", ("params",)),
    Kind("scheduler", "a torch.optim.lr_scheduler.LRScheduler: get(name, optimizer, **hp); step()", ("optimizer",)),
    Kind("recipe", "a training procedure: get(name, **hp) binds its options; call it with its data",
         build=_build_recipe),
):
    register_kind(_k)


@dataclass(frozen=True)
class Spec:
    name: str
    cls: Any
    family: str
    task: str
    paper: Paper | None
    summary: str = ""
    #: hyperparameters with defaults, read from the signature
    hparams: dict[str, Any] = field(default_factory=dict)
    #: hyperparameters without a default (for example ``num_classes``)
    required: tuple[str, ...] = ()
    kind: str = "objective"

    @property
    def needs_classes(self) -> bool:
        return "num_classes" in self.required or "num_classes" in self.hparams

    @property
    def contract(self) -> str:
        return KINDS[self.kind].contract

    def to_json(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, (bool, int, float, str)) or v is None:
                return v
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if callable(v) and hasattr(v, "__qualname__"):
                return f"{v.__module__}.{v.__qualname__}"
            return repr(v)

        return {
            "name": self.name,
            "kind": self.kind,
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


ObjectiveSpec = Spec  # the name before kinds existed

_REGISTRY: dict[str, Spec] = {}
_LOADED = False


def _params_of(obj: Any, kind: Kind) -> list[inspect.Parameter]:
    if inspect.isclass(obj):
        ps = list(inspect.signature(obj.__init__).parameters.values())[1:]
    else:
        ps = [p for p in inspect.signature(obj).parameters.values() if p.kind == p.KEYWORD_ONLY]
        return ps
    ps = [p for p in ps if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    lead = [p.name for p in ps[:len(kind.positional)]]
    if lead != list(kind.positional):
        raise TypeError(f"a {kind.name} takes {kind.positional} first; {obj.__qualname__}.__init__ takes {lead}")
    return ps[len(kind.positional):]


def _signature(obj: Any, kind: Kind) -> tuple[dict[str, Any], tuple[str, ...]]:
    hparams: dict[str, Any] = {}
    required: list[str] = []
    for p in _params_of(obj, kind):
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        else:
            hparams[p.name] = p.default
    return hparams, tuple(required)


def _capture_hparams(cls: type, kind: Kind) -> None:
    """Wrap ``cls.__init__`` so that instances carry ``self.hparams``: the
    bound constructor arguments with defaults filled in (outermost call wins)."""
    init = cls.__init__
    if getattr(init, "_losskit_captures", None) is cls:
        return
    sig = inspect.signature(init)
    npos = len(kind.positional)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        outer = "hparams" not in self.__dict__
        if outer:
            try:
                bound = sig.bind(self, *args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{cls.__qualname__}: {e}") from None
            bound.apply_defaults()
            vals = {k: v for k, v in list(bound.arguments.items())[1 + npos:]
                    if sig.parameters[k].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                       inspect.Parameter.VAR_KEYWORD)}
            object.__setattr__(self, "hparams", vals)
        init(self, *args, **kwargs)

    __init__._losskit_captures = cls
    cls.__init__ = __init__


def register(name: str, *, family: str, kind: str = "objective", task: str | None = None,
             paper: Paper | None = None, summary: str = "") -> Callable[[Any], Any]:
    """Decorator registering a class (or, for recipes, a function) under ``name``."""
    if name != name.lower() or " " in name or "_" in name:
        raise ValueError(f"registry names are kebab-case; got {name!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}; got {family!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}; got {kind!r}")
    task = task if task is not None else ("embedding" if kind == "objective" else "other")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    k = KINDS[kind]

    def deco(obj: Any) -> Any:
        if name in _REGISTRY and _REGISTRY[name].cls is not obj:
            raise ValueError(f"{name!r} is already registered by {_REGISTRY[name].cls}")
        hparams, required = _signature(obj, k)
        doc = summary or (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")
        _REGISTRY[name] = Spec(name, obj, family, task, paper, doc, hparams, required, kind)
        if inspect.isclass(obj):
            _capture_hparams(obj, k)
        try:
            obj.registry_name = name
        except (AttributeError, TypeError):  # a builtin or a partial
            pass
        return obj

    return deco


def _extra_for(missing: str | None) -> str | None:
    if not missing:
        return None
    return OPTIONAL_EXTRAS.get(missing.split(".")[0])


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    snapshot = dict(_REGISTRY)
    current = None
    try:
        for pkg_name in DISCOVER:
            current = pkg_name
            pkg = importlib.import_module(pkg_name)
            for mod in pkgutil.iter_modules(pkg.__path__):
                current = f"{pkg_name}.{mod.name}"
                importlib.import_module(current)
    except ImportError as e:
        _REGISTRY.clear()
        _REGISTRY.update(snapshot)
        extra = _extra_for(getattr(e, "name", None))
        hint = f" Install it with: pip install 'losskit[{extra}]'." if extra else ""
        raise ImportError(f"losskit registry: importing {current} failed ({e}).{hint} "
                          "The registry was left as it was.", name=getattr(e, "name", None)) from e
    _LOADED = True


def _closest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.4)
    return f" Closest: {', '.join(close)}." if close else ""


def spec(name: str, kind: str | None = None) -> Spec:
    """The registry entry for ``name``; an unknown name names the closest ones."""
    _load_all()
    pool = sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)
    if name not in pool:
        what = "name" if kind is None else kind
        raise KeyError(f"unknown {what} {name!r}.{_closest(name, pool)} `losskit list` shows all {len(pool)}.")
    return _REGISTRY[name]


def specs(family: str | None = None, task: str | None = None, kind: str | None = "objective") -> list[Spec]:
    """Registered entries, filtered (``kind=None``: every kind)."""
    _load_all()
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
    fam = list(FAMILIES)
    kinds = list(KINDS)
    out = sorted(_REGISTRY.values(), key=lambda s: (kinds.index(s.kind), fam.index(s.family), s.name))
    return [s for s in out if (family is None or s.family == family) and (task is None or s.task == task)
            and (kind is None or s.kind == kind)]


def names(family: str | None = None, task: str | None = None, kind: str | None = "objective") -> list[str]:
    return [s.name for s in specs(family, task, kind)]


def get(name: str, *args: Any, **hparams: Any):
    """Build the entry ``name``: ``get(objective, **hp)``,
    ``get(optimizer, params, **hp)``, ``get(scheduler, optimizer, **hp)``."""
    s = spec(name)
    k = KINDS[s.kind]
    if len(args) != len(k.positional):
        need = ", ".join(k.positional) or "no positional arguments"
        raise TypeError(f"{s.kind} {name!r} takes {need} (then hyperparameters by keyword); "
                        f"got {len(args)} positional argument(s)")
    valid = list(s.hparams) + list(s.required)
    for key in hparams:
        if key not in valid:
            raise TypeError(
                f"{s.kind} {name!r} has no hyperparameter {key!r}.{_closest(key, valid)} "
                f"Valid: {', '.join(valid) or '(none)'}."
            )
    missing = [r for r in s.required if r not in hparams]
    if missing:
        raise TypeError(f"{s.kind} {name!r} needs {', '.join(missing)} (no default)")
    if k.build is not None:
        return k.build(s.cls, args, hparams)
    return s.cls(*args, **hparams)
