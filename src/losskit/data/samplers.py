"""Batch samplers for training on labelled data.

:class:`PKSampler` draws class-balanced batches, ``P`` classes x ``K`` samples
(the batches pair-based losses need: every batch holds positives), from a seeded
generator; :func:`pk_batch_shape` chooses ``(P, K)`` from the labels.  The
episode sampler of few-shot training is :class:`losskit.data.episodes.EpisodeSampler`.

    >>> p, k = pk_batch_shape(labels, batch_size=80)
    >>> sampler = PKSampler(labels, p, k, seed=0)
    >>> for _ in range(sampler.steps_per_epoch):
    ...     idx = sampler.batch()                      # numpy int array [P * K], class by class
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["PKSampler", "pk_batch_shape"]


class PKSampler:
    """Class-balanced batches: ``P`` classes, ``K`` samples each, drawn with a seeded generator.

    Classes are drawn without replacement within a batch; samples without
    replacement within a class when it has at least ``K``, with replacement
    otherwise.  One epoch is ``ceil(N / (P*K))`` batches.  The stream of
    batches depends on ``seed`` alone (a ``numpy.random.default_rng(seed)``).
    """

    def __init__(self, labels: Tensor, p: int, k: int, seed: int):
        y = labels.cpu().numpy()
        self.classes = np.unique(y)
        if p > len(self.classes):
            raise ValueError(f"P={p} classes per batch but the training set has {len(self.classes)}")
        self.by_class = [np.flatnonzero(y == c) for c in self.classes]
        self.p, self.k = p, k
        self.rng = np.random.default_rng(seed)
        self.steps_per_epoch = max(1, math.ceil(len(y) / (p * k)))

    def batch(self) -> np.ndarray:
        """The next batch's row indices: ``P`` blocks of ``K`` rows, one class per block."""
        chosen = self.rng.choice(len(self.classes), size=self.p, replace=False)
        parts = []
        for c in chosen:
            idx = self.by_class[c]
            parts.append(self.rng.choice(idx, size=self.k, replace=len(idx) < self.k))
        return np.concatenate(parts)


def pk_batch_shape(labels: Tensor, batch_size: int = 80, classes: int = 0, samples: int = 0) -> tuple[int, int]:
    """``(P, K)``: ``classes`` and ``samples`` when given, chosen from the labels when 0.

    Auto: ``K = min(16, max(2, smallest class // 4))``, ``P = min(#classes, max(2, batch_size // K))``.
    """
    counts = torch.bincount(labels.cpu())
    counts = counts[counts > 0]
    n_classes = len(counts)
    if n_classes < 2:
        raise ValueError(f"labels: class-balanced batches need at least 2 classes; got {n_classes}")
    k = samples or min(16, max(2, int(counts.min()) // 4))
    p = classes or min(n_classes, max(2, batch_size // k))
    if p > n_classes:
        raise ValueError(f"classes: {p} classes per batch exceeds the {n_classes} classes of the labels")
    return p, k
