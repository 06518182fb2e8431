"""Pair-based metric learning: contrastive, triplet, Multi-Similarity and the TCM regulariser.

A pair loss module is its functional form plus a registration:
:class:`PairLoss` validates the hyperparameters once at construction (with
the functional's own ``check_*_hparams``) and calls the functional with
``self.hparams`` (captured by the registry from the ``__init__`` signature).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from losskit.core.checks import check_reduction
from losskit.core.context import PairReference
from losskit.core.registry import Paper, register
from losskit.functional import multi_similarity as _ms
from losskit.functional import pair as _pair

__all__ = ["PairLoss", "ContrastiveLoss", "TripletLoss", "MultiSimilarityLoss", "TCMLoss"]


def _index_tuple(indices, B: int, M: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A miner's output as ``(a1, p, a2, n)``: pairs as they are, triplets ``(a, p, n)`` as the
    pairs ``(a, p)`` and ``(a, n)`` (PML's ``convert_to_pairs``); checked against ``B`` anchors
    and ``M`` reference rows."""
    if not isinstance(indices, (tuple, list)) or len(indices) not in (3, 4):
        raise TypeError(f"indices_tuple: expected a miner's (anchor, positive, negative) triplets or "
                        f"(anchor1, positive, anchor2, negative) pairs, got {type(indices).__name__}"
                        + (f" of length {len(indices)}" if isinstance(indices, (tuple, list)) else ""))
    t = []
    for i, x in enumerate(indices):
        if not isinstance(x, Tensor) or x.dim() != 1 or x.is_floating_point() or x.dtype == torch.bool:
            raise TypeError(f"indices_tuple[{i}]: expected a 1-D integer tensor of indices, got "
                            f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        t.append(x.long())
    a1, p, a2, n = (t[0], t[1], t[0], t[2]) if len(t) == 3 else t
    for name, (x, y) in (("anchor/positive", (a1, p)), ("anchor/negative", (a2, n))):
        if x.shape != y.shape:
            raise ValueError(f"indices_tuple: {name} indices differ in length ({x.numel()} vs {y.numel()})")
    for name, x, top in (("anchor", torch.cat([a1, a2]), B), ("positive/negative", torch.cat([p, n]), M)):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= top):
            raise ValueError(f"indices_tuple: {name} indices must be in [0, {top - 1}], got "
                             f"[{int(x.min())}, {int(x.max())}]")
    return a1, p, a2, n


class PairLoss(nn.Module):
    """Base of the pair losses: ``loss(embeddings, labels, sample_weight=None, *, reference=None)``.

    ``reference`` (a :class:`losskit.core.PairReference`) scores the anchors
    against another set; cross-batch memory and the distributed wrapper pass
    it.  A subclass names its ``functional`` (called with its hyperparameters
    by keyword) and ``check_hparams`` (the functional's validator, run once
    here at construction); its ``__init__`` is the signature and
    ``super().__init__(reduction)``.

    The pytorch-metric-learning call shapes are accepted too:

    * ``loss(embeddings, labels, miner(embeddings, labels))`` (or
      ``indices_tuple=``): a miner's ``(a, p, n)`` triplets or ``(a1, p, a2, n)``
      pairs (losskit's miners return the same).  Each anchor is then scored
      against its mined partners only (triplets count as the pairs ``(a, p)``
      and ``(a, n)``; a triplet loss forms every positive x negative among an
      anchor's partners, as PML's ``convert_to_triplets``); a pair average is
      taken per anchor, then ``reduction`` over all anchors (anchors without a
      mined pair add 0).  PML averages over all mined pairs at once, so the
      pair-averaged losses (contrastive, triplet, TCM) differ from PML's value
      by that weighting; Multi-Similarity, an average of per-anchor terms, does
      not.  It loops over the mined anchors in Python: for speed, prefer the
      loss's own mining.
    * ``ref_emb=``/``ref_labels=``: score the anchors against another set (PML's
      ``ref_emb``); the same as ``reference=PairReference(ref_emb, ref_labels)``.
    """

    functional: Callable[..., Tensor]
    check_hparams: Callable[..., Any]

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = check_reduction(reduction)
        type(self).check_hparams(**self._functional_hparams())

    def _functional_hparams(self) -> dict[str, Any]:
        hp = getattr(self, "hparams", None)
        if hp is None:
            raise TypeError(f"{type(self).__name__}: a PairLoss must be registered (losskit.register) so that its "
                            "hyperparameters are captured")
        return {k: v for k, v in hp.items() if k != "reduction"}

    def forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | tuple | None = None, *,
                reference: PairReference | None = None, indices_tuple: tuple | None = None,
                ref_emb: Tensor | None = None, ref_labels: Tensor | None = None) -> Tensor:
        if isinstance(sample_weight, (tuple, list)):  # PML: loss(embeddings, labels, indices_tuple)
            if indices_tuple is not None:
                raise TypeError("indices_tuple: given twice (third argument and indices_tuple=)")
            sample_weight, indices_tuple = None, sample_weight
        if ref_emb is not None or ref_labels is not None:
            if reference is not None:
                raise TypeError("ref_emb/ref_labels and reference: give one of them")
            if ref_emb is None or ref_labels is None:
                raise TypeError(f"{'ref_labels' if ref_labels is None else 'ref_emb'}: ref_emb and ref_labels "
                                "go together (PML's ref_labels default to labels only when ref_emb is the batch)")
            reference = PairReference(ref_emb, ref_labels)
        if indices_tuple is None:
            return self._forward(embeddings, labels, sample_weight, reference=reference)
        return self._mined(embeddings, labels, sample_weight, reference, indices_tuple)

    def _forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None, *,
                 reference: PairReference | None = None) -> Tensor:
        return type(self).functional(embeddings, labels, reduction=self.reduction, sample_weight=sample_weight,
                                     reference=reference, **self._functional_hparams())

    def _mined(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None,
               reference: PairReference | None, indices) -> Tensor:
        """Each mined anchor against its mined partners (a reference of those rows), then reduced."""
        from losskit.core.reduction import reduce_loss
        from losskit.mining.pairs import resolve_reference

        ref = resolve_reference(embeddings, labels, reference)
        if ref.count_reduce is not None:
            raise ValueError("indices_tuple: mined pairs cannot be combined with a distributed reference")
        B = embeddings.shape[0]
        a1, p, a2, n = _index_tuple(indices, B, ref.embeddings.shape[0])
        a1, p, a2, n = (x.to(embeddings.device) for x in (a1, p, a2, n))
        anchors = torch.cat([a1, a2])
        partners = torch.cat([p, n])
        per = [embeddings.new_zeros(()) for _ in range(B)]
        minus_one = torch.full((1,), -1, dtype=torch.long, device=embeddings.device)
        for a in torch.unique(anchors).tolist():
            cols = torch.unique(partners[anchors == a])
            sub = PairReference(ref.embeddings[cols], ref.labels[cols], self_index=minus_one, batch_size=1)
            per[a] = self._with_reduction("sum", embeddings[a:a + 1], labels[a:a + 1], sub)
        out = torch.stack(per).to(embeddings.dtype) + 0 * embeddings.sum()  # connected even when nothing is mined
        return reduce_loss(out, self.reduction, sample_weight)

    def _with_reduction(self, reduction: str, embeddings: Tensor, labels: Tensor, reference) -> Tensor:
        kept = self.reduction
        self.reduction = reduction
        try:
            return self._forward(embeddings, labels, None, reference=reference)
        finally:
            self.reduction = kept

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in getattr(self, "hparams", {}).items() if not isinstance(v, nn.Module))


