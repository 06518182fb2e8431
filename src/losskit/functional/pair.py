"""Pair- and triplet-based metric-learning losses: contrastive, triplet, TCM.

Every loss here is first a per-anchor vector ``l`` [B] whose mean over the
batch is the paper's batch loss, so ``reduction`` and ``sample_weight``
work as everywhere in losskit (``core.reduction.reduce_loss``; ``'mean'``
divides by the number of anchors given).  Losses that the papers average
over *pairs* (``pair_average``) give anchor ``i`` the share
``B * sum_{pairs of i} l_p / N`` (``N`` = pairs averaged over, ``B`` = the
reference's ``batch_size``, by default the number of anchors); ``mean`` then
equals the pair average.

``reference`` (a :class:`losskit.core.PairReference`, default the batch
itself) is what the anchors are scored against: a cross-batch memory, the
gathered global batch.  :class:`PairInputs` is the plumbing every pair loss
shares (validation, the resolved reference, pair masks, global pair counts,
the empty case, the reduction), so a loss is its formula.

Hyperparameters are checked by ``check_*_hparams`` (the modules call the same
function once at construction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit.core.checks import check_bool, check_choice, check_hparam, check_int, check_reduction, check_sample_weight
from losskit.core.context import PairReference
from losskit.core.reduction import reduce_loss, row_coefficients, zero_with_graph
from losskit.distances import BaseDistance, CosineSimilarity, get_distance
from losskit.kernels.pair_blocks import (ContrastiveRule, TCMRule, TripletRule, eager_capable, pair_block_sums,
                                        pair_block_totals)
from losskit.mining.pairs import block_pair_masks, resolve_reference
from losskit.mining.triplet import TRIPLET_MINING, hard_triplets, mine_triplets

__all__ = ["PairInputs", "contrastive_loss", "triplet_loss", "tcm_regularizer", "PAIR_AVERAGES", "DENSE_MAX_PAIRS",
           "check_contrastive_hparams", "check_triplet_hparams", "check_tcm_hparams"]

PAIR_AVERAGES = ("nonzero", "all")

#: with ``chunk_size=None`` a loss builds the dense ``B x M`` matrix under autograd up to this many
#: pairs (static shapes, ``torch.compile``-able) and walks row blocks beyond it
#: (:mod:`losskit.kernels.pair_blocks`: memory ``O(chunk x M)``)
DENSE_MAX_PAIRS = 1 << 22

#: triplet mining modes that walk row blocks at every size: their dense form has data-dependent
#: shapes anyway (no torch.compile), and ``all`` holds ``[c, M, M]`` masks and every triplet's
#: indices (1.1 GiB and 190x the floor's time at B = 1024, D = 512, 4 rows per class)
ALWAYS_BLOCKS = ("all", "semi-hard")


class PairInputs:
    """The validated inputs of one pair-loss call.

    Checks the anchors, labels, ``reduction`` and ``sample_weight`` once and
    resolves ``reference``; then gives the pair masks, pair counts summed
    over processes, each anchor's share of a pair average, and the reduced
    result.  ``M`` (reference rows) is 0 only when there is nothing to score
    against -- then every process sees it and ``zeros()`` is the answer; a
    process with no anchors (``B == 0``) still takes part in the counts.
    """

    def __init__(self, embeddings: Tensor, labels: Tensor, reduction: str, sample_weight: Tensor | None,
                 reference: PairReference | None):
        self.ref = resolve_reference(embeddings, labels, reference)
        self.reduction = check_reduction(reduction)
        self.weight = check_sample_weight(sample_weight, embeddings.shape[0], embeddings)
        self.embeddings, self.labels = embeddings, labels
        self.B, self.M = embeddings.shape[0], self.ref.embeddings.shape[0]
        # half-precision inputs are scored in float32: distances, mining decisions and pair
        # averages in bf16 change which pairs are mined (22% gradient error measured for
        # triplet); the per-anchor loss is returned in the input dtype
        self.work_dtype = torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) \
            else embeddings.dtype

    @property
    def empty(self) -> bool:
        return self.M == 0

    @property
    def others(self) -> Tensor | None:
        """The reference embeddings, or None when the reference is the batch itself."""
        return None if self.ref.is_batch else self.ref.embeddings

    def pairs(self, distance: BaseDistance) -> tuple[Tensor, Tensor, Tensor]:
        """``(mat, pos, neg)``, each ``[B, M]``: distances (or similarities)
        between anchors and reference, and the masks of positives (same label,
        not the anchor itself) and negatives (another label)."""
        pos, neg = block_pair_masks(self.labels, self.ref.labels, self.ref.self_index)
        others = None if self.others is None else self.others.to(self.work_dtype)
        return distance.pairwise(self.embeddings.to(self.work_dtype), others), pos, neg

    def chunked(self, chunk_size: int | None, mining: str | None = None) -> bool:
        """Whether to walk row blocks: ``chunk_size`` given, more than ``DENSE_MAX_PAIRS``
        pairs, or a triplet ``mining`` in ``ALWAYS_BLOCKS``."""
        return chunk_size is not None or self.B * self.M > DENSE_MAX_PAIRS or mining in ALWAYS_BLOCKS

    def _prepared(self, distance: BaseDistance):
        q = distance.prepare(self.embeddings.to(self.work_dtype))
        ref = self.ref
        r, r_labels = (None, None) if ref.is_batch else (distance.prepare(ref.embeddings.to(self.work_dtype)), ref.labels)
        return q, r, r_labels

    def block_sums(self, distance: BaseDistance, rule, chunk_size: int | None) -> tuple[Tensor, Tensor]:
        """``(sums [terms, B], counts [terms])`` of ``rule`` over row blocks (never ``B x M``)."""
        q, r, r_labels = self._prepared(distance)
        return pair_block_sums(q, r, self.labels, r_labels, self.ref.self_index, rule, chunk_size)

    def blocks(self, distance: BaseDistance, rule, chunk_size: int | None, combine) -> Tensor:
        """The loss over row blocks.  ``combine(values, counts)`` turns per-term values
        (``[terms, B]`` per-row sums, or ``[terms]`` totals) and pair counts into the
        per-anchor loss or the reduced loss (pair shares are linear in the values).
        Scalar reductions take the one-pass path (gradients built in forward:
        three matrix products), ``'none'`` the recomputing one (four)."""
        q, r, r_labels = self._prepared(distance)
        if self.reduction == "none" or not eager_capable(rule):
            sums, counts = pair_block_sums(q, r, self.labels, r_labels, self.ref.self_index, rule, chunk_size)
            return self.finish(combine(sums, counts))
        coef = row_coefficients(self.B, self.reduction, self.weight, dtype=q.dtype, device=q.device)
        totals, counts = pair_block_totals(q, r, self.labels, r_labels, self.ref.self_index, coef, rule, chunk_size)
        return combine(totals, counts).to(self.embeddings.dtype) + zero_with_graph(self.embeddings, self.others)

    def count(self, n: Tensor, dtype: torch.dtype) -> Tensor:
        """A pair count, summed over processes when the reference says so, at least 1."""
        return self.ref.count(n.to(dtype)).clamp_min(1)

    def share(self, per_anchor_sum: Tensor, count: Tensor) -> Tensor:
        """Anchor ``i``'s share ``B * sum_{pairs of i} l_p / N`` of a pair average."""
        return per_anchor_sum * (self.ref.batch_size / count)

    def finish(self, per: Tensor) -> Tensor:
        """Reduce the per-anchor losses ``[B]``, connected to every input even
        when no pair qualified."""
        per = per.to(self.embeddings.dtype) + zero_with_graph(self.embeddings, self.others)
        return reduce_loss(per, self.reduction, self.weight, checked=True)

    def zeros(self) -> Tensor:
        return self.finish(self.embeddings.new_zeros(self.B))


