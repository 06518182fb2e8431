"""Input handling and similarity blocks shared by the metrics."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

METRICS = ("cosine", "dot", "euclidean")


def as_embeddings(x, name: str = "embeddings") -> Tensor:
    """A floating ``[N, D]`` tensor (numpy accepted); float16/bfloat16 are promoted
    to float32 for accurate ranking.  NaN/inf is an error."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array of shape [N, D], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected shape [N, D], got {list(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    x = x.detach()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    return x


def as_labels(y, n: int, device, name: str = "labels") -> Tensor:
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    if not isinstance(y, Tensor):
        y = torch.as_tensor(y)
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name}: expected shape [{n}] (one label per embedding), got {list(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {y.dtype}")
    return y.detach().to(device=device, dtype=torch.int64)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    return metric


def prepare(x: Tensor, metric: str) -> Tensor:
    """Row-normalise for cosine (zero rows stay zero)."""
    check_metric(metric)
    if metric == "cosine":
        return torch.nn.functional.normalize(x, dim=1)
    return x


def block_scores(q: Tensor, r: Tensor, metric: str, r_sqnorm: Tensor | None = None) -> Tensor:
    """Similarity of prepared query rows against prepared reference rows: higher = closer.
    ``euclidean`` gives ``-||q - r||`` (clamped at 0 before the square root)."""
    s = q @ r.T
    if metric == "euclidean":
        rn = (r * r).sum(1) if r_sqnorm is None else r_sqnorm
        d2 = (q * q).sum(1, keepdim=True) + rn[None, :] - 2.0 * s
        s = -d2.clamp_min_(0.0).sqrt_()
    return s


def pair_score(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """Row-wise score of already prepared rows ``a[i]`` and ``b[i]``."""
    if metric == "euclidean":
        return -(a - b).norm(dim=1)
    return (a * b).sum(1)


class EmbeddingStore:
    """Accumulates ``(embeddings, labels)`` batches for the stateful metrics.

    Subclasses set ``self.device`` (where batches are kept; ``None``: their own
    device) before calling :meth:`reset`.
    """

    device: str | torch.device | None = "cpu"

    def reset(self) -> None:
        self._x: list[Tensor] = []
        self._y: list[Tensor] = []

    def update(self, embeddings, labels) -> None:
        x = as_embeddings(embeddings)
        y = as_labels(labels, x.shape[0], x.device)
        if self._x and x.shape[1] != self._x[0].shape[1]:
            raise ValueError(f"embeddings: expected dimension {self._x[0].shape[1]} (as in earlier updates), "
                             f"got {x.shape[1]}")
        dev = self.device if self.device is not None else x.device
        self._x.append(x.to(dev))
        self._y.append(y.to(dev))

    def collected(self, who: str) -> tuple[Tensor, Tensor]:
        """All accumulated embeddings and labels; an error naming ``who`` when empty."""
        if not self._x:
            raise RuntimeError(f"{who}: no data; call update() first")
        return torch.cat(self._x), torch.cat(self._y)
