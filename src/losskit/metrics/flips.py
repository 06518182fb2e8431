"""Negative flips between two model versions (Ricci et al. 2025; the
relative NFR of Yan et al., "Positive-Congruent Training", CVPR 2021).

* ``NFR = mean_i 1[old_i = y_i and new_i != y_i]``
* ``relative NFR = NFR / ((1 - ER_old) ER_new)``: the NFR over the NFR that
  two models with these error rates would have if their errors were
  independent.  When the denominator is 0 (the old model is never right or
  the new one never wrong) there can be no flip and the relative NFR is 0.

Predictions or logits are accepted (``[N]`` integers or ``[N, C]`` scores,
argmax taken).  ``num_old_classes`` restricts the counts to the samples whose
label is an old class (the paper's protocol: flips are measured on the old
classes' test samples; the new model predicts over all classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from losskit.core.checks import check_int, shape_str

__all__ = ["negative_flip_rate", "relative_negative_flip_rate", "flip_summary", "FlipCounter", "FlipStats"]


def _pred(x, name: str, n: int | None = None) -> Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 2:
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected [N] predicted labels or [N, C] floating logits, got dtype {x.dtype}")
        x = x.argmax(1)
    elif x.dim() != 1:
        raise ValueError(f"{name}: expected [N] predicted labels or [N, C] logits, got {shape_str(x)}")
    elif x.is_floating_point():
        raise TypeError(f"{name}: expected integer predictions of shape [N] (or [N, C] logits), got dtype {x.dtype}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name}: expected {n} rows (one per label), got {x.shape[0]}")
    return x.long().cpu()


@dataclass
class FlipStats:
    n: int
    negative_flips: int
    old_errors: int
    new_errors: int

    @property
    def nfr(self) -> float:
        return self.negative_flips / self.n if self.n else 0.0

    @property
    def er_old(self) -> float:
        return self.old_errors / self.n if self.n else 0.0

    @property
    def er_new(self) -> float:
        return self.new_errors / self.n if self.n else 0.0

    @property
    def relative_nfr(self) -> float:
        den = (1 - self.er_old) * self.er_new
        return self.nfr / den if den > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "nfr": self.nfr, "relative_nfr": self.relative_nfr, "er_old": self.er_old,
                "er_new": self.er_new}


def _stats(new, old, labels, num_old_classes: int | None) -> FlipStats:
    y = torch.as_tensor(labels)
    if y.dim() != 1 or y.is_floating_point():
        raise ValueError(f"labels: expected [N] integer labels, got {shape_str(y)} {y.dtype}")
    y = y.long().cpu()
    pn = _pred(new, "new", y.shape[0])
    po = _pred(old, "old", y.shape[0])
    if num_old_classes is not None:
        num_old_classes = check_int("num_old_classes", num_old_classes, low=1)
        keep = y < num_old_classes
        y, pn, po = y[keep], pn[keep], po[keep]
    old_ok = po == y
    new_bad = pn != y
    return FlipStats(int(y.numel()), int((old_ok & new_bad).sum()), int((~old_ok).sum()), int(new_bad.sum()))


def negative_flip_rate(new, old, labels, num_old_classes: int | None = None) -> float:
    """Fraction of samples the old model gets right and the new one wrong."""
    return _stats(new, old, labels, num_old_classes).nfr


def relative_negative_flip_rate(new, old, labels, num_old_classes: int | None = None) -> float:
    """``NFR / ((1 - ER_old) ER_new)`` (0 when the denominator is 0)."""
    return _stats(new, old, labels, num_old_classes).relative_nfr


def flip_summary(new, old, labels, num_old_classes: int | None = None) -> dict[str, float]:
    """``{"n", "nfr", "relative_nfr", "er_old", "er_new"}`` in one pass."""
    return _stats(new, old, labels, num_old_classes).as_dict()


class FlipCounter:
    """Accumulates flip counts over batches: ``update(new, old, labels)``,
    then ``compute()`` (a dict as :func:`flip_summary`) or ``stats``;
    the result equals the functions on the concatenated batches."""

    def __init__(self, num_old_classes: int | None = None):
        self.num_old_classes = check_int("num_old_classes", num_old_classes, low=1, allow_none=True)
        self.reset()

    def reset(self) -> None:
        self.stats = FlipStats(0, 0, 0, 0)

    def update(self, new, old, labels) -> None:
        s = _stats(new, old, labels, self.num_old_classes)
        t = self.stats
        self.stats = FlipStats(t.n + s.n, t.negative_flips + s.negative_flips, t.old_errors + s.old_errors,
                               t.new_errors + s.new_errors)

    def compute(self) -> dict[str, float]:
        return self.stats.as_dict()

    def state_dict(self) -> dict:
        return dict(vars(self.stats))

    def load_state_dict(self, state: dict) -> None:
        self.stats = FlipStats(**{k: int(state[k]) for k in ("n", "negative_flips", "old_errors", "new_errors")})
