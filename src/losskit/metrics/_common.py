"""Input handling shared by the metrics and the resolver behind ``metric=``."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from losskit.core.checks import check_finite
from losskit.distances import BaseDistance, get_distance

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
    return check_finite(x.detach(), name)


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


def resolve_metric(metric: str | BaseDistance) -> BaseDistance:
    """The distance behind ``metric=`` (a name of the distance vocabulary or a
    :class:`~losskit.distances.BaseDistance`), through the one resolver.
    Metrics rank by :meth:`BaseDistance.scores` (higher = closer) on rows
    prepared by :meth:`BaseDistance.prepare`."""
    return get_distance(metric, name="metric")


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