@register("contrastive", family="pair", task="embedding",
          paper=Paper("Dimensionality Reduction by Learning an Invariant Mapping", 2006, None),
          summary="Contrastive loss: pull positive pairs within pos_margin, push negatives beyond neg_margin.")
class ContrastiveLoss(PairLoss):
    """Contrastive loss (Hadsell, Chopra, LeCun, CVPR 2006) with PML's two margins.

    Positives ``[d - pos_margin]_+``, negatives ``[neg_margin - d]_+`` on L2
    distances of normalised embeddings; ``squared_hinge=True`` gives the
    paper's ``1/2 [.]_+^2``.  See ``losskit.functional.pair.contrastive_loss``.

    pytorch-metric-learning's ``ContrastiveLoss`` has the same defaults (``pos_margin=0``,
    ``neg_margin=1``, L2 distance of normalised embeddings, averaged over nonzero pairs).
    """

    functional = staticmethod(_pair.contrastive_loss)
    check_hparams = staticmethod(_pair.check_contrastive_hparams)

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, distance: str = "euclidean",
                 normalize: bool = True, squared_hinge: bool = False, pair_average: str = "nonzero",
                 reduction: str = "mean"):
        super().__init__(reduction)


@register("triplet", family="pair", task="embedding",
          paper=Paper("FaceNet: A Unified Embedding for Face Recognition and Clustering", 2015, "1503.03832"),
          summary="Triplet loss [d(a,p) - d(a,n) + margin]_+ with all, batch-hard or semi-hard mining.")
class TripletLoss(PairLoss):
    """FaceNet's triplet loss on squared L2 distances of normalised embeddings.

    ``mining``: ``all``, ``hard`` (batch-hard) or ``semi-hard`` (FaceNet).

    Differs from pytorch-metric-learning's ``TripletMarginLoss`` by default: PML has
    ``margin=0.05`` (losskit 0.2, FaceNet's), every triplet (losskit: semi-hard mining) and
    plain L2 distances (losskit: squared, as FaceNet); ``TripletLoss(margin=0.05,
    mining="all", distance="euclidean")`` is PML's.
    """

    functional = staticmethod(_pair.triplet_loss)
    check_hparams = staticmethod(_pair.check_triplet_hparams)

    def __init__(self, margin: float = 0.2, mining: str = "semi-hard", distance: str = "squared-euclidean",
                 normalize: bool = True, smooth: bool = False, pair_average: str = "nonzero",
                 reduction: str = "mean"):
        super().__init__(reduction)


