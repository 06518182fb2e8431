"""``head='sampled'``: Partial FC: the batch's positive centres plus random
negatives up to ``sample_rate * C`` classes, then the automatic backend on
that subset (an approximation by design; ``sample_rate=1`` gives the dense
numbers)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from losskit.heads.backends.base import HeadBackend

__all__ = ["SampledBackend", "select_sampled_classes"]


def select_sampled_classes(labels: Tensor, num_classes: int, sample_rate: float,
                           generator: torch.Generator | None = None) -> Tensor:
    """Partial FC class selection: the batch's positive classes plus random
    others up to ``ceil(sample_rate * C)`` classes (never fewer than the
    positives).  Returns sorted class indices."""
    pos = torch.unique(labels[labels >= 0])
    k = int(math.ceil(sample_rate * num_classes))
    if k <= pos.numel():
        return pos
    score = torch.rand(num_classes, generator=generator).to(labels.device)
    score[pos] = 2.0
    return torch.sort(torch.topk(score, k).indices).values


class SampledBackend(HeadBackend):
    name = "sampled"

    def __init__(self, inner: HeadBackend):
        self.inner = inner

    def _subset(self, head, weight: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        idx = select_sampled_classes(labels, weight.shape[0], head.sample_rate, head.generator)
        y = torch.where(labels >= 0, torch.searchsorted(idx, labels.clamp_min(0)), labels)
        return weight[idx], y

    def per_row(self, head, xn, weight, labels):
        w, y = self._subset(head, weight, labels)
        return self.inner.per_row(head, xn, w, y)

    def loss(self, head, xn, weight, labels, reduction, sample_weight):
        w, y = self._subset(head, weight, labels)
        return self.inner.loss(head, xn, w, y, reduction, sample_weight)
