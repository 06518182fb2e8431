"""Exact k-nearest-neighbour search in blocks (faiss when installed and asked for).

Memory: the torch backend never holds more than one ``chunk_size x chunk_size``
score block plus the running ``[rows, k]`` best lists, so 100k x 100k works in
well under a gigabyte.  Ties: among equal scores the lower reference index ranks
first (deterministic; identical for every ``chunk_size`` and for the faiss backend,
whose rows with a tie at the cut are recomputed blockwise).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from losskit.distances import (BaseDistance, CosineSimilarity, DotProductSimilarity, EuclideanDistance,
                               SquaredEuclideanDistance)
from losskit.metrics._common import as_embeddings, resolve_metric

BACKENDS = ("auto", "torch", "faiss")

#: the distances faiss's flat indexes compute (inner product, or squared L2)
_FAISS_DISTANCES = (CosineSimilarity, DotProductSimilarity, EuclideanDistance, SquaredEuclideanDistance)


def _faiss():
    try:
        import faiss  # type: ignore
    except ImportError:
        return None
    return faiss


def _order(vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by (value descending, index ascending)."""
    o = idx.argsort(dim=1)
    vals, idx = vals.gather(1, o), idx.gather(1, o)
    o = vals.sort(dim=1, descending=True, stable=True).indices
    return vals.gather(1, o), idx.gather(1, o)


