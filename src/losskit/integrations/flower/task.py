"""The Flower app's task: scikit-learn's bundled 8x8 digits (10 classes; no download),
a fixed 80/20 train/test split, a small MLP, and each SuperNode's non-IID share."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor, nn

from losskit.data.partition import classes_per_client_partition, dirichlet_partition, quantity_skew_partition

__all__ = ["load_digits_classification", "make_model", "client_partition"]


@functools.lru_cache(maxsize=2)
def load_digits_classification(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: pixels scaled to [0, 1], a seeded 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the dev and bench extras install it
        raise ImportError("the digits task needs scikit-learn: pip install 'losskit[bench]'", name="sklearn") from e
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    xt = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    yt = torch.tensor(y[order], dtype=torch.long)
    return xt[:cut], yt[:cut], xt[cut:], yt[cut:]


def make_model(hidden: int = 32, seed: int = 0) -> nn.Module:
    """64 -> hidden -> 10 MLP, initialised from ``seed``."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def client_partition(labels: Tensor, partition_id: int, num_partitions: int, *, scheme: str = "dirichlet",
                     alpha: float = 0.5, classes_per_client: int = 2, seed: int = 0) -> np.ndarray:
    """The indices of client ``partition_id`` (every client computes the same seeded partition)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id: expected a value in [0, {num_partitions - 1}], got {partition_id}")
    if scheme == "dirichlet":
        parts = dirichlet_partition(labels, num_partitions, alpha, seed=seed, min_size=2)
    elif scheme == "classes":
        parts = classes_per_client_partition(labels, num_partitions, classes_per_client, seed=seed)
    elif scheme == "quantity":
        parts = quantity_skew_partition(labels, num_partitions, alpha, seed=seed, min_size=2)
    else:
        raise ValueError(f"partition-scheme: expected 'dirichlet', 'classes' or 'quantity', got {scheme!r}")
    return parts[partition_id]
