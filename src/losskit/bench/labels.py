"""Objective labels and ``--set`` items: ``NAME[param=value,...]`` and ``NAME.PARAM=VALUE``.

Pure text handling (no registry): splitting ``--objectives`` on top-level commas,
parsing a label into its registry name and bracket parameters, the canonical
label, a file-safe stem for the run folder, and ``--set`` items as nested dicts.
"""

from __future__ import annotations

import ast
import hashlib
import re
from typing import Any

from .errors import BenchConfigError

__all__ = ["split_objectives", "parse_objective", "normalize_label", "base_name", "variant_params", "file_safe",
           "parse_set", "parse_literal"]


def parse_literal(text: str) -> Any:
    """A python literal (``0.4``, ``True``, ``(1, 2)``, ``'x'``); any other text is a string."""
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
    return {k: parse_literal(v) for k, v in parse_objective(label)[1].items()}


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
        out.setdefault(normalize_label(name), {})[param] = parse_literal(value.strip())
    return out
