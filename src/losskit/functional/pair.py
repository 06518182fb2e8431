"""Pair- and triplet-based metric-learning losses: contrastive, triplet, TCM.

Every loss here is first a per-anchor vector ``l`` [B] whose mean over the
batch is the paper's batch loss, so ``reduction`` and ``sample_weight``
work as everywhere in losskit.  Losses that the papers average over *pairs*
(``pair_average``) give anchor ``i`` the share ``B * sum_{pairs of i} l_p / N``
(``N`` = pairs averaged over); ``mean`` then equals the pair average.

Shared keyword arguments: ``ref_embeddings``/``ref_labels`` (score anchors
against another set), ``self_index`` (each anchor's own column there),
``batch_size`` (the ``B`` above; default the number of anchors) and
``count_reduce`` (a function summing pair counts over processes; the
distributed wrapper passes an all-reduce).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit._checks import check_embeddings, check_labels, check_reduction, check_sample_weight, reduce_loss
from losskit.distances import BaseDistance, CosineSimilarity, get_distance
from losskit.mining.pairs import block_pair_masks, resolve_reference
from losskit.mining.triplet import TRIPLET_MINING, mine_triplets

__all__ = ["contrastive_loss", "triplet_loss", "tcm_regularizer", "PAIR_AVERAGES", "reduce_with_batch"]

PAIR_AVERAGES = ("nonzero", "all")


def reduce_with_batch(per: Tensor, reduction: str, sample_weight: Tensor | None, batch_size: int | None) -> Tensor:
    """losskit's reduction where 'mean' divides by ``batch_size`` (default ``len(per)``)."""
    if batch_size is None or reduction != "mean":
        return reduce_loss(per, reduction, sample_weight)
    total = reduce_loss(per, "sum", sample_weight)
    return total / max(batch_size, 1)


def _inputs(embeddings, labels, ref_embeddings, ref_labels, self_index, sample_weight, reduction):
    check_embeddings(embeddings)
    check_labels(labels, embeddings.shape[0], device=embeddings.device)
    check_reduction(reduction)
    w = check_sample_weight(sample_weight, embeddings.shape[0], embeddings)
    ref, rl, si = resolve_reference(embeddings, labels, ref_embeddings, ref_labels, self_index)
    if ref_embeddings is not None:
        check_embeddings(ref, "ref_embeddings")
    return ref, rl, si, w


def _connect(per: Tensor, *tensors: Tensor) -> Tensor:
    # keep the graph alive through every input even when no pair qualified
    z = None
    for t in tensors:
        if t is not None and t.requires_grad:
            z = t.sum() * 0 if z is None else z + t.sum() * 0
    return per if z is None else per + z


def _count(n: Tensor, count_reduce: Callable | None) -> Tensor:
    return count_reduce(n) if count_reduce is not None else n


def _check_avg(pair_average):
    if pair_average not in PAIR_AVERAGES:
        raise ValueError(f"pair_average: expected one of {PAIR_AVERAGES}, got {pair_average!r}")


def contrastive_loss(
    embeddings: Tensor,
    labels: Tensor,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    reduction: str = "mean",
    sample_weight: Tensor | None = None,
    *,
    distance: str | BaseDistance = "euclidean",
    normalize: bool = True,
    squared_hinge: bool = False,
    pair_average: str = "nonzero",
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    self_index: Tensor | None = None,
    batch_size: int | None = None,
    count_reduce: Callable | None = None,
) -> Tensor:
    """Contrastive loss (Hadsell, Chopra, LeCun 2006) with PML's two margins.

    Per ordered pair: positives ``[d - pos_margin]_+``, negatives
    ``[neg_margin - d]_+`` (for a similarity: ``[pos_margin - s]_+`` and
    ``[s - neg_margin]_+``).  ``squared_hinge=True`` uses Hadsell et al.'s
    ``1/2 [.]_+^2``.  Positive and negative terms are each averaged over
    their pairs (``pair_average='nonzero'``: over pairs with a nonzero loss,
    PML's AvgNonZeroReducer; ``'all'``: over all pairs) and summed.
    """
    _check_avg(pair_average)
    ref, rl, si, w = _inputs(embeddings, labels, ref_embeddings, ref_labels, self_index, sample_weight, reduction)
    dist = get_distance(distance, normalize=normalize)
    B = embeddings.shape[0]
    if B == 0 or ref.shape[0] == 0:
        return reduce_with_batch(_connect(embeddings.new_zeros(B), embeddings, ref), reduction, w, batch_size)
    mat = dist.pairwise(embeddings, None if ref is embeddings else ref)
    pos, neg = block_pair_masks(labels, rl, si)
    lp = F.relu(dist.margin(mat, pos_margin)) * pos
    ln = F.relu(dist.margin(neg_margin, mat)) * neg
    if squared_hinge:
        lp = 0.5 * lp * lp
        ln = 0.5 * ln * ln
    if pair_average == "nonzero":
        np_, nn_ = (lp > 0).sum(), (ln > 0).sum()
    else:
        np_, nn_ = pos.sum(), neg.sum()
    np_, nn_ = _count(np_.to(mat.dtype), count_reduce), _count(nn_.to(mat.dtype), count_reduce)
    Bd = B if batch_size is None else batch_size
    per = Bd * (lp.sum(1) / np_.clamp_min(1) + ln.sum(1) / nn_.clamp_min(1))
    return reduce_with_batch(_connect(per, embeddings, ref), reduction, w, batch_size)


def triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = 0.2,
    mining: str = "semi-hard",
    reduction: str = "mean",
    sample_weight: Tensor | None = None,
    *,
    distance: str | BaseDistance = "squared-euclidean",
    normalize: bool = True,
    smooth: bool = False,
    pair_average: str = "nonzero",
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    self_index: Tensor | None = None,
    batch_size: int | None = None,
    count_reduce: Callable | None = None,
) -> Tensor:
    """Triplet loss (FaceNet): ``[d(a,p) - d(a,n) + margin]_+`` over mined triplets.

    FaceNet uses squared Euclidean distances of L2-normalised embeddings and
    ``margin = 0.2``; ``mining`` is ``all``, ``hard`` (batch-hard) or
    ``semi-hard``; ``smooth=True`` uses ``softplus`` instead of the hinge.
    Averaged over triplets with a nonzero loss (``pair_average='nonzero'``)
    or over all mined triplets (``'all'``).
    """
    _check_avg(pair_average)
    if mining not in TRIPLET_MINING:
        raise ValueError(f"mining: expected one of {TRIPLET_MINING}, got {mining!r}")
    ref, rl, si, w = _inputs(embeddings, labels, ref_embeddings, ref_labels, self_index, sample_weight, reduction)
    dist = get_distance(distance, normalize=normalize)
    B = embeddings.shape[0]
    if B == 0 or ref.shape[0] == 0:
        return reduce_with_batch(_connect(embeddings.new_zeros(B), embeddings, ref), reduction, w, batch_size)
    mat = dist.pairwise(embeddings, None if ref is embeddings else ref)
    pos, neg = block_pair_masks(labels, rl, si)
    M = ref.shape[0]
    if mining == "all":  # [c, M, M] boolean blocks
        step = max(1, (1 << 24) // max(M * M, 1))
        parts = [mine_triplets(mat[s:s + step].detach(), pos[s:s + step], neg[s:s + step], mining, dist, s)
                 for s in range(0, B, step)]
        a, p, n = (torch.cat([t[i] for t in parts]) for i in range(3))
    else:
        a, p, n = mine_triplets(mat.detach(), pos, neg, mining, dist)
    viol = dist.margin(mat[a, p], mat[a, n]) + margin
    lt = F.softplus(viol) if smooth else F.relu(viol)
    if pair_average == "nonzero":
        cnt = (lt > 0).sum().to(mat.dtype)
    else:
        cnt = torch.tensor(float(a.numel()), dtype=mat.dtype, device=mat.device)
    cnt = _count(cnt, count_reduce)
    Bd = B if batch_size is None else batch_size
    per = torch.zeros(B, dtype=lt.dtype, device=lt.device).index_add(0, a, lt) * (Bd / cnt.clamp_min(1))
    return reduce_with_batch(_connect(per, embeddings, ref), reduction, w, batch_size)


def tcm_regularizer(
    embeddings: Tensor,
    labels: Tensor,
    lambda_plus: float = 1.0,
    lambda_minus: float = 1.0,
    margin_plus: float = 0.9,
    margin_minus: float = 0.5,
    reduction: str = "mean",
    sample_weight: Tensor | None = None,
    *,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    self_index: Tensor | None = None,
    batch_size: int | None = None,
    count_reduce: Callable | None = None,
) -> Tensor:
    """The TCM regulariser (Zhang et al., ICLR 2024, arXiv 2307.04047), on cosine similarities S::

        lambda+ * sum_{pos, S <= m+} (m+ - S) / #{pos, S <= m+}
      + lambda- * sum_{neg, S >= m-} (S - m-) / #{neg, S >= m-}

    over ordered pairs; each term is 0 when no pair is selected.
    """
    ref, rl, si, w = _inputs(embeddings, labels, ref_embeddings, ref_labels, self_index, sample_weight, reduction)
    B = embeddings.shape[0]
    if B == 0 or ref.shape[0] == 0:
        return reduce_with_batch(_connect(embeddings.new_zeros(B), embeddings, ref), reduction, w, batch_size)
    sim = CosineSimilarity().pairwise(embeddings, None if ref is embeddings else ref)
    pos, neg = block_pair_masks(labels, rl, si)
    sel_p = pos & (sim <= margin_plus)
    sel_n = neg & (sim >= margin_minus)
    cp = _count(sel_p.sum().to(sim.dtype), count_reduce)
    cn = _count(sel_n.sum().to(sim.dtype), count_reduce)
    tp = ((margin_plus - sim) * sel_p).sum(1)
    tn = ((sim - margin_minus) * sel_n).sum(1)
    Bd = B if batch_size is None else batch_size
    per = Bd * (lambda_plus * tp / cp.clamp_min(1) + lambda_minus * tn / cn.clamp_min(1))
    return reduce_with_batch(_connect(per, embeddings, ref), reduction, w, batch_size)
