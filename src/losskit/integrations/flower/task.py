"""The Flower app's task: scikit-learn's bundled 8x8 digits (10 classes; no download),
a fixed 80/20 train/test split, a small MLP, and each SuperNode's non-IID share.
Also a closed-set Omniglot classification set (from a path) for the in-process experiments."""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from torch import Tensor, nn

from losskit.data.partition import classes_per_client_partition, dirichlet_partition, quantity_skew_partition

__all__ = ["load_digits_classification", "load_omniglot_classification", "make_model", "client_partition"]


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


def load_omniglot_classification(path: str | os.PathLike, num_classes: int | None = 100, image_size: int = 28,
                                 train_per_class: int = 15, split: str = "images_background_small1",
                                 class_seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closed-set Omniglot classification: ``(x_train, y_train, x_test, y_test)``, images
    flattened to ``image_size**2`` features in ``[0, 1]`` with strokes = 1 (the stored
    images inverted), resized from 105x105 with :func:`losskit.data.omniglot.load_omniglot`'s
    decoder.

    ``path`` is a folder holding ``<split>.zip`` or an extracted ``<split>/`` folder (nothing
    is assumed about where it lives).  Classes: ``num_classes`` of the split's characters
    (``ALPHABET/characterNN``), drawn without replacement by
    ``numpy.random.default_rng(class_seed)`` from the sorted class names and kept in sorted
    order (label = position); ``None`` keeps every class.  In each class the drawings are
    taken in sorted file-name order (``NNNN_01`` ... ``NNNN_20``: drawer 1 to 20); the first
    ``train_per_class`` train and the rest test, so test drawings come from other drawers.
    """
    from losskit.data._images import size_hw
    from losskit.data.folder import _check_dir
    from losskit.data.omniglot import EXPECTED, _read_split, _scan_split

    hw = size_hw(image_size)
    if isinstance(train_per_class, bool) or not isinstance(train_per_class, int) or train_per_class < 1:
        raise ValueError(f"train_per_class: expected a positive int, got {train_per_class!r}")
    root = _check_dir(path, EXPECTED)
    files = _scan_split(root, split)
    names = sorted(files)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= len(names):
            raise ValueError(f"num_classes: expected None or an int in [2, {len(names)}] (the classes of {split!r}), "
                             f"got {num_classes!r}")
        pick = np.random.default_rng(class_seed).choice(len(names), size=num_classes, replace=False)
        names = [names[i] for i in sorted(pick)]
    short = [c for c in names if len(files[c]) <= train_per_class]
    if short:
        raise ValueError(f"train_per_class: expected fewer than every class's drawings ({train_per_class} given); "
                         f"{len(short)} class(es) have no test drawing, e.g. {short[0]!r} with {len(files[short[0]])}")
    x, y = _read_split(root, split, {c: files[c] for c in names}, names, hw, None, None)
    x = 1.0 - x.reshape(x.shape[0], -1)
    # position of each image inside its class (load_files keeps the sorted file order)
    pos = torch.zeros_like(y)
    for c in range(len(names)):
        idx = (y == c).nonzero().flatten()
        pos[idx] = torch.arange(len(idx))
    tr = pos < train_per_class
    return x[tr], y[tr], x[~tr], y[~tr]


def make_model(hidden: int = 32, seed: int = 0, in_features: int = 64, num_classes: int = 10) -> nn.Module:
    """``in_features`` -> hidden -> ``num_classes`` MLP (64 -> 32 -> 10 for digits), initialised from ``seed``."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


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
