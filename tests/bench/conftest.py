"""Fixtures for the bench tests: fake objectives and a tiny open-set split."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losskit.core import registry

sys.path.insert(0, os.path.dirname(__file__))  # bench_cfg (tests use --import-mode=importlib)


@dataclass
class TinySplit:
    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    train_classes: list
    test_classes: list

    @property
    def input_shape(self):
        return tuple(self.train_x.shape[1:])

    @property
    def num_train_classes(self):
        return len(self.train_classes)

    @property
    def num_test_classes(self):
        return len(self.test_classes)


def tiny_split(n_train_classes=4, n_test_classes=3, per_class=10, side=4, seed=0) -> TinySplit:
    """Gaussian blobs shaped as [N, 1, side, side] images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    c = n_train_classes + n_test_classes
    centers = torch.rand(c, 1, side, side, generator=g)
    y = torch.arange(c).repeat_interleave(per_class)
    x = (centers[y] + 0.1 * torch.randn(len(y), 1, side, side, generator=g)).clamp(0, 1)
    tr = y < n_train_classes
    return TinySplit("tiny", x[tr], y[tr], x[~tr], y[~tr] - n_train_classes,
                     [str(i) for i in range(n_train_classes)], [str(i) for i in range(n_train_classes, c)])


class FakePairLoss(nn.Module):
    """Contrastive loss on cosine similarity (test double)."""

    def __init__(self, margin: float = 0.5, scale: float = 1.0, reduction: str = "mean"):
        super().__init__()
        self.margin, self.scale = margin, scale

    def forward(self, embeddings, labels, sample_weight=None):
        e = F.normalize(embeddings, dim=1)
        s = e @ e.T
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool)
        pos = (1 - s)[same & ~eye]
        neg = F.relu(s - self.margin)[~same]
        return self.scale * (pos.mean() + neg.mean())


class FakeProxyLoss(nn.Module):
    """Needs classes: a normalised-proxy softmax (test double)."""

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 0.1):
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_dim))
        self.temperature = temperature

    def forward(self, embeddings, labels, sample_weight=None):
        logits = F.normalize(embeddings, dim=1) @ F.normalize(self.proxies, dim=1).T / self.temperature
        return F.cross_entropy(logits, labels)


class Trap:
    """Arms a fake objective to raise ``exc`` in forward once it has been built ``after`` times."""

    def __init__(self):
        self.exc = None
        self.after = 0
        self.builds = 0


TRAP = Trap()


class FakeTrapLoss(FakePairLoss):
    """Raises TRAP.exc in forward from its TRAP.after-th trained instance on (test double; an
    instance counts when its forward is first called, so the bench's build-once check before
    training does not count)."""

    def __init__(self, margin: float = 0.5):
        super().__init__(margin)
        self.armed = None

    def forward(self, embeddings, labels, sample_weight=None):
        if self.armed is None:
            TRAP.builds += 1
            self.armed = TRAP.exc is not None and TRAP.builds >= TRAP.after
        if self.armed:
            raise TRAP.exc
        return super().forward(embeddings, labels, sample_weight)


class FakeNoisyLoss(FakePairLoss):
    """Draws from torch's global generator in forward (test double)."""

    def forward(self, embeddings, labels, sample_weight=None):
        noise = 1 + 0.5 * torch.rand(embeddings.shape[0])
        return super().forward(embeddings * noise[:, None], labels)


FAKES = {
    "fake-noisy": (FakeNoisyLoss, "contrastive"),
    "fake-pair": (FakePairLoss, "pair"),
    "fake-proxy": (FakeProxyLoss, "margin"),
    "fake-trap": (FakeTrapLoss, "robust"),
}


@contextlib.contextmanager
def registered_fakes(*names: str):
    """Register fake objectives for the duration of a test, then remove them."""
    registry._load_all()
    names = names or tuple(FAKES)
    try:
        for n in names:
            cls, fam = FAKES[n]
            registry.register(n, family=fam, task="embedding",
                              paper=registry.Paper("A fake paper for tests", 2020, "0000.00000"))(cls)
        yield
    finally:
        for n in names:
            registry._REGISTRY.pop(n, None)
        TRAP.exc, TRAP.after, TRAP.builds = None, 0, 0


@pytest.fixture
def tiny():
    return tiny_split()


@pytest.fixture
def fakes():
    """Registers fake-pair, fake-proxy and fake-trap; yields the trap to arm."""
    with registered_fakes():
        yield TRAP


@pytest.fixture
def make_split():
    """:func:`tiny_split` itself, for tests that need other sizes."""
    return tiny_split
