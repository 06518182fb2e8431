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

* ``reduction`` goes through :func:`losskit.core.reduction.reduce_loss`, the
  one reduction.  ``'none'`` returns ``[B]``, aligned with the input rows:
  support rows (ICNN with ``anchors='query'``: non-anchor rows) and rows that
  cannot be scored (their class has no prototype, or there is no other
  class) hold 0.  ``'sum'`` sums the rows.  ``'mean'`` divides that sum by the
  number of *query* rows (ICNN: of anchor rows) -- the rows that could be
  scored, counting those that got 0 -- not by ``B``.
* ``sample_weight`` has one entry per batch row (``[B]``, like every
  embedding objective) and multiplies that row's loss, so the weights of
  support rows have no effect.
* Distances: Proto-Triplet takes any name of the distance vocabulary
  (:mod:`losskit.distances`, resolved by :func:`~losskit.distances.get_distance`);
  ICNN is defined on the Euclidean distance; GPAM uses its own Gaussian class
  distance (:func:`gpam_distances`), which is not a pairwise distance.
* Distances are computed in float32 when the input is float16/bfloat16
  (autocast is switched off inside); the result has the input's dtype.
* Nothing to score (empty batch, one sample per class, a single class) gives
  a zero that is still connected to the graph.
* Hyperparameters are validated by the public functions here and once at
  construction by the modules (:mod:`losskit.losses.episodes`), which call the
  unchecked cores; tensors are validated once per call.  The support/query
  split and the prototypes need ``torch.unique`` and boolean indexing, which
  synchronise with the host whatever :func:`losskit.tensor_checks` says
  (ICNN with ``anchors='all'`` and no ``support_mask`` does not).
