"""A character-level text corpus that is on every machine: the Python standard
library's own docstrings.

:func:`stdlib_text` joins, for a fixed list of standard-library modules, each
module's docstring and the docstrings of its public classes and functions
(``inspect.getdoc``, members sorted by name).  No download, no file access
beyond the interpreter's own modules, deterministic for a given Python
version (docstrings change between versions: record ``sys.version`` with any
number measured on it).  :func:`char_corpus` turns it into integer ids with a
train / validation split.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["STDLIB_MODULES", "stdlib_text", "CharCorpus", "char_corpus"]

#: modules whose docstrings make the corpus (pure-Python, present on every CPython >= 3.10)
STDLIB_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools",
    "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html", "http.client", "inspect", "ipaddress",
    "itertools", "json", "logging", "mailbox", "numbers", "operator", "optparse", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "smtplib", "socket", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "turtle",
    "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
)


def stdlib_text(modules: tuple[str, ...] | list[str] = STDLIB_MODULES, max_chars: int | None = None) -> str:
    """The docstrings of ``modules`` and of their public members, joined by blank lines.

    A module that cannot be imported on this interpreter is skipped (``turtle``
    needs tkinter on some builds).  ``max_chars`` truncates the result.
    """
    parts: list[str] = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr in sorted(vars(mod)):
            if attr.startswith("_"):
                continue
            obj = vars(mod)[attr]
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) != mod.__name__:
                continue  # re-exported from elsewhere: counted once, where it is defined
            d = inspect.getdoc(obj)
            if d:
                parts.append(d)
    text = "\n\n".join(parts)
    if max_chars is not None:
        if int(max_chars) < 1:
            raise ValueError(f"max_chars: expected a positive number of characters, got {max_chars}")
        text = text[:int(max_chars)]
    return text


@dataclass
class CharCorpus:
    vocab: list[str]
    train: Tensor  # int64 ids
    val: Tensor
    python: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def char_corpus(text: str | None = None, *, val_fraction: float = 0.1, max_chars: int | None = None) -> CharCorpus:
    """Character ids of ``text`` (default :func:`stdlib_text`), the last ``val_fraction`` held out."""
    if text is None:
        text = stdlib_text(max_chars=max_chars)
    elif max_chars is not None:
        text = text[:int(max_chars)]
    if not isinstance(text, str) or len(text) < 2:
        raise ValueError(f"text: expected a string of at least 2 characters, got {type(text).__name__} "
                         f"of length {len(text) if isinstance(text, str) else 'n/a'}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    cut = int(round(len(ids) * (1 - val_fraction)))
    return CharCorpus(vocab, ids[:cut], ids[cut:], sys.version.split()[0])
