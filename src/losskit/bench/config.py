"""The bench configuration: what is trained, on what, with which budget.

Everything that decides the numbers lives in :class:`BenchConfig` and is saved
as ``config.json`` in the run folder.  ``--resume`` rebuilds the protocol from
that file and refuses to continue when anything that matters differs.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from losskit import registry

__all__ = [
    "BenchConfig",
    "BenchConfigError",
    "parse_set",
    "default_objectives",
    "unbenchable_objectives",
    "resolve_objectives",
    "resolve_hparams",
    "protocol",
    "diff_protocol",
]

#: Arguments the bench fills in itself for objectives that need them.
BENCH_FILLED = ("num_classes", "embedding_dim")
DATASETS = ("digits", "folder", "omniglot")


class BenchConfigError(ValueError):
    """A bench configuration that cannot run (bad objective, hparam, path, resume)."""


@dataclass
class BenchConfig:
    """The full protocol of one bench run.

    ``objectives`` empty means "softmax plus every registered embedding objective".
    ``batch_classes``/``batch_samples`` of 0 mean "choose from the data"
    (see :func:`losskit.bench.train.batch_shape`).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int = 28
    max_per_class: int | None = None
    objectives: list[str] = field(default_factory=list)
    seeds: int = 3
    epochs: int = 10
    embedding_dim: int = 64
    model: str = "auto"  # auto | mlp | cnn
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 80
    batch_classes: int = 0
    batch_samples: int = 0
    augment: str = "none"  # none | shift
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str = "auto"
    threads: int = 1  # torch CPU threads while training (0 = leave torch's default)
    ks: tuple[int, ...] = (1, 2, 4, 8)
    fars: tuple[float, ...] = (1e-3, 1e-2)
    hist_bins: int = 80

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ks"] = list(self.ks)
        d["fars"] = list(self.fars)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BenchConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BenchConfigError(f"config.json has unknown fields {unknown}; written by another losskit version?")
        d = dict(d)
        if "ks" in d:
            d["ks"] = tuple(d["ks"])
        if "fars" in d:
            d["fars"] = tuple(d["fars"])
        return cls(**d)

    def validate(self) -> "BenchConfig":
        if self.dataset not in DATASETS:
            raise BenchConfigError(f"--dataset must be one of {', '.join(DATASETS)}; got {self.dataset!r}")
        if self.dataset != "digits" and not self.data_dir:
            raise BenchConfigError(f"--dataset {self.dataset} needs --data-dir PATH")
        for name, lo in (("seeds", 1), ("epochs", 1), ("embedding_dim", 1), ("batch_size", 2), ("image_size", 4)):
            if getattr(self, name) < lo:
                raise BenchConfigError(f"--{name.replace('_', '-')} must be >= {lo}; got {getattr(self, name)}")
        if self.model not in ("auto", "mlp", "cnn"):
            raise BenchConfigError(f"--model must be auto, mlp or cnn; got {self.model!r}")
        if self.augment not in ("none", "shift"):
            raise BenchConfigError(f"--augment must be none or shift; got {self.augment!r}")
        if self.threads < 0:
            raise BenchConfigError(f"--threads must be >= 0; got {self.threads}")
        if not self.lr > 0:
            raise BenchConfigError(f"--lr must be > 0; got {self.lr}")
        return self


def _closest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.4)
    return f" Closest: {', '.join(close)}." if close else ""


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as `chunked` is a string


def parse_set(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """Parse ``["arcface.margin=0.4", "arcface.head=chunked"]`` into nested dicts.

    Values are python literals (``0.4``, ``True``, ``(1, 2)``, ``'x'``); a bare
    word that is not a literal is taken as a string.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        name, dot, param = key.strip().partition(".")
        if not eq or not dot or not name or not param:
            raise BenchConfigError(f"--set expects OBJECTIVE.PARAM=VALUE (e.g. arcface.margin=0.4); got {item!r}")
        out.setdefault(name, {})[param] = _literal(value.strip())
    return out


def _unfillable(name: str) -> list[str]:
    return [r for r in registry.spec(name).required if r not in BENCH_FILLED]


def default_objectives() -> list[str]:
    """``softmax`` first, then every registered embedding objective the bench can build
    (those needing a required argument other than num_classes/embedding_dim are left out;
    see :func:`unbenchable_objectives`)."""
    rest = [n for n in registry.names(task="embedding") if n != "softmax" and not _unfillable(n)]
    return ["softmax", *rest] if "softmax" in registry.names() else rest


def unbenchable_objectives() -> dict[str, list[str]]:
    """Embedding objectives left out of the default list, with the arguments they lack."""
    return {n: _unfillable(n) for n in registry.names(task="embedding") if _unfillable(n)}


def resolve_objectives(names: list[str]) -> list[str]:
    """Check names against the registry (close-match errors); keep order, drop repeats."""
    out: list[str] = []
    for n in names or default_objectives():
        try:
            s = registry.spec(n)
        except KeyError as e:
            raise BenchConfigError(e.args[0]) from None
        if s.task != "embedding":
            raise BenchConfigError(
                f"objective {n!r} is a {s.task!r} objective; the bench trains embeddings "
                f"(choose from: {', '.join(registry.names(task='embedding'))})"
            )
        if n not in out:
            out.append(n)
    if not out:
        raise BenchConfigError("no embedding objectives are registered")
    return out


def resolve_hparams(objectives: list[str], overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each objective's hyperparameters: registry defaults updated by ``overrides``."""
    for name, params in overrides.items():
        if name not in objectives:
            try:
                registry.spec(name)
            except KeyError as e:
                raise BenchConfigError(f"--set {name}.…: {e.args[0]}") from None
            raise BenchConfigError(f"--set {name}.…: objective {name!r} is not among the chosen objectives "
                                   f"({', '.join(objectives)})")
        s = registry.spec(name)
        valid = list(s.hparams)
        for p in params:
            if p in BENCH_FILLED:
                raise BenchConfigError(f"--set {name}.{p}: {p} is set by the bench from the data and model")
            if p not in valid:
                raise BenchConfigError(
                    f"--set {name}.{p}: objective {name!r} has no hyperparameter {p!r}.{_closest(p, valid)} "
                    f"Valid: {', '.join(valid) or '(none)'}."
                )
    out = {}
    for name in objectives:
        s = registry.spec(name)
        missing = [r for r in s.required if r not in BENCH_FILLED]
        if missing:
            raise BenchConfigError(
                f"objective {name!r} needs {', '.join(missing)} without a default; the bench can only fill "
                f"{', '.join(BENCH_FILLED)}"
            )
        hp = {k: v for k, v in s.hparams.items() if k not in BENCH_FILLED}
        hp.update(overrides.get(name, {}))
        out[name] = hp
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return repr(v)


def protocol(cfg: BenchConfig, hparams: dict[str, dict[str, Any]], device: str) -> dict[str, Any]:
    """What must be identical for two runs' cells to be comparable (JSON-plain)."""
    d = cfg.to_json()
    d["device"] = device
    d["hparams"] = _plain(hparams)
    return _plain(d)


def diff_protocol(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences between two protocols (empty when they match)."""
    lines = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<missing>"), now.get(k, "<missing>")
        if k == "hparams" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    lines.append(f"hparams[{name}]: run has {a.get(name)!r}, now {b.get(name)!r}")
        elif a != b:
            lines.append(f"{k}: run has {a!r}, now {b!r}")
    return lines