def _block_topk(s: Tensor, k: int, offset: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` of each row of ``s`` with ties broken toward the lower column."""
    if k >= s.shape[1]:
        vals, idx = _order(s, torch.arange(s.shape[1], device=s.device).expand_as(s))
        return vals, idx + offset
    vals, idx = s.topk(k + 1, dim=1)  # one extra: a tie straddles the cut iff k-th == (k+1)-th
    tied = vals[:, k - 1] == vals[:, k]
    vals, idx = vals[:, :k], idx[:, :k]
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        sv, si = s[rows].sort(dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = sv[:, :k], si[:, :k]
    vals, idx = _order(vals, idx)
    return vals, idx + offset


def _merge(bv, bi, v, i, k):
    if bv is None:
        return v, i
    v, i = torch.cat([bv, v], 1), torch.cat([bi, i], 1)  # earlier blocks hold lower indices
    o = v.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return v.gather(1, o), i.gather(1, o)


def iter_knn(q: Tensor, r: Tensor, k: int, dist: BaseDistance, chunk_size: int,
             q_index: Tensor | None = None) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(start, scores, indices)`` per block of query rows.  ``q`` and ``r``
    are *prepared* (``dist.prepare``), ``dist`` a resolved distance.  With
    ``q_index`` (the global index of each query row in ``r``), a query never
    retrieves itself."""
    n_r = r.shape[0]
    rows = max(1, min(chunk_size, (chunk_size * chunk_size) // max(k, 1)))
    r_sq = dist.sq_norms(r)
    for a in range(0, q.shape[0], rows):
        qc = q[a:a + rows]
        qi = q_index[a:a + rows] if q_index is not None else None
        bv = bi = None
        for c in range(0, n_r, chunk_size):
            s = dist.scores(qc, r[c:c + chunk_size], None if r_sq is None else r_sq[c:c + chunk_size])
            if qi is not None:
                local = qi - c
                hit = (local >= 0) & (local < s.shape[1])
                if bool(hit.any()):
                    rr = hit.nonzero().squeeze(1)
                    s[rr, local[rr]] = float("-inf")
            v, i = _block_topk(s, k, c)
            bv, bi = _merge(bv, bi, v, i, k)
        yield a, bv, bi


def knn(query, reference=None, k: int = 1, metric: str | BaseDistance = "cosine", chunk_size: int = 4096,
        exclude_self: bool = True, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The ``k`` most similar reference rows for every query row.

    Returns ``(scores [Nq, k], indices [Nq, k])`` sorted best first; ``scores`` are
    similarities (cosine, dot) or negative distances (``metric`` is a name of the
    distance vocabulary, see :mod:`losskit.distances`, or a distance object).  With
    ``reference=None`` the query set is searched leave-one-out: ``exclude_self``
    removes each query from its own results (it has no effect when a separate
    ``reference`` is given).  ``backend``: ``"torch"`` (exact, blockwise),
    ``"faiss"`` (exact flat index; error if faiss is missing) or ``"auto"``
    (faiss when installed and the inputs are float32 on CPU, else torch).
    """
    dist = resolve_metric(metric)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    q = as_embeddings(query, "query")
    leave_one_out = reference is None and exclude_self
    r = q if reference is None else as_embeddings(reference, "reference").to(q.device)
    if r.shape[1] != q.shape[1]:
        raise ValueError(f"reference: expected dimension {q.shape[1]} (the query's), got {r.shape[1]}")
    if r.dtype != q.dtype:
        dt = torch.promote_types(q.dtype, r.dtype)
        q, r = q.to(dt), r.to(dt)
    avail = r.shape[0] - (1 if leave_one_out else 0)
    if k > avail:
        raise ValueError(f"k: expected at most {avail} (the number of reference rows"
                         f"{' other than the query itself' if leave_one_out else ''}), got {k}")
    qp = dist.prepare(q)
    rp = qp if reference is None else dist.prepare(r)
    fa = _faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and fa is None:
        raise ImportError("backend='faiss' needs faiss: pip install 'losskit[faiss]'")
    if backend == "faiss" and type(dist) not in _FAISS_DISTANCES:
        raise ValueError(f"metric: backend='faiss' supports {tuple(c.name for c in _FAISS_DISTANCES)}, "
                         f"got {type(dist).__name__}")
    if fa is not None and type(dist) in _FAISS_DISTANCES and (
            backend == "faiss" or (qp.device.type == "cpu" and qp.dtype == torch.float32)):
        return _knn_faiss(fa, qp, rp, k, dist, leave_one_out, chunk_size)
    idx = torch.arange(q.shape[0], device=q.device) if leave_one_out else None
    parts = list(iter_knn(qp, rp, k, dist, chunk_size, idx))
    if not parts:
        return q.new_zeros(0, k), torch.zeros(0, k, dtype=torch.int64, device=q.device)
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def _knn_faiss(fa, qp: Tensor, rp: Tensor, k: int, dist: BaseDistance, leave_one_out: bool, chunk_size: int):
    """Exact flat faiss index (inner product, or squared L2 for the distances).  Rows whose
    k-th and (k+1)-th scores are equal (a tie straddling the cut, where faiss's
    order is arbitrary) are recomputed with the torch backend, so the documented
    tie rule holds for both backends."""
    dev, dt = qp.device, qp.dtype
    qn = qp.detach().cpu().float().contiguous().numpy()
    rn = rp.detach().cpu().float().contiguous().numpy()
    index = fa.IndexFlatIP(rn.shape[1]) if dist.is_similarity else fa.IndexFlatL2(rn.shape[1])
    index.add(rn)
    n_avail = rn.shape[0] - (1 if leave_one_out else 0)
    extra = 1 if k < n_avail else 0  # one more to detect ties at the cut
    kk = k + extra + (1 if leave_one_out else 0)
    d, i = index.search(qn, kk)
    d, i = torch.from_numpy(d), torch.from_numpy(i).long()
    if not dist.is_similarity:  # squared L2 -> minus the distance
        d = d.clamp_min(0)
        d = -(d.sqrt() if isinstance(dist, EuclideanDistance) else d)
    if leave_one_out:
        own = i == torch.arange(i.shape[0])[:, None]
        # drop the query itself (or, if faiss did not return it, the last column)
        drop = torch.where(own.any(1), own.float().argmax(1), torch.full((i.shape[0],), kk - 1))
        keep = torch.ones_like(own)
        keep[torch.arange(i.shape[0]), drop] = False
        d, i = d[keep].view(-1, kk - 1), i[keep].view(-1, kk - 1)
    d, i = _order(d, i)
    if extra:
        tied = (d[:, k - 1] == d[:, k]).nonzero().squeeze(1)
        d, i = d[:, :k].contiguous(), i[:, :k].contiguous()
        if tied.numel():
            qi = tied if leave_one_out else None
            parts = list(iter_knn(qp.cpu()[tied], rp.cpu(), k, dist, chunk_size, qi))
            d[tied] = torch.cat([p[1] for p in parts]).float()
            i[tied] = torch.cat([p[2] for p in parts])
    return d.to(device=dev, dtype=dt), i.to(dev)