"""

from __future__ import annotations

import torch
from torch import Tensor

from losskit.core.checks import (
    check_bool,
    check_choice,
    check_embeddings,
    check_hparam,
    check_int,
    check_labels,
    check_reduction,
    check_sample_weight,
    tensor_checks_enabled,
)
from losskit.core.reduction import reduce_loss, zero_with_graph
from losskit.distances import BaseDistance, EuclideanDistance, get_distance

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
_EUCLIDEAN = EuclideanDistance()
NEGATIVES = ("all", "hardest")
ANCHORS = ("all", "query")


# --------------------------------------------------------------------------- helpers


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _no_autocast(x: Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def _check_inputs(embeddings: Tensor, labels: Tensor, allow_nota: bool) -> None:
    check_embeddings(embeddings)  # shape, dtype, finite values
    check_labels(labels, embeddings.shape[0], device=embeddings.device)
    if tensor_checks_enabled() and labels.numel() and labels.device.type != "meta":
        lo = -1 if allow_nota else 0
        mn = int(labels.min())
        if mn < lo:
            what = "-1 (none of the above) or a class id >= 0" if allow_nota else "class ids >= 0"
            raise ValueError(f"labels: expected {what}, got {mn}")


def _episode_inputs(embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None,
                    support_mask: Tensor | None, allow_nota: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """A support/query loss's inputs, validated once: ``(embeddings in the
    working dtype, sample_weight, support mask)``."""
    _check_inputs(embeddings, labels, allow_nota)
    support = split_support_query(labels, support_mask)
    x = embeddings.to(_work_dtype(embeddings))
    return x, check_sample_weight(sample_weight, x.shape[0], x), support


def _zeros(x: Tensor) -> Tensor:
    """``[B]`` zeros connected to the graph (nothing could be scored)."""
    return x.new_zeros(x.shape[0]) + zero_with_graph(x)


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
        if B and tensor_checks_enabled() and bool((support_mask & (labels < 0)).any()):
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


# --------------------------------------------------------------------------- Proto-Triplet


def _proto_triplet_hparams(margin: float, negatives: str, distance: str | BaseDistance,
                          ) -> tuple[float, str, BaseDistance]:
    """Validated ``(margin, negatives, distance object)`` of Proto-Triplet."""
    return (check_hparam("margin", margin, low=0.0), check_choice("negatives", negatives, NEGATIVES),
            get_distance(distance))


def proto_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float = 0.5,
                       negatives: str = "hardest", distance: str | BaseDistance = "euclidean",
                       reduction: str = "mean", sample_weight: Tensor | None = None,
                       support_mask: Tensor | None = None) -> Tensor:
    """Proto-Triplet loss (Mendez-Ruiz et al., 2023).

    Prototypes ``c_k`` are the means of the support rows of class ``k``.  For a
    query ``q`` of class ``y`` and the other prototype classes ``K'``::

        negatives='hardest' (default, the authors' code): l(q) = [d(q, c_y) - min_{k in K'} d(q, c_k) + margin]_+
        negatives='all'     (the notes' form):  l(q) = 1/|K'| sum_{k in K'} [d(q, c_y) - d(q, c_k) + margin]_+

    The default is ``proto_triplet_loss`` of maumruiz/FSL-Loss
    (``algorithms/icnn_loss.py``: hardest other prototype, margin 0.5, mean
    over queries), except that the distance is the exact Euclidean one (the
    code adds 1e-6 under the square root).

    ``d`` is ``distance``, a name of the distance vocabulary
    (:mod:`losskit.distances`: ``'euclidean'`` (default), ``'squared-euclidean'``
    (Prototypical Networks), ``'cosine'``, ``'dot'``) or a distance object; for
    a similarity the hinge is ``[s(q, c_k) - s(q, c_y) + margin]_+`` and the
    hardest negative the most similar one.  A query whose class has no
    prototype, or with no other prototype, gets 0.

    ``reduction='none'``: ``[B]`` (support rows 0); ``'mean'``: the sum over
    the ``[B]`` rows divided by the number of query rows.
    """
    check_reduction(reduction)
    margin, negatives, dist = _proto_triplet_hparams(margin, negatives, distance)
    return _proto_triplet(embeddings, labels, margin, negatives, dist, reduction, sample_weight, support_mask)


def _proto_triplet(embeddings: Tensor, labels: Tensor, margin: float, negatives: str, dist: BaseDistance,
                   reduction: str, sample_weight: Tensor | None, support_mask: Tensor | None) -> Tensor:
    """:func:`proto_triplet_loss` on validated hyperparameters."""
    x, sw, support = _episode_inputs(embeddings, labels, sample_weight, support_mask, allow_nota=False)
    query = ~support
    with _no_autocast(embeddings):
        classes, protos, _ = class_prototypes(x[support], labels[support])
        C = classes.shape[0]
        if C >= 2:
            d = dist.pairwise(x, protos)  # [B, C]; support rows are masked below
            pos, has = _lookup(classes, labels)
            pv = pos.unsqueeze(1)
            d_pos = d.gather(1, pv)
            neg = torch.ones_like(d, dtype=torch.bool).scatter(1, pv, False)
            if negatives == "all":
                vals = ((dist.margin(d_pos, d) + margin).clamp_min(0.0) * neg).sum(1) / (C - 1)
            else:
                d_neg = dist.closest(d.masked_fill(~neg, dist.farthest_fill(d.dtype)), 1).values
                vals = (dist.margin(d_pos.squeeze(1), d_neg) + margin).clamp_min(0.0)
            per = torch.where(query & has, vals, torch.zeros_like(vals))
        else:
            per = _zeros(x)
        out = reduce_loss(per, reduction, sw, denominator=query.sum(), checked=True)
    return out.to(embeddings.dtype)


# --------------------------------------------------------------------------- ICNN


def _wvar(weights: Tensor, values: Tensor) -> Tensor:
    """Weighted population variance (0 when every weight is 0)."""
    tot = weights.sum().clamp_min(_TINY)
    mu = (weights * values).sum() / tot
    return (weights * (values - mu) ** 2).sum() / tot


def _icnn_parts(x: Tensor, y: Tensor, k: int, tau: float, omega: bool, anchor: Tensor,
                nn_candidates: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-row shares ``c_i`` (their mean over the valid anchors is the ICNN
    score; 0 elsewhere) and the valid-anchor mask, both ``[B]``.  Computed
    over every row with masks (no host synchronisation).

    ``nn_candidates``: how many nearest rows are searched for the nearest
    other-class row ``dnn_i`` (None: ``k + 1``, the authors' ``ipc``
    default); an anchor with none among them gets ``nd = 0`` (the code's
    ``d / inf``).  A number ``>= B - 1`` searches the whole batch."""
    B = x.shape[0]
    if B < 3:  # no row can have both another row of its class and one of another class
        return _zeros(x), torch.zeros(B, dtype=torch.bool, device=x.device)
    eye = torch.eye(B, dtype=torch.bool, device=x.device)
    same = y.unsqueeze(1) == y.unsqueeze(0)
    s = same & ~eye
    o = ~same
    valid = anchor & s.any(1) & o.any(1)
    vf = valid.to(x.dtype)
    nv = vf.sum()
    d = _EUCLIDEAN.pairwise(x)  # [B, B]
    k_eff = min(k, B - 2)  # the authors' code: k = n - 2 when k + 2 >= n
    cand = min(B - 1, k_eff + 1 if nn_candidates is None else nn_candidates)
    top = torch.topk(d.masked_fill(eye, float("inf")), max(k_eff + 1, cand), dim=1, largest=False)
    d_k = top.values[:, k_eff - 1]  # k-th nearest distance
    hard = torch.zeros_like(eye).scatter(1, top.indices[:, :k_eff], True)
    if tau > 0:
        t = 0.5 * (top.values[:, k_eff - 1] + top.values[:, k_eff])
        w = torch.sigmoid((t.unsqueeze(1) - d) / (tau * t.clamp_min(_TINY)).unsqueeze(1)) * ~eye
    else:
        w = hard.to(d.dtype)
    ws, wo = w * s.to(d.dtype), w * o.to(d.dtype)
    # gamma: share of same-class neighbours
    gamma = ws.sum(1) / w.sum(1).clamp_min(_TINY)
    # lambda, same class: distances over max(nearest other-class distance, k-th distance)
    if cand >= B - 1:  # the whole batch
        nn_dc = d.masked_fill(~o, float("inf")).min(1).values
    else:  # among the cand nearest rows, as the authors' code (inf when none: nd = 0 below)
        oc = o.gather(1, top.indices[:, :cand])
        nn_dc = top.values[:, :cand].masked_fill(~oc, float("inf")).min(1).values
    den = torch.maximum(nn_dc, d_k).clamp_min(_TINY).unsqueeze(1)
    nd = torch.where(torch.isinf(den), torch.zeros_like(d), d / den).clamp(max=1.0)
    a = ws.sum(1).clamp(max=1.0)
    ms = (ws * nd).sum(1) / ws.sum(1).clamp_min(_TINY)
    lam_s = 1.0 - (nv / (a * vf).sum().clamp_min(_TINY)) * a * ms
    # lambda, other classes: distances over the largest other-class neighbour distance
    # (of the valid anchors); with none anywhere the authors' code scores this term 1
    hard_o = hard & o & valid.unsqueeze(1)
    has_o = hard_o.any()
    d_max = d.masked_fill(~hard_o, 0.0).max()
    dd = torch.where(has_o, (d / d_max.clamp_min(_TINY)).clamp(max=1.0), torch.zeros_like(d))
    b = wo.sum(1).clamp(max=1.0)
    md = (wo * dd).sum(1) / wo.sum(1).clamp_min(_TINY)
    lam_d = torch.where(has_o, (nv / (b * vf).sum().clamp_min(_TINY)) * b * md, torch.ones_like(md))
    lam = 0.5 * (lam_s + lam_d)
    if omega:
        vw = vf.unsqueeze(1)
        om = 1.0 - (_wvar(ws * vw, nd) + _wvar(wo * vw, dd))
        c = (lam + gamma + om) / 3.0
    else:
        c = 0.5 * (lam + gamma)
    return torch.where(valid, c, torch.zeros_like(c)), valid


def _icnn_anchors(labels: Tensor, anchors: str, support_mask: Tensor | None) -> Tensor:
    """Bool ``[B]``: the anchor rows."""
    if anchors == "all":
        if support_mask is not None:
            split_support_query(labels, support_mask)  # validate only
        return torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    return ~split_support_query(labels, support_mask)


def _icnn_hparams(k: int, tau: float, omega: bool, anchors: str) -> tuple[int, float, bool, str]:
    """Validated ``(k, tau, omega, anchors)`` of ICNN (``tau = 0``: hard neighbours)."""
    return (check_int("k", k, low=1), check_hparam("tau", tau, low=0.0), check_bool("omega", omega),
            check_choice("anchors", anchors, ANCHORS))


def _icnn_extra_hparams(log: bool, nn_candidates: int | None) -> tuple[bool, int | None]:
    """Validated ``(log, nn_candidates)`` of the ICNN loss."""
    return check_bool("log", log), check_int("nn_candidates", nn_candidates, low=1, allow_none=True)


def icnn_score(embeddings: Tensor, labels: Tensor, k: int = 4, omega: bool = False,
               tau: float = 0.0, anchors: str = "all", support_mask: Tensor | None = None, *,
               nn_candidates: int | None = None) -> Tensor:
    """The ICNN score in [0, 1] (higher = better separated); ``tau=0`` is the
    exact (hard-neighbour) score, ``tau > 0`` the soft relaxation.

    Defaults are the authors' released code (``modified_score`` in
    maumruiz/FSL-Loss, ``algorithms/icnn_loss.py``): ``(lambda + gamma) / 2``
    (``omega=False``), the nearest other-class row looked for among the
    ``k + 1`` nearest rows (``nn_candidates``).  Every other row of the batch
    is a neighbour candidate; anchors are every row (``anchors='all'``) or the
    query rows.  Only anchors with at least one other row of their class and
    one row of another class count.  Returns NaN when no anchor counts (the
    score is undefined there).  See docs/pair.md (episode losses) for the
    exact terms.
    """
    k, tau, omega, anchors = _icnn_hparams(k, tau, omega, anchors)
    _, nn_candidates = _icnn_extra_hparams(True, nn_candidates)
    return _icnn_score(embeddings, labels, k, tau, omega, anchors, support_mask, nn_candidates)


def _icnn_score(embeddings, labels, k, tau, omega, anchors, support_mask, nn_candidates=None) -> Tensor:
    _check_inputs(embeddings, labels, allow_nota=False)
    anchor = _icnn_anchors(labels, anchors, support_mask)
    with _no_autocast(embeddings):
        shares, valid = _icnn_parts(embeddings.to(_work_dtype(embeddings)), labels, k, tau, omega, anchor,
                                    nn_candidates)
        vf = valid.to(shares.dtype)
        score = (shares * vf).sum() / vf.sum()  # 0 / 0 = NaN when no anchor counts
    return score.to(embeddings.dtype)


def icnn_loss(embeddings: Tensor, labels: Tensor, k: int = 4, tau: float = 0.0, omega: bool = False,
              anchors: str = "all", reduction: str = "mean", sample_weight: Tensor | None = None,
              support_mask: Tensor | None = None, *, log: bool = True, nn_candidates: int | None = None) -> Tensor:
    """ICNN loss (Mendez-Ruiz et al., 2023), by default as the authors' code trains it.

    Defaults (maumruiz/FSL-Loss, ``algorithms/icnn_loss.py``, ``get_icnn_loss``
    with ``fullicnn``): hard neighbours (``tau=0``), score
    ``(lambda + gamma) / 2`` (``omega=False``), the nearest other-class row
    among the ``k + 1`` nearest (``nn_candidates=None``), and the loss
    ``-log(score)`` (``log=True``).  ``log=False`` gives ``1 - score``;
    ``tau > 0`` the soft neighbour membership (sigmoid weights of relative
    temperature ``tau``; our relaxation, not the authors'), ``omega=True``
    the paper notes' ``(lambda + gamma + omega) / 3``.

    Per anchor: with ``log=False`` the share ``l_i = 1 - c_i``, whose mean
    over the valid anchors is ``1 - score``; with ``log=True`` every valid
    anchor gets ``l_i = -log(score)`` (the score is a batch quantity; it is
    floored at 1e-12).  Invalid anchors and non-anchor rows get 0
    (``reduction='none'`` gives ``[B]``); ``'mean'`` divides by the number of
    anchor rows (``B`` with ``anchors='all'``, the query rows with
    ``'query'``), so with every anchor valid ``'mean'`` is exactly the loss.
    ``tau=0``: gamma has no gradient (as in the authors' code).
    """
    check_reduction(reduction)
    k, tau, omega, anchors = _icnn_hparams(k, tau, omega, anchors)
    log, nn_candidates = _icnn_extra_hparams(log, nn_candidates)
    return _icnn_loss(embeddings, labels, k, tau, omega, anchors, reduction, sample_weight, support_mask,
                      log, nn_candidates)


def _icnn_loss(embeddings, labels, k, tau, omega, anchors, reduction, sample_weight, support_mask,
               log=True, nn_candidates=None) -> Tensor:
    """:func:`icnn_loss` on validated hyperparameters."""
    _check_inputs(embeddings, labels, allow_nota=False)
    anchor = _icnn_anchors(labels, anchors, support_mask)
    with _no_autocast(embeddings):
        x = embeddings.to(_work_dtype(embeddings))
        sw = check_sample_weight(sample_weight, x.shape[0], x)
        shares, valid = _icnn_parts(x, labels, k, tau, omega, anchor, nn_candidates)
        if log:
            vf = valid.to(shares.dtype)
            score = (shares * vf).sum() / vf.sum().clamp_min(1.0)
            per = torch.where(valid, -torch.log(score.clamp_min(_TINY)), shares)  # shares are 0 where not valid
        else:
            per = torch.where(valid, 1.0 - shares, shares)
        out = reduce_loss(per, reduction, sw, denominator=anchor.sum(), checked=True)
    return out.to(embeddings.dtype)


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


def _gpam_hparams(margin: float, radius: float, shrinkage: float, min_var: float,
                 ) -> tuple[float, float, float, float]:
    """Validated ``(margin, radius, shrinkage, min_var)`` of GPAM."""
    return (check_hparam("margin", margin, low=0.0), check_hparam("radius", radius, low=0.0, low_open=True),
            check_hparam("shrinkage", shrinkage, low=0.0, high=1.0),
            check_hparam("min_var", min_var, low=0.0, low_open=True))


def gpam_loss(embeddings: Tensor, labels: Tensor, margin: float = 0.5, radius: float = 1.0,
              shrinkage: float = 0.5, min_var: float = 1e-4, reduction: str = "mean",
              sample_weight: Tensor | None = None, support_mask: Tensor | None = None) -> Tensor:
    """GPAM boundary loss with Gaussian prototypes and none-of-the-above.

    For a query of a support class ``y``::

        l(q) = [d_y - r_y + margin]_+ + sum_{k != y} [r_k + margin - d_k]_+

    and for a query labelled ``-1`` (none of the above / a sampled negative)
    or of a class without support rows, only the second sum, over every class.
    ``reduction='none'``: ``[B]`` (support rows 0); ``'mean'``: the sum divided
    by the number of query rows.
    """
    check_reduction(reduction)
    margin, radius, shrinkage, min_var = _gpam_hparams(margin, radius, shrinkage, min_var)
    return _gpam_loss(embeddings, labels, margin, radius, shrinkage, min_var, reduction, sample_weight,
                      support_mask)


def _gpam_loss(embeddings, labels, margin, radius, shrinkage, min_var, reduction, sample_weight,
               support_mask) -> Tensor:
    """:func:`gpam_loss` on validated hyperparameters."""
    x, sw, support = _episode_inputs(embeddings, labels, sample_weight, support_mask, allow_nota=True)
    query = ~support
    with _no_autocast(embeddings):
        classes, means, var = gaussian_prototypes(x[support], labels[support], shrinkage, min_var)
        if classes.numel() > 0:
            d, r = gpam_distances(x, means, var, radius)  # [B, C]; support rows are masked below
            pos, has = _lookup(classes, labels)
            own = torch.zeros_like(d, dtype=torch.bool).scatter(1, pos.unsqueeze(1), has.unsqueeze(1))
            pull = (d - r + margin).clamp_min(0.0) * own
            push = (r + margin - d).clamp_min(0.0) * ~own
            vals = (pull + push).sum(1)
            per = torch.where(query, vals, torch.zeros_like(vals))
        else:
            per = _zeros(x)
        out = reduce_loss(per, reduction, sw, denominator=query.sum(), checked=True)
    return out.to(embeddings.dtype)


def gpam_predict(queries: Tensor, support: Tensor, support_labels: Tensor, radius: float = 1.0,
                 shrinkage: float = 0.5, min_var: float = 1e-4) -> Tensor:
    """Predicted class per query, or ``-1`` (none of the above) when the
    nearest class in Gaussian distance is out of range: with
    ``k* = argmin_k d_k(q)``, predict ``k*`` if ``d_k* <= r_k*``, else ``-1``."""
    _, radius, shrinkage, min_var = _gpam_hparams(0.0, radius, shrinkage, min_var)
    return _gpam_predict(queries, support, support_labels, radius, shrinkage, min_var)


def _gpam_predict(queries, support, support_labels, radius, shrinkage, min_var) -> Tensor:
    check_embeddings(queries, "queries")
    check_embeddings(support, "support")
    if queries.shape[1] != support.shape[1]:
        raise ValueError(f"queries: expected shape [Q, {support.shape[1]}] (the support's dimension), "
                         f"got {list(queries.shape)}")
    check_labels(support_labels, support.shape[0], "support_labels", device=support.device)
    if support.shape[0] == 0:
        raise ValueError("support: expected at least one row, got shape [0, D]")
    if tensor_checks_enabled() and int(support_labels.min()) < 0:
        raise ValueError(f"support_labels: expected class ids >= 0, got {int(support_labels.min())}")
    wd = _work_dtype(queries)
    with torch.no_grad(), _no_autocast(queries):
        classes, means, var = gaussian_prototypes(support.to(wd), support_labels, shrinkage, min_var)
        d, r = gpam_distances(queries.to(wd), means, var, radius)
        best = d.argmin(1) if d.shape[0] else torch.zeros(0, dtype=torch.long, device=d.device)
        inside = d.gather(1, best.unsqueeze(1)).squeeze(1) <= r[best]
        return torch.where(inside, classes[best], torch.full_like(best, -1))
