"""A compositional image-caption task from scikit-learn's digits (issue 16, item 2).

Each image is two 8x8 digits side by side (``[1, 8, 16]``); its caption is
``"a three left of a seven"`` or, equally true, ``"a seven right of a three"``
(6 tokens).  Two hard negatives per pair, both false for the image:

* **word order**: the two digit words swapped (``"a seven left of a three"``);
* **ConcretePlant**: the caption's most concrete word (by the concreteness norms)
  swapped for another concrete word of the same part of speech (a digit for a
  digit, ``left`` for ``right``), :func:`losskit.data.concreteness.concrete_plant`.

Each negative carries the concreteness of the word it changed (for the word
order negative: the larger of the two digit words), for Cement's margins.
Train and test use disjoint digit images (each digit image is used on one side
only), every ordered pair of distinct digits occurs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from losskit.data.concreteness import concrete_plant

__all__ = ["TwoDigitPairs", "make_two_digit_pairs", "DIGIT_WORDS", "VOCAB"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOCAB = ("a", "of", "left", "right") + DIGIT_WORDS
_POS = {"a": "DET", "of": "ADP", "left": "REL", "right": "REL", **{w: "NUM" for w in DIGIT_WORDS}}
_LEXICON = {"NUM": DIGIT_WORDS, "REL": ("left", "right")}


@dataclass
class TwoDigitPairs:
    images: Tensor          # [N, 1, 8, 16] float32 in [0, 1]
    captions: Tensor        # [N, 6] token ids into VOCAB
    negatives: Tensor       # [N, 2, 6]: word order, ConcretePlant
    scores: Tensor          # [N, 2] concreteness of the changed word (1-5)
    digits: Tensor          # [N, 2] (left digit, right digit)

    def __len__(self) -> int:
        return self.images.shape[0]


def _ids(tokens) -> list[int]:
    return [VOCAB.index(t) for t in tokens]


def _caption(d_left: int, d_right: int, flip: bool) -> list[str]:
    if flip:
        return ["a", DIGIT_WORDS[d_right], "right", "of", "a", DIGIT_WORDS[d_left]]
    return ["a", DIGIT_WORDS[d_left], "left", "of", "a", DIGIT_WORDS[d_right]]


def make_two_digit_pairs(n: int, norms: Mapping[str, float], *, split: str = "train", seed: int = 0,
                         test_fraction: float = 0.4) -> TwoDigitPairs:
    """``n`` pairs whose digit images come from the ``split`` part of the digits (first
    ``1 - test_fraction`` of each class's images train, the rest test)."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    missing = [w for w in VOCAB if w not in norms]
    if missing:
        raise KeyError(f"norms: no score for {missing} (the captions' words need scores)")
    d = load_digits()
    imgs = torch.from_numpy((d.images / 16.0).astype(np.float32))
    by_class = []
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        cut = int(round(len(idx) * (1 - test_fraction)))
        by_class.append(idx[:cut] if split == "train" else idx[cut:])
    rng = random.Random(seed * 2 + (split == "test"))
    images, caps, negs, scores, digits = [], [], [], [], []
    for _ in range(n):
        a, b = rng.sample(range(10), 2)
        ia, ib = rng.choice(list(by_class[a])), rng.choice(list(by_class[b]))
        images.append(torch.cat([imgs[ia], imgs[ib]], dim=1)[None])
        tok = _caption(a, b, rng.random() < 0.5)
        order = list(tok)
        order[1], order[5] = tok[5], tok[1]
        planted = concrete_plant(tok, [_POS[t] for t in tok], norms, _LEXICON, rng)
        caps.append(_ids(tok))
        negs.append([_ids(order), _ids(planted.tokens)])
        scores.append([max(norms[tok[1]], norms[tok[5]]), planted.score])
        digits.append([a, b])
    return TwoDigitPairs(torch.stack(images), torch.tensor(caps), torch.tensor(negs),
                         torch.tensor(scores, dtype=torch.float32), torch.tensor(digits))
