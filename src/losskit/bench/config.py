"""The bench configuration: what is trained, on what, with which budget.

Everything that decides the numbers lives in :class:`BenchConfig` and is saved
as ``config.json`` in the run folder.  ``--resume`` rebuilds the protocol from
that file and refuses to continue when anything that matters differs.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from losskit import registry

__all__ = [
    "BenchConfig",
    "BenchConfigError",
    "parse_set",
    "split_objectives",
    "parse_objective",
    "normalize_label",
    "base_name",
    "variant_params",
    "file_safe",
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
#: Variants added to the default list right after their base objective (the margin heads;
#: plain ``arcface`` is head='auto', which trains with the fused head).
DEFAULT_VARIANTS = {"arcface": ("arcface[head=dense]", "arcface[head=chunked]", "arcface[head=sampled]")}


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


_CLOSING = {"(": ")", "[": "]", "{": "}"}


def _walk(text: str, what: str):
    """Yield ``(index, char, quoted)`` for every character of ``text``; ``quoted`` is True
    inside a quoted string, its quotes included (backslash escapes honoured).  An unclosed
    quote raises a BenchConfigError naming ``text`` once the walk reaches the end."""
    quote = None
    escaped = False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            yield i, ch, True
        elif ch in "'\"":
            quote = ch
            yield i, ch, True
        else:
            yield i, ch, False
    if quote:
        raise BenchConfigError(f"{what}: unclosed quote {quote} in {text!r}")


def _scan(text: str, what: str, stop: str | None = None):
    """Yield ``(index, char)`` for every character of ``text`` outside quotes and brackets
    (``()[]{}``); unbalanced brackets or an open quote raise a BenchConfigError naming ``text``.
    With ``stop``, scanning ends at the first such occurrence of that character (the rest of
    the text is not checked)."""
    stack: list[str] = []
    for i, ch, quoted in _walk(text, what):
        if quoted:
            continue
        if ch in _CLOSING:
            stack.append(_CLOSING[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                raise BenchConfigError(f"{what}: unbalanced {ch!r} in {text!r}")
        elif not stack:
            yield i, ch
            if ch == stop:
                return
    if stack:
        raise BenchConfigError(f"{what}: missing {stack[-1]!r} in {text!r}")


def _split_top(text: str, sep: str, what: str) -> list[str]:
    """Split on ``sep`` outside brackets and quotes."""
    cuts = [i for i, ch in _scan(text, what) if ch == sep]
    bounds = [-1, *cuts, len(text)]
    return [text[a + 1:b] for a, b in zip(bounds, bounds[1:])]


def split_objectives(text: str) -> list[str]:
    """``"softmax, arcface[head=sampled,sample_rate=0.5]"`` -> ``["softmax", "arcface[head=sampled,sample_rate=0.5]"]``:
    commas inside brackets (or quotes) do not split."""
    return [part.strip() for part in _split_top(text, ",", "--objectives") if part.strip()]


def _squeeze(text: str, what: str) -> str:
    """``text`` without whitespace outside quotes."""
    return "".join(ch for _, ch, quoted in _walk(text, what) if quoted or not ch.isspace())


def parse_objective(label: str) -> tuple[str, dict[str, str]]:
    """``"arcface[head=sampled, sample_rate=0.5]"`` -> ``("arcface", {"head": "sampled", "sample_rate": "0.5"})``.

    The values are the normalised source text (no whitespace outside quotes), in the order given;
    :func:`variant_params` parses them.  A label without brackets is a plain registry name.
    Malformed brackets, a parameter without ``=`` or given twice raise a BenchConfigError
    naming the label.
    """
    what = f"objective {label!r}"
    s = _squeeze(str(label), what)
    usage = f"{what}: expected NAME or NAME[param=value,...] (e.g. arcface[head=chunked,margin=0.4])"
    i = s.find("[")
    name, rest = (s, "") if i < 0 else (s[:i], s[i:])
    if not name:
        raise BenchConfigError(usage if rest else "an objective name is empty")
    if any(c in name for c in "[](){}'\""):
        raise BenchConfigError(usage)
    if not rest:
        return name, {}
    # the bracket opened after NAME must close at the very end: NAME[...] and nothing after
    if _matching_bracket(rest, what) != len(rest) - 1:
        raise BenchConfigError(usage)
    inner = rest[1:-1]
    if not inner:
        raise BenchConfigError(f"{what}: empty brackets; write {name} or {name}[param=value,...]")
    params: dict[str, str] = {}
    for part in _split_top(inner, ",", what):
        key, eq, value = part.partition("=")
        if not eq or not key.isidentifier() or not value:
            raise BenchConfigError(f"{what}: expected param=value inside the brackets; got {part!r}")
        if key in params:
            raise BenchConfigError(f"{what}: {key} is given twice")
        params[key] = value
    return name, params


def _matching_bracket(text: str, what: str) -> int:
    """Index of the bracket closing ``text[0]`` (``text`` starts with ``[``)."""
    depth = 0
    for i, ch, quoted in _walk(text, what):
        if quoted:
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return i
    raise BenchConfigError(f"{what}: missing ']'")


def normalize_label(label: str) -> str:
    """The canonical label: no whitespace outside quotes, params in the order given."""
    name, params = parse_objective(label)
    return name if not params else f"{name}[{','.join(f'{k}={v}' for k, v in params.items())}]"


def base_name(label: str) -> str:
    """The registry name of an objective label (``arcface[head=chunked]`` -> ``arcface``)."""
    return parse_objective(label)[0]


def variant_params(label: str) -> dict[str, Any]:
    """The hyperparameters a label sets in its brackets, parsed like ``--set`` values."""
    return {k: _literal(v) for k, v in parse_objective(label)[1].items()}


def file_safe(label: str) -> str:
    """A file-name stem for ``label``: the label itself when it only has ``A-Za-z0-9._-``;
    otherwise the other characters become ``_`` and 8 hex digits of the label's SHA-1 are
    appended, so two labels never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", label)
    if safe == label and not label.startswith("."):
        return label
    return f"{safe.strip('_.') or 'objective'}-{hashlib.sha1(label.encode()).hexdigest()[:8]}"


def parse_set(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """Parse ``["arcface.margin=0.4", "arcface[head=chunked].margin=0.3"]`` into nested dicts
    keyed by objective (a plain name: that objective and all its variants) or by a variant's
    normalised label (that variant only).

    Values are python literals (``0.4``, ``True``, ``(1, 2)``, ``'x'``); a bare
    word that is not a literal is taken as a string.
    """
    out: dict[str, dict[str, Any]] = {}
    usage = "--set expects OBJECTIVE.PARAM=VALUE (e.g. arcface.margin=0.4)"
    for item in items or []:
        eqs = [i for i, ch in _scan(item, f"--set {item!r}", stop="=") if ch == "="]
        if not eqs:
            raise BenchConfigError(f"{usage}; got {item!r}")
        key, value = item[:eqs[0]].strip(), item[eqs[0] + 1:]
        dots = [i for i, ch in _scan(key, f"--set {item!r}") if ch == "."]
        if not dots:
            raise BenchConfigError(f"{usage}; got {item!r}")
        name, param = key[:dots[-1]].strip(), key[dots[-1] + 1:].strip()
        if not name or not param:
            raise BenchConfigError(f"{usage}; got {item!r}")
        out.setdefault(normalize_label(name), {})[param] = _literal(value.strip())
    return out


def _unfillable(name: str) -> list[str]:
    return [r for r in registry.spec(name).required if r not in BENCH_FILLED]


def default_objectives() -> list[str]:
    """``softmax`` first, then every registered embedding objective the bench can build
    (those needing a required argument other than num_classes/embedding_dim are left out;
    see :func:`unbenchable_objectives`), each followed by its :data:`DEFAULT_VARIANTS`
    (arcface's dense, chunked and sampled heads)."""
    rest = [n for n in registry.names(task="embedding") if n != "softmax" and not _unfillable(n)]
    names = ["softmax", *rest] if "softmax" in registry.names() else rest
    out = []
    for n in names:
        out.append(n)
        out += [v for v in DEFAULT_VARIANTS.get(n, ()) if set(parse_objective(v)[1]) <= set(registry.spec(n).hparams)]
    return out


def unbenchable_objectives() -> dict[str, list[str]]:
    """Embedding objectives left out of the default list, with the arguments they lack."""
    return {n: _unfillable(n) for n in registry.names(task="embedding") if _unfillable(n)}


def _spec(name: str, where: str = ""):
    try:
        return registry.spec(name, kind="objective")
    except KeyError as e:
        raise BenchConfigError(f"{where}{e.args[0]}") from None


def _check_params(where: str, name: str, params, filled_ok: bool = False) -> None:
    """Every key of ``params`` is a settable hyperparameter of ``name`` (close-match errors)."""
    valid = list(_spec(name).hparams)
    for p in params:
        if p in BENCH_FILLED and not filled_ok:
            raise BenchConfigError(f"{where}: {p} is set by the bench from the data and model")
        if p not in valid:
            raise BenchConfigError(
                f"{where}: objective {name!r} has no hyperparameter {p!r}.{_closest(p, valid)} "
                f"Valid: {', '.join(valid) or '(none)'}."
            )


def resolve_objectives(names: list[str]) -> list[str]:
    """Check labels (``NAME`` or ``NAME[param=value,...]``) against the registry (close-match
    errors); return them normalised, in order, without repeats."""
    out: list[str] = []
    for label in names or default_objectives():
        n, params = parse_objective(label)
        s = _spec(n)
        if s.task != "embedding":
            raise BenchConfigError(
                f"objective {n!r} is a {s.task!r} objective; the bench trains embeddings "
                f"(choose from: {', '.join(registry.names(task='embedding'))})"
            )
        label = normalize_label(label)
        _check_params(f"objective {label!r}", n, params)
        if label not in out:
            out.append(label)
    if not out:
        raise BenchConfigError("no embedding objectives are registered")
    return out


def _distributed_ready() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized()


def resolve_hparams(objectives: list[str], overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each objective's hyperparameters, keyed by its label: registry defaults, updated by
    ``overrides[NAME]`` (for the objective and all its variants), then by the variant's own
    bracket params, then by ``overrides[LABEL]`` (that variant only)."""
    labels = [normalize_label(o) for o in objectives]
    bases = {label: base_name(label) for label in labels}
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
        elif name not in bases.values():
            _spec(name, f"{where}: ")
            raise BenchConfigError(f"{where}: objective {name!r} is not among the chosen objectives "
                                   f"({', '.join(labels)})")
        for p in params:
            _check_params(f"--set {label}.{p}", name, [p])
            if p in own:
                raise BenchConfigError(f"--set {label}.{p}: {label!r} sets {p} in its brackets already; "
                                       "change it there")
        norm.setdefault(label, {}).update(params)
    out = {}
    for label in labels:
        name = bases[label]
        s = _spec(name)
        missing = [r for r in s.required if r not in BENCH_FILLED]
        if missing:
            raise BenchConfigError(
                f"objective {name!r} needs {', '.join(missing)} without a default; the bench can only fill "
                f"{', '.join(BENCH_FILLED)}"
            )
        own = variant_params(label)
        _check_params(f"objective {label!r}", name, own)
        hp = {k: v for k, v in s.hparams.items() if k not in BENCH_FILLED}
        hp.update(norm.get(name, {}))
        hp.update(own)
        if label != name:
            hp.update(norm.get(label, {}))
        if hp.get("head") == "sharded" and not _distributed_ready():
            raise BenchConfigError(
                f"objective {label!r}: head='sharded' splits the classes across the ranks of a torch.distributed "
                "process group, and the bench trains in one process where torch.distributed is not initialised. "
                "Use head='chunked' (the same numbers in one process) or run the bench inside an initialised "
                "process group."
            )
        out[label] = hp
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