@register("multi-similarity", family="pair", task="embedding",
          paper=Paper("Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning", 2019,
                      "1904.06627"),
          summary="Multi-Similarity loss: MS mining and soft pair weighting; chunked, memory O(B x chunk).")
class MultiSimilarityLoss(PairLoss):
    """Multi-Similarity loss (Wang et al., CVPR 2019) with the paper's mining.

    Defaults are the paper's (alpha 2, beta 50, lambda 1, epsilon 0.1); the
    official code uses alpha 2, beta 40, lambda 0.5, epsilon 0.1 and PML
    alpha 2, beta 50, base 0.5.  ``chunk_size`` rows of the similarity matrix
    are live at a time (None: about 4M values per block).

    Differs from pytorch-metric-learning's ``MultiSimilarityLoss`` by default: PML's
    ``base=0.5`` is losskit's ``lam`` (1 here, the paper's), and PML's loss does not mine (its
    ``MultiSimilarityMiner`` does, with ``epsilon=0.1``); ``MultiSimilarityLoss(lam=0.5,
    mining=False)`` is PML's loss, and with the miner's pairs passed as the third argument it is
    PML's ``loss(emb, labels, miner(emb, labels))``.
    """

    functional = staticmethod(_ms.multi_similarity_loss)
    check_hparams = staticmethod(_ms.check_multi_similarity_hparams)

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, lam: float = 1.0, epsilon: float = 0.1,
                 mining: bool = True, distance: str = "cosine", official_positive_filter: bool = False,
                 chunk_size: int | None = None, reduction: str = "mean"):
        super().__init__(reduction)


_TCM_BASE = ("base", "base_kwargs")


@register("tcm", family="pair", task="embedding",
          paper=Paper("Threshold-Consistent Margin Loss for Open-World Deep Metric Learning", 2024, "2307.04047"),
          summary="Threshold-Consistent Margin regulariser added to a base loss (default Multi-Similarity).")
class TCMLoss(PairLoss):
    """``base loss + TCM`` (Zhang et al., ICLR 2024).

    ``base``: a registry name (built with ``base_kwargs`` and this
    ``reduction``), an ``nn.Module`` called as ``base(embeddings, labels,
    sample_weight)`` (with the same ``reduction``), or None for the
    regulariser alone.  TCM hinges cosine similarities of positive pairs
    below ``margin_plus`` and of negative pairs above ``margin_minus``
    (defaults as PML: lambda+- 1, m+ 0.9, m- 0.5).

    Differs from pytorch-metric-learning's ``ThresholdConsistentMarginLoss`` by default: PML's
    is the regulariser alone (``base=None`` here); losskit adds it to Multi-Similarity, as the
    paper trains.
    """

    functional = staticmethod(_pair.tcm_regularizer)
    check_hparams = staticmethod(_pair.check_tcm_hparams)

    def __init__(self, base: Any = "multi-similarity", base_kwargs: dict | None = None, lambda_plus: float = 1.0,
                 lambda_minus: float = 1.0, margin_plus: float = 0.9, margin_minus: float = 0.5,
                 reduction: str = "mean"):
        super().__init__(reduction)
        if isinstance(base, str):
            from losskit.core import registry

            if base == "tcm":
                raise ValueError("base: 'tcm' cannot wrap itself")
            base = registry.get(base, **{"reduction": reduction, **(base_kwargs or {})})
        elif base is not None and not isinstance(base, nn.Module):
            raise TypeError(f"base: expected a registry name, an nn.Module or None, got {type(base).__name__}")
        elif base_kwargs:
            raise ValueError("base_kwargs: only used when base is a registry name")
        if base is not None and getattr(base, "reduction", reduction) != reduction:
            raise ValueError(f"base: its reduction {base.reduction!r} differs from reduction={reduction!r}")
        self.base = base

    def _functional_hparams(self) -> dict[str, Any]:
        return {k: v for k, v in super()._functional_hparams().items() if k not in _TCM_BASE}

    def regularizer(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None, *,
                    reference: PairReference | None = None) -> Tensor:
        """The TCM term alone."""
        return super()._forward(embeddings, labels, sample_weight, reference=reference)

    def _with_reduction(self, reduction, embeddings, labels, reference):
        kept = self.base.reduction if isinstance(self.base, PairLoss) else None
        if kept is not None:
            self.base.reduction = reduction
        try:
            return super()._with_reduction(reduction, embeddings, labels, reference)
        finally:
            if kept is not None:
                self.base.reduction = kept

    def _forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None, *,
                 reference: PairReference | None = None) -> Tensor:
        reg = self.regularizer(embeddings, labels, sample_weight, reference=reference)
        if self.base is None:
            return reg
        if isinstance(self.base, PairLoss):
            return self.base._forward(embeddings, labels, sample_weight, reference=reference) + reg
        if reference is not None:
            raise ValueError("base: a plain nn.Module base cannot score against a reference; use a losskit pair loss")
        return self.base(embeddings, labels, sample_weight) + reg