def _hinge(x: Tensor, smooth: bool) -> Tensor:
    return F.softplus(x) if smooth else F.relu(x)


# ---------------------------------------------------------------- contrastive

def _distance_and_average(distance, normalize, pair_average) -> BaseDistance:
    check_choice("pair_average", pair_average, PAIR_AVERAGES)
    return get_distance(distance, normalize=check_bool("normalize", normalize))


def check_contrastive_hparams(pos_margin, neg_margin, distance, normalize, squared_hinge, pair_average):
    """Validate the contrastive hyperparameters; returns the distance object."""
    check_hparam("pos_margin", pos_margin)
    check_hparam("neg_margin", neg_margin)
    check_bool("squared_hinge", squared_hinge)
    return _distance_and_average(distance, normalize, pair_average)


def contrastive_loss(embeddings: Tensor, labels: Tensor, pos_margin: float = 0.0, neg_margin: float = 1.0,
                     reduction: str = "mean", sample_weight: Tensor | None = None, *,
                     distance: str | BaseDistance = "euclidean", normalize: bool = True, squared_hinge: bool = False,
                     pair_average: str = "nonzero", reference: PairReference | None = None,
                     chunk_size: int | None = None) -> Tensor:
    """Contrastive loss (Hadsell, Chopra, LeCun 2006) with PML's two margins.

    Per ordered pair: positives ``[d - pos_margin]_+``, negatives
    ``[neg_margin - d]_+`` (for a similarity: ``[pos_margin - s]_+`` and
    ``[s - neg_margin]_+``).  ``squared_hinge=True`` uses Hadsell et al.'s
    ``1/2 [.]_+^2``.  Positive and negative terms are each averaged over
    their pairs (``pair_average='nonzero'``: over pairs with a nonzero loss,
    PML's AvgNonZeroReducer; ``'all'``: over all pairs) and summed.
    ``chunk_size``: anchor rows per block (None: dense up to ``DENSE_MAX_PAIRS``
    pairs, blocks of about 4M values beyond).
    """
    dist = check_contrastive_hparams(pos_margin, neg_margin, distance, normalize, squared_hinge, pair_average)
    chunk_size = check_int("chunk_size", chunk_size, low=1, allow_none=True)
    b = PairInputs(embeddings, labels, reduction, sample_weight, reference)
    if b.empty:
        return b.zeros()
    if b.chunked(chunk_size):
        rule = ContrastiveRule(dist, pos_margin, neg_margin, squared_hinge, pair_average == "nonzero")
        return b.blocks(dist, rule, chunk_size, lambda v, n: b.share(v[0], b.count(n[0], v.dtype))
                        + b.share(v[1], b.count(n[1], v.dtype)))
    mat, pos, neg = b.pairs(dist)
    lp = F.relu(dist.margin(mat, pos_margin)) * pos
    ln = F.relu(dist.margin(neg_margin, mat)) * neg
    if squared_hinge:
        lp = 0.5 * lp * lp
        ln = 0.5 * ln * ln
    if pair_average == "nonzero":
        np_, nn_ = (lp > 0).sum(), (ln > 0).sum()
    else:
        np_, nn_ = pos.sum(), neg.sum()
    per = b.share(lp.sum(1), b.count(np_, mat.dtype)) + b.share(ln.sum(1), b.count(nn_, mat.dtype))
    return b.finish(per)


