"""Non-IID client partitions for federated learning (numpy, seeded).

Each function takes the labels of a data set (any of losskit's: ``split.train_y``
of digits, Omniglot or an image folder, as a tensor, a numpy array or a list)
and returns one ``int64`` index array per client.  The partition is a function of
``(labels, arguments, seed)`` only: the same call gives the same arrays.
Every index is used at most once; :func:`dirichlet_partition` and
:func:`quantity_skew_partition` use every index, :func:`classes_per_client_partition`
every index of the classes it hands out.

* :func:`dirichlet_partition`: label skew, per class ``p_c ~ Dir(alpha 1_N)``
  split over the N clients (Hsu et al., 2019, "Measuring the Effects of
  Non-Identical Data Distribution", arXiv:1909.06335); small alpha = strong skew.
* :func:`classes_per_client_partition`: "pathological" label skew, each client
  sees ``k`` classes (McMahan et al., 2017, the shards of FedAvg's MNIST study).
* :func:`quantity_skew_partition`: IID labels, client sizes ``~ Dir(alpha 1_N)``.

:func:`partition_counts` gives the ``[clients, classes]`` count table.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from losskit.core.checks import check_hparam, check_int

__all__ = ["dirichlet_partition", "classes_per_client_partition", "quantity_skew_partition",
           "partition_counts"]


def _labels(labels: Any) -> np.ndarray:
    if hasattr(labels, "detach"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels: expected a 1-d array of class labels, got shape {list(y.shape)}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"labels: expected integer class labels, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"labels: expected labels >= 0, got {int(y.min())}")
    return y.astype(np.int64, copy=False)


def _check_clients(num_clients: Any, n: int, min_size: int) -> int:
    k = check_int("num_clients", num_clients, low=1)
    if k * min_size > n:
        raise ValueError(f"num_clients: {k} clients with min_size={min_size} need at least {k * min_size} "
                         f"samples, got {n}")
    return k

def _dirichlet_args(labels: Any, num_clients: int, alpha: float, min_size: int,
                    max_tries: int) -> tuple[np.ndarray, float, int, int]:
    """The checked arguments shared by the Dirichlet partitions: labels, alpha, min_size, clients."""
    y = _labels(labels)
    alpha = check_hparam("alpha", alpha, low=0, low_open=True)
    min_size = check_int("min_size", min_size, low=0)
    n_clients = _check_clients(num_clients, y.size, min_size)
    check_int("max_tries", max_tries, low=1)
    return y, alpha, min_size, n_clients



def dirichlet_partition(labels: Any, num_clients: int, alpha: float, *, seed: int = 0, min_size: int = 1,
                        max_tries: int = 1000) -> list[np.ndarray]:
    """Split every class over the clients with proportions ``~ Dir(alpha)``.

    For each class ``c`` (in increasing order) draw ``p ~ Dir(alpha 1_N)`` and
    give client ``i`` the ``i``-th slice of the shuffled class indices cut at
    ``floor(cumsum(p) n_c)``.  The draw is repeated (with the same generator)
    until every client holds at least ``min_size`` samples; after ``max_tries``
    a ValueError says so (lower ``min_size`` or raise ``alpha``).
    """
    y, alpha, min_size, n_clients = _dirichlet_args(labels, num_clients, alpha, min_size, max_tries)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].append(chunk)
        out = [np.sort(np.concatenate(ch)) if ch else np.zeros(0, np.int64) for ch in parts]
        if min(o.size for o in out) >= min_size:
            return out
    raise ValueError(f"dirichlet_partition: no draw in {max_tries} tries gave every one of {n_clients} clients "
                     f">= {min_size} samples (alpha={alpha}, {y.size} samples); lower min_size or raise alpha")


def classes_per_client_partition(labels: Any, num_clients: int, classes_per_client: int, *,
                                 seed: int = 0) -> list[np.ndarray]:
    """Each client gets ``classes_per_client`` distinct classes; each class's
    samples are split in near-equal shuffled parts over the clients holding it.

    Classes are dealt cyclically from a seeded permutation: client ``i`` holds
    ``perm[(i k + j) mod C]`` for ``j < k``, so with ``num_clients * k >= C``
    every class is held by at least one client, and each by
    ``floor`` or ``ceil`` of ``num_clients * k / C`` clients.
    """
    y = _labels(labels)
    n_clients = check_int("num_clients", num_clients, low=1)
    classes = np.unique(y)
    k = check_int("classes_per_client", classes_per_client, low=1, high=max(int(classes.size), 1))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(classes)
    held = [[int(perm[(i * k + j) % classes.size]) for j in range(k)] for i in range(n_clients)]
    holders: dict[int, list[int]] = {}
    for i, cs in enumerate(held):
        for c in cs:
            holders.setdefault(c, []).append(i)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c in classes:
        who = holders.get(int(c))
        if not who:
            continue
        idx = rng.permutation(np.flatnonzero(y == c))
        for i, chunk in zip(who, np.array_split(idx, len(who))):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(ch)) if ch else np.zeros(0, np.int64) for ch in parts]


def quantity_skew_partition(labels: Any, num_clients: int, alpha: float, *, seed: int = 0,
                            min_size: int = 1, max_tries: int = 1000) -> list[np.ndarray]:
    """IID labels, skewed sizes: client ``i`` gets a share ``q_i`` of a shuffled
    index list, ``q ~ Dir(alpha 1_N)``, redrawn until every client has ``min_size``."""
    y, alpha, min_size, n_clients = _dirichlet_args(labels, num_clients, alpha, min_size, max_tries)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        idx = rng.permutation(y.size)
        q = rng.dirichlet(np.full(n_clients, alpha))
        cuts = (np.cumsum(q)[:-1] * y.size).astype(np.int64)
        out = [np.sort(p) for p in np.split(idx, cuts)]
        if min(o.size for o in out) >= min_size:
            return out
    raise ValueError(f"quantity_skew_partition: no draw in {max_tries} tries gave every one of {n_clients} "
                     f"clients >= {min_size} samples (alpha={alpha}); lower min_size or raise alpha")


def partition_counts(labels: Any, parts: list[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """``[clients, classes]`` sample counts of a partition."""
    y = _labels(labels)
    c = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if y.size else 0)
    out = np.zeros((len(parts), c), dtype=np.int64)
    for i, p in enumerate(parts):
        if np.asarray(p).size:
            out[i] = np.bincount(y[np.asarray(p)], minlength=c)[:c]
    return out
