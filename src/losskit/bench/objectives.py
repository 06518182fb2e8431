"""Which objectives a task trains, and with which hyperparameters.

The objectives come from the registry (``registry.specs(kind="objective",
task=task.objective_task)``); labels (``NAME`` or ``NAME[param=value,...]``)
are checked against it with close-match errors, and each label's
hyperparameters are resolved: registry defaults < ``--set NAME.P`` < the
label's brackets < ``--set LABEL.P``.
"""

from __future__ import annotations

import difflib
from typing import Any

from losskit.core import registry

from .errors import BenchConfigError
from .labels import base_name, normalize_label, parse_objective, variant_params
from .tasks import DEFAULT_TASK, Task, get_task

__all__ = ["default_objectives", "unbenchable_objectives", "resolve_objectives", "resolve_hparams",
           "objective_specs"]


def _task(task: Task | str) -> Task:
    return task if isinstance(task, Task) else get_task(task)


def _closest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.4)
    return f" Closest: {', '.join(close)}." if close else ""


def objective_specs(task: Task | str = DEFAULT_TASK) -> list[registry.Spec]:
    """The registered objectives of the task's kind."""
    return registry.specs(kind="objective", task=_task(task).objective_task)


def _unfillable(spec: registry.Spec, task: Task) -> list[str]:
    return [r for r in spec.required if r not in task.filled]


def default_objectives(task: Task | str = DEFAULT_TASK) -> list[str]:
    """The task's :attr:`~Task.default_first` objectives, then every registered objective of its
    kind that the bench can build (those needing a required argument the task does not fill are
    left out; see :func:`unbenchable_objectives`), each followed by its
    :attr:`~Task.default_variants` (embedding: arcface's dense and chunked heads)."""
    task = _task(task)
    pool = {s.name: s for s in objective_specs(task)}
    first = [n for n in task.default_first if n in registry.names(kind="objective")]
    rest = [n for n, s in pool.items() if n not in first and not _unfillable(s, task)]
    out = []
    for n in [*first, *rest]:
        out.append(n)
        hps = set(registry.spec(n, kind="objective").hparams)
        out += [v for v in task.default_variants.get(n, ()) if set(parse_objective(v)[1]) <= hps]
    return out


def unbenchable_objectives(task: Task | str = DEFAULT_TASK) -> dict[str, list[str]]:
    """Objectives of the task's kind left out of the default list, with the arguments they lack."""
    task = _task(task)
    return {s.name: _unfillable(s, task) for s in objective_specs(task) if _unfillable(s, task)}


def _spec(name: str, where: str = ""):
    try:
        return registry.spec(name, kind="objective")
    except KeyError as e:
        raise BenchConfigError(f"{where}{e.args[0]}") from None


def _check_params(where: str, name: str, params, task: Task) -> None:
    """Every key of ``params`` is a settable hyperparameter of ``name`` (close-match errors)."""
    valid = list(_spec(name).hparams)
    for p in params:
        if p in task.filled:
            raise BenchConfigError(f"{where}: {p} is set by the bench from the data and model")
        if p not in valid:
            raise BenchConfigError(
                f"{where}: objective {name!r} has no hyperparameter {p!r}.{_closest(p, valid)} "
                f"Valid: {', '.join(valid) or '(none)'}."
            )


def resolve_objectives(names: list[str], task: Task | str = DEFAULT_TASK) -> list[str]:
    """Check labels (``NAME`` or ``NAME[param=value,...]``) against the registry (close-match
    errors); return them normalised, in order, without repeats (none given: the default list)."""
    task = _task(task)
    out: list[str] = []
    for label in names or default_objectives(task):
        n, params = parse_objective(label)
        s = _spec(n)
        if s.task != task.objective_task:
            raise BenchConfigError(
                f"objective {n!r} is a {s.task!r} objective; the bench's {task.name!r} task trains "
                f"{task.objective_task!r} objectives (choose from: {', '.join(s.name for s in objective_specs(task))})"
            )
        label = normalize_label(label)
        _check_params(f"objective {label!r}", n, params, task)
        if label not in out:
            out.append(label)
    if not out:
        raise BenchConfigError(f"no {task.objective_task} objectives are registered")
    return out


def _normalize_overrides(labels: list[str], overrides: dict[str, dict[str, Any]],
                         task: Task) -> dict[str, dict[str, Any]]:
    """``--set`` keys normalised and checked: each names a chosen objective (all its variants)
    or one chosen variant, and each parameter is settable and not already in the variant's brackets."""
    bases = {base_name(label) for label in labels}
    norm: dict[str, dict[str, Any]] = {}
    for key, params in overrides.items():
        label = normalize_label(key)
        name, own = parse_objective(label)
        where = f"--set {label}.…"
        if own:
            _spec(name, f"{where}: ")
            if label not in labels:
                raise BenchConfigError(f"{where}: variant {label!r} is not among the chosen objectives "
                                       f"({', '.join(labels)}); --set {name}.PARAM=VALUE sets every {name} variant")
        elif name not in bases:
            _spec(name, f"{where}: ")
            raise BenchConfigError(f"{where}: objective {name!r} is not among the chosen objectives "
                                   f"({', '.join(labels)})")
        for p in params:
            _check_params(f"--set {label}.{p}", name, [p], task)
            if p in own:
                raise BenchConfigError(f"--set {label}.{p}: {label!r} sets {p} in its brackets already; "
                                       "change it there")
        norm.setdefault(label, {}).update(params)
    return norm


def resolve_hparams(objectives: list[str], overrides: dict[str, dict[str, Any]],
                    task: Task | str = DEFAULT_TASK) -> dict[str, dict[str, Any]]:
    """Each objective's hyperparameters, keyed by its label: registry defaults, updated by
    ``overrides[NAME]`` (for the objective and all its variants), then by the variant's own
    bracket params, then by ``overrides[LABEL]`` (that variant only).  The task's
    :attr:`~Task.filled` arguments are left out (the task passes them when it builds)."""
    task = _task(task)
    labels = [normalize_label(o) for o in objectives]
    norm = _normalize_overrides(labels, overrides, task)
    out = {}
    for label in labels:
        name = base_name(label)
        s = _spec(name)
        missing = _unfillable(s, task)
        if missing:
            raise BenchConfigError(
                f"objective {name!r} needs {', '.join(missing)} without a default; the bench can only fill "
                f"{', '.join(task.filled)}"
            )
        own = variant_params(label)
        _check_params(f"objective {label!r}", name, own, task)
        hp = {k: v for k, v in s.hparams.items() if k not in task.filled}
        hp.update(norm.get(name, {}))
        hp.update(own)
        if label != name:
            hp.update(norm.get(label, {}))
        task.check_hparams(label, hp)
        out[label] = hp
    return out