# ---------------------------------------------------------------- triplet

def check_triplet_hparams(margin, mining, distance, normalize, smooth, pair_average):
    """Validate the triplet hyperparameters; returns the distance object."""
    check_hparam("margin", margin, low=0)
    check_choice("mining", mining, TRIPLET_MINING)
    check_bool("smooth", smooth)
    return _distance_and_average(distance, normalize, pair_average)


def triplet_loss(embeddings: Tensor, labels: Tensor, margin: float = 0.2, mining: str = "semi-hard",
                 reduction: str = "mean", sample_weight: Tensor | None = None, *,
                 distance: str | BaseDistance = "squared-euclidean", normalize: bool = True, smooth: bool = False,
                 pair_average: str = "nonzero", reference: PairReference | None = None,
                 chunk_size: int | None = None) -> Tensor:
    """Triplet loss (FaceNet): ``[d(a,p) - d(a,n) + margin]_+`` over mined triplets.

    FaceNet uses squared Euclidean distances of L2-normalised embeddings and
    ``margin = 0.2``; ``mining`` is ``all``, ``hard`` (batch-hard) or
    ``semi-hard``; ``smooth=True`` uses ``softplus`` instead of the hinge.
    Averaged over triplets with a nonzero loss (``pair_average='nonzero'``)
    or over all mined triplets (``'all'``).  ``hard`` has static shapes
    (``torch.compile``-able); ``all`` and ``semi-hard`` mine a data-dependent
    number of triplets.  ``chunk_size``: anchor rows per block (None: blocks
    for ``all`` and ``semi-hard`` at every size, for ``hard`` beyond
    ``DENSE_MAX_PAIRS`` pairs).
    """
    dist = check_triplet_hparams(margin, mining, distance, normalize, smooth, pair_average)
    chunk_size = check_int("chunk_size", chunk_size, low=1, allow_none=True)
    b = PairInputs(embeddings, labels, reduction, sample_weight, reference)
    if b.empty:
        return b.zeros()
    if b.chunked(chunk_size, mining):
        rule = TripletRule(dist, margin, mining, smooth, pair_average == "nonzero")
        return b.blocks(dist, rule, chunk_size, lambda v, n: b.share(v[0], b.count(n[0], v.dtype)))
    mat, pos, neg = b.pairs(dist)
    if mining == "hard":  # one triplet per anchor that has a positive and a negative
        p, n, has = hard_triplets(mat.detach(), pos, neg, dist)
        viol = dist.margin(mat.gather(1, p.unsqueeze(1)), mat.gather(1, n.unsqueeze(1))).squeeze(1) + margin
        lt = _hinge(viol, smooth) * has
        cnt = (lt > 0).sum() if pair_average == "nonzero" else has.sum()
        return b.finish(b.share(lt, b.count(cnt, mat.dtype)))
    M = b.M
    step = max(1, (1 << 24) // max(M * M, 1)) if mining == "all" else max(b.B, 1)  # [c, M, M] boolean blocks
    parts = [mine_triplets(mat[s:s + step].detach(), pos[s:s + step], neg[s:s + step], mining, dist, s)
             for s in range(0, max(b.B, 1), step)]
    a, p, n = (torch.cat([t[i] for t in parts]) for i in range(3))
    lt = _hinge(dist.margin(mat[a, p], mat[a, n]) + margin, smooth)
    cnt = (lt > 0).sum() if pair_average == "nonzero" else torch.full((), a.numel(), device=mat.device)
    per = mat.new_zeros(b.B).index_add(0, a, lt)
    return b.finish(b.share(per, b.count(cnt, mat.dtype)))


# ---------------------------------------------------------------- TCM

def check_tcm_hparams(lambda_plus, lambda_minus, margin_plus, margin_minus):
    """Validate the TCM regulariser's hyperparameters."""
    check_hparam("lambda_plus", lambda_plus, low=0)
    check_hparam("lambda_minus", lambda_minus, low=0)
    check_hparam("margin_plus", margin_plus, low=-1, high=1)
    check_hparam("margin_minus", margin_minus, low=-1, high=1)


def tcm_regularizer(embeddings: Tensor, labels: Tensor, lambda_plus: float = 1.0, lambda_minus: float = 1.0,
                    margin_plus: float = 0.9, margin_minus: float = 0.5, reduction: str = "mean",
                    sample_weight: Tensor | None = None, *, reference: PairReference | None = None,
                    chunk_size: int | None = None) -> Tensor:
    """The TCM regulariser (Zhang et al., ICLR 2024, arXiv 2307.04047), on cosine similarities S::

        lambda+ * sum_{pos, S <= m+} (m+ - S) / #{pos, S <= m+}
      + lambda- * sum_{neg, S >= m-} (S - m-) / #{neg, S >= m-}

    over ordered pairs; each term is 0 when no pair is selected.  ``chunk_size``:
    anchor rows per block (None: dense up to ``DENSE_MAX_PAIRS`` pairs, blocks beyond).
    """
    check_tcm_hparams(lambda_plus, lambda_minus, margin_plus, margin_minus)
    chunk_size = check_int("chunk_size", chunk_size, low=1, allow_none=True)
    b = PairInputs(embeddings, labels, reduction, sample_weight, reference)
    if b.empty:
        return b.zeros()
    if b.chunked(chunk_size):
        cos = CosineSimilarity()
        return b.blocks(cos, TCMRule(cos, margin_plus, margin_minus), chunk_size,
                        lambda v, n: lambda_plus * b.share(v[0], b.count(n[0], v.dtype))
                        + lambda_minus * b.share(v[1], b.count(n[1], v.dtype)))
    sim, pos, neg = b.pairs(CosineSimilarity())
    sel_p = pos & (sim <= margin_plus)
    sel_n = neg & (sim >= margin_minus)
    tp = b.share(((margin_plus - sim) * sel_p).sum(1), b.count(sel_p.sum(), sim.dtype))
    tn = b.share(((sim - margin_minus) * sel_n).sum(1), b.count(sel_n.sum(), sim.dtype))
    return b.finish(lambda_plus * tp + lambda_minus * tn)
