"""Leave-one-out retrieval metrics: Recall@K, precision@1, MAP@R.

Every sample queries all the others.  Queries whose class has no other sample
("lone" queries) cannot retrieve anything relevant and are excluded from every
retrieval metric (pytorch-metric-learning's AccuracyCalculator does the same);
if no query is left the metric is ``nan`` (with a warning).  Ties between equal
scores are broken toward the lower sample index (see ``knn``).  ``metric`` is a
name of the distance vocabulary (:mod:`losskit.distances`) or a distance object.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from losskit.distances import BaseDistance
from losskit.metrics._common import EmbeddingStore, as_embeddings, as_labels, resolve_metric
from losskit.metrics.knn import iter_knn

DEFAULT_CHUNK = 4096


def _setup(embeddings, labels, metric):
    """Validated inputs, the resolved distance and the number of same-class
    partners of every sample."""
    dist = resolve_metric(metric)
    x = as_embeddings(embeddings)
    y = as_labels(labels, x.shape[0], x.device)
    if x.shape[0] and y.numel():
        _, inv, counts = torch.unique(y, return_inverse=True, return_counts=True)
        others = counts[inv] - 1  # same-class samples other than the query
    else:
        others = torch.zeros(0, dtype=torch.int64, device=x.device)
    return x, y, others, dist


def _nan(what: str) -> float:
    warnings.warn(f"{what}: no query has another sample of its class; returning nan", RuntimeWarning, stacklevel=3)
    return float("nan")


def _check_ks(ks) -> list[int]:
    ks = [ks] if isinstance(ks, int) else list(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks: expected positive ints, got {ks!r}")
    return ks


def _hits(x, y, others, kmax, dist, chunk_size):
    """For valid queries: the position (0-based) of the first same-class neighbour
    among the top ``kmax`` (``kmax`` if none)."""
    valid = (others > 0).nonzero().squeeze(1)
    xp = dist.prepare(x)
    first = []
    for a, _, idx in iter_knn(xp[valid], xp, kmax, dist, chunk_size, q_index=valid):
        rel = y[idx] == y[valid[a:a + idx.shape[0]]][:, None]
        pos = torch.where(rel.any(1), rel.float().argmax(1), torch.full_like(rel[:, 0], kmax, dtype=torch.int64))
        first.append(pos)
    return torch.cat(first) if first else torch.zeros(0, dtype=torch.int64)


def recall_at_k(embeddings, labels, ks: Iterable[int] = (1, 2, 4, 8), metric: str | BaseDistance = "cosine",
                chunk_size: int = DEFAULT_CHUNK) -> dict[int, float]:
    """Recall@K: the fraction of (non-lone) queries with at least one same-class
    sample among their K nearest neighbours.  K larger than N-1 uses all N-1 others."""
    ks = _check_ks(ks)
    x, y, others, dist = _setup(embeddings, labels, metric)
    if not bool((others > 0).any()):
        v = _nan("recall_at_k")
        return {k: v for k in ks}
    kmax = min(max(ks), x.shape[0] - 1)
    first = _hits(x, y, others, kmax, dist, chunk_size)
    return {k: float((first < min(k, kmax)).double().mean()) for k in ks}


def precision_at_1(embeddings, labels, metric: str | BaseDistance = "cosine", chunk_size: int = DEFAULT_CHUNK) -> float:
    """Precision@1: the fraction of (non-lone) queries whose nearest neighbour shares
    their class (equal to Recall@1 under leave-one-out retrieval)."""
    x, y, others, dist = _setup(embeddings, labels, metric)
    if not bool((others > 0).any()):
        return _nan("precision_at_1")
    return float((_hits(x, y, others, 1, dist, chunk_size) < 1).double().mean())


def _ap_at_r(rel: Tensor, r: Tensor) -> Tensor:
    """MAP@R terms for one block: ``rel`` [m, kmax] relevance of ranked neighbours,
    ``r`` [m] the number of relevant items R of each query."""
    pos = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=torch.float64)
    rel = rel & (pos[None, :] <= r[:, None])
    relf = rel.double()
    prec = relf.cumsum(1) / pos[None, :]
    return (prec * relf).sum(1) / r.double()


def map_at_r(embeddings, labels, metric: str | BaseDistance = "cosine", chunk_size: int = DEFAULT_CHUNK) -> float:
    """MAP@R (Musgrave, Belongie and Lim, "A Metric Learning Reality Check", ECCV 2020):
    for a query with R other same-class samples, retrieve its R nearest neighbours and
    average P@i over the positions i <= R that are relevant, dividing by R:
    ``AP@R = (1/R) sum_{i=1..R} P(i) rel(i)``.  MAP@R is the mean over non-lone queries."""
    x, y, others, dist = _setup(embeddings, labels, metric)
    valid = (others > 0).nonzero().squeeze(1)
    if valid.numel() == 0:
        return _nan("map_at_r")
    return float(_map_sum(x, y, others, valid, dist, chunk_size) / valid.numel())


def _map_sum(x, y, others, valid, dist, chunk_size) -> float:
    kmax = int(others[valid].max())
    xp = dist.prepare(x)
    total = 0.0
    for a, _, idx in iter_knn(xp[valid], xp, kmax, dist, chunk_size, q_index=valid):
        qv = valid[a:a + idx.shape[0]]
        total += float(_ap_at_r(y[idx] == y[qv][:, None], others[qv]).sum())
    return total


def retrieval_summary(embeddings, labels, ks: Iterable[int] = (1, 2, 4, 8), metric: str | BaseDistance = "cosine",
                      chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:
    """Recall@K for each K, precision@1 and MAP@R from a single blockwise kNN pass
    (k = the larger of max(ks) and the largest R).  Same values as the separate
    functions; ``nan`` without a warning when no query has a same-class partner."""
    ks = _check_ks(ks)
    x, y, others, dist = _setup(embeddings, labels, metric)
    valid = (others > 0).nonzero().squeeze(1)
    out = {f"recall@{k}": float("nan") for k in ks}
    out.update({"precision@1": float("nan"), "map@r": float("nan")})
    if valid.numel() == 0:
        return out
    kr = min(max(ks), x.shape[0] - 1)
    kmax = max(kr, int(others[valid].max()))
    xp = dist.prepare(x)
    firsts, ap_sum = [], 0.0
    for a, _, idx in iter_knn(xp[valid], xp, kmax, dist, chunk_size, q_index=valid):
        qv = valid[a:a + idx.shape[0]]
        rel = y[idx] == y[qv][:, None]
        ap_sum += float(_ap_at_r(rel, others[qv]).sum())
        top = rel[:, :kr]
        firsts.append(torch.where(top.any(1), top.float().argmax(1), torch.full_like(qv, kr)))
    first = torch.cat(firsts)
    for k in ks:
        out[f"recall@{k}"] = float((first < min(k, kr)).double().mean())
    out["precision@1"] = float((first < 1).double().mean())
    out["map@r"] = ap_sum / valid.numel()
    return out


class RetrievalMetrics(EmbeddingStore):
    """Accumulate embeddings batch by batch; ``compute()`` evaluates Recall@K,
    precision@1 and MAP@R leave-one-out over everything seen since ``reset()``.

    Retrieval needs every sample as a reference, so the accumulator keeps the
    embeddings (on CPU by default: N x D floats, e.g. 100k x 128 = 51 MB in float32);
    the search itself is blockwise.
    """

    def __init__(self, ks: Iterable[int] = (1, 2, 4, 8), metric: str | BaseDistance = "cosine",
                 chunk_size: int = DEFAULT_CHUNK, device: str | torch.device | None = "cpu"):
        self.ks = _check_ks(ks)
        resolve_metric(metric)
        self.metric = metric
        self.chunk_size = chunk_size
        self.device = device
        self.reset()

    def compute(self) -> dict[str, float]:
        x, y = self.collected("RetrievalMetrics.compute")
        return retrieval_summary(x, y, self.ks, self.metric, self.chunk_size)
