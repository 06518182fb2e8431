"""The data of an unlearning request, and the small classifier trainer the
unlearning recipes, the datamodel regression and the oracles share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from losskit.core.checks import check_hparam, check_int, shape_str

__all__ = ["UnlearningData", "forget_indices", "train_classifier", "predict_logits", "Timer"]


def forget_indices(forget, n: int) -> Tensor:
    """The forget set as sorted unique indices into ``n`` training points.

    Accepts indices or a boolean mask ``[n]``.  A forget set that selects
    nothing, or points outside the training set, or every point, is refused.
    """
    f = torch.as_tensor(forget)
    if f.dtype == torch.bool:
        if f.shape != (n,):
            raise ValueError(f"forget: a boolean mask must have shape [{n}] (one entry per training point), "
                             f"got {shape_str(f)}")
        f = f.nonzero().flatten()
    elif f.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        f = f.long().flatten()
    else:
        raise TypeError(f"forget: expected integer indices or a boolean mask, got {f.dtype}")
    if f.numel() == 0:
        raise ValueError("forget: the forget set selects no training point; expected at least one index")
    bad = f[(f < 0) | (f >= n)]
    if bad.numel():
        raise ValueError(f"forget: expected indices in [0, {n - 1}] (the training set), got "
                         f"{bad[:5].tolist()}{' ...' if bad.numel() > 5 else ''}: the forget set must overlap "
                         "the training set")
    f = torch.unique(f)
    if f.numel() >= n:
        raise ValueError(f"forget: the forget set covers all {n} training points; nothing would be retained")
    return f


@dataclass
class UnlearningData:
    """Training inputs ``x [n, ...]``, labels ``y [n]`` and the forget set (indices or a mask)."""

    x: Tensor
    y: Tensor
    forget: Tensor
    retain: Tensor = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor) or not self.x.is_floating_point() or self.x.dim() < 2:
            raise TypeError(f"x: expected a floating tensor [n, ...], got "
                            f"{shape_str(self.x) if isinstance(self.x, Tensor) else type(self.x).__name__}")
        n = self.x.shape[0]
        self.y = torch.as_tensor(self.y)
        if self.y.shape != (n,) or self.y.dtype != torch.int64:
            raise ValueError(f"y: expected int64 labels of shape [{n}], got {self.y.dtype} {shape_str(self.y)}")
        self.forget = forget_indices(self.forget, n)
        keep = torch.ones(n, dtype=torch.bool)
        keep[self.forget] = False
        self.retain = keep.nonzero().flatten()

    @property
    def n(self) -> int:
        return self.x.shape[0]


def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """``model(x)`` in eval mode without gradients, in batches."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    model.train(was)
    return out


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, indices: Tensor | None = None, *, epochs: int = 30,
                     lr: float = 1e-2, batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0,
                     optimizer: str = "adam") -> nn.Module:
    """Train ``model`` in place with cross-entropy on ``x[indices]`` (all points by default)."""
    epochs = check_int("epochs", epochs, low=0)
    batch_size = check_int("batch_size", batch_size, low=1)
    lr = check_hparam("lr", lr, low=0.0, low_open=True)
    idx = torch.arange(x.shape[0]) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=lr, weight_decay=weight_decay) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay))
    model.train()
    for _ in range(epochs):
        perm = idx[torch.randperm(idx.numel(), generator=gen)]
        for s in range(0, perm.numel(), batch_size):
            b = perm[s:s + batch_size]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


class Timer:
    """Wall-clock seconds and optimiser steps of one method (``with Timer() as t: ...``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._t0


ModelFactory = Callable[[], nn.Module]
