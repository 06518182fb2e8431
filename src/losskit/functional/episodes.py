"""Episode objectives: Proto-Triplet and ICNN (Mendez-Ruiz et al., 2023,
arXiv:2305.09062) and GPAM (Guo et al., 2024, arXiv:2410.20320).

All three are written for N-way K-shot episodes: a *support* set that defines
the classes (prototypes) and a *query* set that is scored against them.  They
also accept an ordinary class-balanced batch ``(embeddings, labels)``: each
class's samples are split deterministically into support and query by
:func:`split_support_query` (first ``ceil(n_c / 2)`` samples of class ``c``,
in batch order, are support; the rest are queries), or by an explicit
``support_mask``.

Conventions shared by the three losses

* ``reduction='none'`` returns one loss per *query* sample (for ICNN: per
  anchor), in batch order; ``query_mask`` / :func:`split_support_query` tells
  which rows they are.  Queries that cannot be scored (their class has no
  prototype, or there is no other class) get loss 0 and still count in the
  ``'mean'`` denominator, which is the number of query rows.
* ``sample_weight`` has one entry per *batch* row (shape ``[B]``, like every
  embedding objective); the weights of the query rows multiply their losses,
  the weights of support rows are not used.
* Distances are computed in float32 when the input is float16/bfloat16
  (autocast is switched off inside); the result has the input's dtype.
* Nothing to score (empty batch, one sample per class, a single class) gives
  a zero that is still connected to the graph.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from losskit._checks import (
    check_embeddings,
    check_finite,
    check_labels,
    check_reduction,
    check_sample_weight,
    reduce_loss,
    zero_with_graph,
)

__all__ = [
    "split_support_query",
    "class_prototypes",
    "proto_triplet_loss",
    "icnn_score",
    "icnn_loss",
    "gaussian_prototypes",
    "gpam_distances",
    "gpam_loss",
    "gpam_predict",
]

_TINY = 1e-12


# --------------------------------------------------------------------------- helpers


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _no_autocast(x: Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """``||a_i - b_j||^2`` as ``[len(a), len(b)]`` (no ``[n, m, D]`` temporary)."""
    aa = (a * a).sum(1, keepdim=True)
    bb = (b * b).sum(1, keepdim=True).transpose(0, 1)
    return (aa + bb - 2.0 * (a @ b.transpose(0, 1))).clamp_min(0.0)


def _euclid(a: Tensor, b: Tensor) -> Tensor:
    # clamp keeps the sqrt's gradient finite at zero distance (it is 0 there)
    return _sq_dists(a, b).clamp_min(_TINY).sqrt()


def _check_inputs(embeddings: Tensor, labels: Tensor, allow_nota: bool) -> None:
    check_embeddings(embeddings)
    check_finite(embeddings, "embeddings")
    check_labels(labels, embeddings.shape[0], device=embeddings.device)
    if labels.numel():
        lo = -1 if allow_nota else 0
        mn = int(labels.min())
        if mn < lo:
            what = "-1 (none of the above) or a class id >= 0" if allow_nota else "class ids >= 0"
            raise ValueError(f"labels: expected {what}, got {mn}")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")


def split_support_query(labels: Tensor, support_mask: Tensor | None = None) -> Tensor:
    """Boolean ``[B]`` mask of the support rows.

    Default split: for every class ``c >= 0`` with ``n_c`` rows in the batch,
    its first ``ceil(n_c / 2)`` rows (in batch order) are support and the rest
    are queries; rows labelled ``-1`` (none of the above) are always queries.
    A class with a single row is support only (it has no query).

    With ``support_mask`` given, it is validated and returned.
    """
    B = labels.shape[0]
    if support_mask is not None:
        if not isinstance(support_mask, Tensor):
            raise TypeError(f"support_mask: expected a bool torch.Tensor of shape [{B}], "
                            f"got {type(support_mask).__name__}")
        if support_mask.dtype != torch.bool:
            raise TypeError(f"support_mask: expected dtype torch.bool, got {support_mask.dtype}")
        if support_mask.dim() != 1 or support_mask.shape[0] != B:
            raise ValueError(f"support_mask: expected shape [{B}] (one flag per embedding), "
                             f"got {list(support_mask.shape)}")
        if support_mask.device != labels.device:
            raise ValueError(f"support_mask: expected device {labels.device}, got {support_mask.device}")
        if B and bool((support_mask & (labels < 0)).any()):
            raise ValueError("support_mask: rows labelled -1 (none of the above) cannot be support")
        return support_mask
    if B == 0:
        return torch.zeros(0, dtype=torch.bool, device=labels.device)
    order = torch.sort(labels, stable=True).indices
    sorted_labels = labels[order]
    _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    group_start = torch.repeat_interleave(starts, counts)
    rank_sorted = torch.arange(B, device=labels.device) - group_start
    n_sorted = torch.repeat_interleave(counts, counts)
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    n_c = torch.empty_like(n_sorted)
    n_c[order] = n_sorted
    return (labels >= 0) & (rank < (n_c + 1) // 2)


def class_prototypes(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean embedding per class: ``(classes [C], prototypes [C, D], counts [C])``,
    classes sorted ascending."""
    classes, inverse, counts = torch.unique(labels, sorted=True, return_inverse=True, return_counts=True)
    sums = embeddings.new_zeros(classes.shape[0], embeddings.shape[1]).index_add(0, inverse, embeddings)
    return classes, sums / counts.unsqueeze(1).to(embeddings.dtype), counts


def _lookup(classes: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Index of each ``y`` in the sorted ``classes`` and whether it is there."""
    C = classes.shape[0]
    if C == 0:
        z = torch.zeros_like(y)
        return z, torch.zeros_like(y, dtype=torch.bool)
    pos = torch.searchsorted(classes, y).clamp(max=C - 1)
    return pos, classes[pos] == y


def _finish(per: Tensor, reduction: str, sample_weight: Tensor | None, rows: Tensor,
            embeddings: Tensor, any_valid: bool) -> Tensor:
    sw = None
    if sample_weight is not None:
        sw = check_sample_weight(sample_weight, embeddings.shape[0], per)[rows]
    out = reduce_loss(per, reduction, sw)
    if not any_valid:
        out = out + zero_with_graph(embeddings).to(out.dtype)
    return out.to(embeddings.dtype)


# --------------------------------------------------------------------------- Proto-Triplet


def proto_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float = 0.5,
                       negatives: str = "all", distance: str = "euclidean",
                       reduction: str = "mean", sample_weight: Tensor | None = None,
                       support_mask: Tensor | None = None) -> Tensor:
    """Proto-Triplet loss (Mendez-Ruiz et al., 2023).

    Prototypes ``c_k`` are the means of the support rows of class ``k``.  For a
    query ``q`` of class ``y`` and the other prototype classes ``K'``::

        negatives='all'     (the notes' form):  l(q) = 1/|K'| sum_{k in K'} [d(q, c_y) - d(q, c_k) + margin]_+
        negatives='hardest' (the authors' code): l(q) = [d(q, c_y) - min_{k in K'} d(q, c_k) + margin]_+

    ``d`` is the Euclidean distance (``distance='squared'`` for its square).
    A query whose class has no prototype, or with no other prototype, gets 0.
    Returns ``[Q]`` per query (batch order) with ``reduction='none'``.
    """
    check_reduction(reduction)
    _check_inputs(embeddings, labels, allow_nota=False)
    _check_positive("margin", margin, allow_zero=True)
    if negatives not in ("all", "hardest"):
        raise ValueError(f"negatives: expected 'all' or 'hardest', got {negatives!r}")
    if distance not in ("euclidean", "squared"):
        raise ValueError(f"distance: expected 'euclidean' or 'squared', got {distance!r}")
    support = split_support_query(labels, support_mask)
    q_rows = (~support).nonzero().squeeze(1)
    wd = _work_dtype(embeddings)
    with _no_autocast(embeddings):
        x = embeddings.to(wd)
        classes, protos, _ = class_prototypes(x[support], labels[support])
        xq, yq = x[q_rows], labels[q_rows]
        pos, has = _lookup(classes, yq)
        valid = has & (classes.shape[0] >= 2)
        per = x.new_zeros(q_rows.shape[0])
        if bool(valid.any()):
            v = valid.nonzero().squeeze(1)
            dist = _sq_dists(xq[v], protos)
            if distance == "euclidean":
                dist = dist.clamp_min(_TINY).sqrt()
            pv = pos[v].unsqueeze(1)
            d_pos = dist.gather(1, pv)
            neg = torch.ones_like(dist, dtype=torch.bool).scatter(1, pv, False)
            if negatives == "all":
                hinge = (d_pos - dist + margin).clamp_min(0.0) * neg
                vals = hinge.sum(1) / neg.sum(1)
            else:
                d_neg = dist.masked_fill(~neg, float("inf")).min(1).values
                vals = (d_pos.squeeze(1) - d_neg + margin).clamp_min(0.0)
            per = per.index_put((v,), vals)
    return _finish(per, reduction, sample_weight, q_rows, embeddings, bool(valid.any()))


# --------------------------------------------------------------------------- ICNN


def _icnn_parts(embeddings: Tensor, labels: Tensor, k: int, tau: float, omega: bool,
                anchor_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Per-anchor shares ``c_i`` (their mean over the valid anchors is the
    ICNN score) and the valid-anchor mask, both over ``anchor_rows``."""
    x = embeddings
    B = x.shape[0]
    A = anchor_rows.shape[0]
    y = labels
    ya = y[anchor_rows]
    same = ya.unsqueeze(1) == y.unsqueeze(0)  # [A, B]
    not_self = torch.ones(A, B, dtype=torch.bool, device=x.device)
    not_self[torch.arange(A, device=x.device), anchor_rows] = False
    s = same & not_self
    o = ~same
    valid = s.any(1) & o.any(1)
    shares = x.new_zeros(A)
    if not bool(valid.any()):
        return shares, valid
    vr = valid.nonzero().squeeze(1)
    s, o, not_self = s[vr], o[vr], not_self[vr]
    nv = vr.shape[0]
    d = _euclid(x[anchor_rows[vr]], x)  # [V, B]
    k_eff = min(k, B - 2)  # the authors' code: k = n - 2 when k + 2 >= n
    sel = d.masked_fill(~not_self, float("inf"))
    top = torch.topk(sel, k_eff + 1, dim=1, largest=False)
    d_k = top.values[:, k_eff - 1]  # k-th nearest distance
    hard = torch.zeros_like(not_self).scatter(1, top.indices[:, :k_eff], True)
    if tau > 0:
        t = 0.5 * (top.values[:, k_eff - 1] + top.values[:, k_eff])
        w = torch.sigmoid((t.unsqueeze(1) - d) / (tau * t.clamp_min(_TINY)).unsqueeze(1))
        w = w * not_self
    else:
        w = hard.to(d.dtype)
    sf, of = s.to(d.dtype), o.to(d.dtype)
    ws, wo = w * sf, w * of
    # gamma: share of same-class neighbours
    gamma = ws.sum(1) / w.sum(1).clamp_min(_TINY)
    # lambda, same class: distances over max(nearest other-class distance, k-th distance)
    nn_dc = d.masked_fill(~o, float("inf")).min(1).values
    nd = (d / torch.maximum(nn_dc, d_k).clamp_min(_TINY).unsqueeze(1)).clamp(max=1.0)
    a = ws.sum(1).clamp(max=1.0)
    ms = (ws * nd).sum(1) / ws.sum(1).clamp_min(_TINY)
    n_s = a.sum()
    lam_s = 1.0 - (nv / n_s.clamp_min(_TINY)) * a * ms
    # lambda, other classes: distances over the largest other-class neighbour distance
    hard_o = hard & o
    if bool(hard_o.any()):
        d_max = d.masked_fill(~hard_o, 0.0).max()
        dd = (d / d_max.clamp_min(_TINY)).clamp(max=1.0)
        b = wo.sum(1).clamp(max=1.0)
        md = (wo * dd).sum(1) / wo.sum(1).clamp_min(_TINY)
        lam_d = (nv / b.sum().clamp_min(_TINY)) * b * md
    else:  # no other-class neighbour anywhere: the authors' code scores this term 1
        dd = torch.zeros_like(d)
        lam_d = torch.ones_like(lam_s)
    lam = 0.5 * (lam_s + lam_d)
    if omega:
        def wvar(weights: Tensor, values: Tensor) -> Tensor:
            tot = weights.sum()
            if float(tot.detach()) <= _TINY:
                return tot * 0
            mu = (weights * values).sum() / tot
            return (weights * (values - mu) ** 2).sum() / tot

        om = 1.0 - (wvar(ws, nd) + wvar(wo, dd))
        c = (lam + gamma + om) / 3.0
    else:
        c = 0.5 * (lam + gamma)
    return shares.index_put((vr,), c), valid


def _icnn_anchor_rows(labels: Tensor, anchors: str, support_mask: Tensor | None) -> Tensor:
    if anchors not in ("all", "query"):
        raise ValueError(f"anchors: expected 'all' or 'query', got {anchors!r}")
    if anchors == "all":
        if support_mask is not None:
            split_support_query(labels, support_mask)  # validate only
        return torch.arange(labels.shape[0], device=labels.device)
    return (~split_support_query(labels, support_mask)).nonzero().squeeze(1)


def _icnn_check(k: int, tau: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an integer >= 1 (number of neighbours), got {k!r}")
    _check_positive("tau", tau, allow_zero=True)


def icnn_score(embeddings: Tensor, labels: Tensor, k: int = 4, omega: bool = True,
               tau: float = 0.0, anchors: str = "all", support_mask: Tensor | None = None) -> Tensor:
    """The ICNN score in [0, 1] (higher = better separated); ``tau=0`` is the
    exact (hard-neighbour) score, ``tau > 0`` the relaxation used by the loss.

    Every other row of the batch is a neighbour candidate; anchors are every
    row (``anchors='all'``) or the query rows.  Only anchors with at least one
    other row of their class and one row of another class count.  Returns NaN
    when no anchor counts (the score is undefined there).  See docs/pair.md (episode losses)
    for the exact terms.
    """
    _check_inputs(embeddings, labels, allow_nota=False)
    _icnn_check(k, tau)
    rows = _icnn_anchor_rows(labels, anchors, support_mask)
    wd = _work_dtype(embeddings)
    with _no_autocast(embeddings):
        shares, valid = _icnn_parts(embeddings.to(wd), labels, k, tau, omega, rows)
    if not bool(valid.any()):
        return embeddings.new_tensor(float("nan"))
    return shares[valid].mean().to(embeddings.dtype)


def icnn_loss(embeddings: Tensor, labels: Tensor, k: int = 4, tau: float = 0.05, omega: bool = True,
              anchors: str = "all", reduction: str = "mean", sample_weight: Tensor | None = None,
              support_mask: Tensor | None = None) -> Tensor:
    """ICNN loss ``1 - ICNN`` with soft neighbour membership (Mendez-Ruiz et al., 2023).

    Per anchor ``i`` the share ``l_i = 1 - c_i``; the mean of ``c_i`` over the
    valid anchors equals the (relaxed) ICNN score, so with ``reduction='mean'``
    and every anchor valid the loss is exactly ``1 - ICNN_tau``.  Invalid
    anchors get 0.  ``tau`` is the sigmoid temperature relative to each
    anchor's neighbour radius; ``tau=0`` uses the hard neighbours (gamma then
    has no gradient, as in the authors' code).
    """
    check_reduction(reduction)
    _check_inputs(embeddings, labels, allow_nota=False)
    _icnn_check(k, tau)
    rows = _icnn_anchor_rows(labels, anchors, support_mask)
    wd = _work_dtype(embeddings)
    with _no_autocast(embeddings):
        shares, valid = _icnn_parts(embeddings.to(wd), labels, k, tau, omega, rows)
        per = torch.where(valid, 1.0 - shares, torch.zeros_like(shares))
    return _finish(per, reduction, sample_weight, rows, embeddings, bool(valid.any()))


# --------------------------------------------------------------------------- GPAM


def gaussian_prototypes(support: Tensor, support_labels: Tensor, shrinkage: float = 0.5,
                        min_var: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """Diagonal Gaussian per class: ``(classes [C], means [C, D], variances [C, D])``.

    ``var_k = (1 - shrinkage) * s2_k + shrinkage * t + min_var`` where ``s2_k``
    is the class's (biased, per-dimension) support variance (0 for one shot)
    and ``t`` the per-dimension variance of all support rows around their
    common mean (the shrinkage target shared by every class).
    """
    classes, means, counts = class_prototypes(support, support_labels)
    if classes.numel() == 0:
        return classes, means, means
    _, inverse = torch.unique(support_labels, sorted=True, return_inverse=True)
    dev = support - means[inverse]
    s2 = support.new_zeros(means.shape).index_add(0, inverse, dev * dev) / counts.unsqueeze(1).to(support.dtype)
    t = ((support - support.mean(0, keepdim=True)) ** 2).mean(0, keepdim=True)
    return classes, means, (1.0 - shrinkage) * s2 + shrinkage * t + min_var


def gpam_distances(queries: Tensor, means: Tensor, variances: Tensor, radius: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-dimension Gaussian class distance and range.

    ``d_k(q) = [(q - mu_k)^T Sigma_k^-1 (q - mu_k) + log|Sigma_k|] / D`` (``[Q, C]``) and
    ``r_k = log|Sigma_k| / D + radius`` (``[C]``); ``radius = 1`` is the mean of
    the Mahalanobis term for a point drawn from class ``k``'s Gaussian.
    """
    D = queries.shape[1]
    inv = variances.reciprocal()
    maha = (queries * queries) @ inv.T - 2.0 * queries @ (means * inv).T + (means * means * inv).sum(1)
    logdet = variances.log().sum(1)
    return (maha.clamp_min(0.0) + logdet) / D, logdet / D + radius


def gpam_loss(embeddings: Tensor, labels: Tensor, margin: float = 0.5, radius: float = 1.0,
              shrinkage: float = 0.5, min_var: float = 1e-4, reduction: str = "mean",
              sample_weight: Tensor | None = None, support_mask: Tensor | None = None) -> Tensor:
    """GPAM boundary loss with Gaussian prototypes and none-of-the-above.

    For a query of a support class ``y``::

        l(q) = [d_y - r_y + margin]_+ + sum_{k != y} [r_k + margin - d_k]_+

    and for a query labelled ``-1`` (none of the above / a sampled negative)
    or of a class without support rows, only the second sum, over every class.
    """
    check_reduction(reduction)
    _check_inputs(embeddings, labels, allow_nota=True)
    _check_positive("margin", margin, allow_zero=True)
    _check_positive("radius", radius)
    _check_positive("min_var", min_var)
    if not (0.0 <= shrinkage <= 1.0):
        raise ValueError(f"shrinkage: expected a value in [0, 1], got {shrinkage!r}")
    support = split_support_query(labels, support_mask)
    q_rows = (~support).nonzero().squeeze(1)
    wd = _work_dtype(embeddings)
    with _no_autocast(embeddings):
        x = embeddings.to(wd)
        classes, means, var = gaussian_prototypes(x[support], labels[support], shrinkage, min_var)
        per = x.new_zeros(q_rows.shape[0])
        any_valid = classes.numel() > 0 and q_rows.numel() > 0
        if any_valid:
            d, r = gpam_distances(x[q_rows], means, var, radius)
            pos, has = _lookup(classes, labels[q_rows])
            own = torch.zeros_like(d, dtype=torch.bool).scatter(1, pos.unsqueeze(1), has.unsqueeze(1))
            pull = (d - r + margin).clamp_min(0.0) * own
            push = (r + margin - d).clamp_min(0.0) * ~own
            per = (pull + push).sum(1)
    return _finish(per, reduction, sample_weight, q_rows, embeddings, any_valid)


def gpam_predict(queries: Tensor, support: Tensor, support_labels: Tensor, radius: float = 1.0,
                 shrinkage: float = 0.5, min_var: float = 1e-4) -> Tensor:
    """Predicted class per query, or ``-1`` (none of the above) when the
    nearest class in Gaussian distance is out of range: with
    ``k* = argmin_k d_k(q)``, predict ``k*`` if ``d_k* <= r_k*``, else ``-1``."""
    check_embeddings(queries, "queries")
    check_embeddings(support, "support")
    if queries.shape[1] != support.shape[1]:
        raise ValueError(f"queries: expected shape [Q, {support.shape[1]}] (the support's dimension), "
                         f"got {list(queries.shape)}")
    check_labels(support_labels, support.shape[0], "support_labels", device=support.device)
    if support.shape[0] == 0:
        raise ValueError("support: expected at least one row, got shape [0, D]")
    if int(support_labels.min()) < 0:
        raise ValueError(f"support_labels: expected class ids >= 0, got {int(support_labels.min())}")
    wd = _work_dtype(queries)
    with torch.no_grad(), _no_autocast(queries):
        classes, means, var = gaussian_prototypes(support.to(wd), support_labels, shrinkage, min_var)
        d, r = gpam_distances(queries.to(wd), means, var, radius)
        best = d.argmin(1) if d.shape[0] else torch.zeros(0, dtype=torch.long, device=d.device)
        inside = d.gather(1, best.unsqueeze(1)).squeeze(1) <= r[best]
        return torch.where(inside, classes[best], torch.full_like(best, -1))
