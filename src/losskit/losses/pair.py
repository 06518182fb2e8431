"""Pair-based metric learning: contrastive, triplet, Multi-Similarity and the TCM regulariser."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from losskit._checks import check_reduction
from losskit.functional.multi_similarity import multi_similarity_loss
from losskit.functional.pair import PAIR_AVERAGES, contrastive_loss, tcm_regularizer, triplet_loss
from losskit.mining.triplet import TRIPLET_MINING
from losskit.registry import Paper, register

__all__ = ["PairLoss", "ContrastiveLoss", "TripletLoss", "MultiSimilarityLoss", "TCMLoss"]


class PairLoss(nn.Module):
    """Base of the pair losses: ``loss(embeddings, labels, sample_weight=None)``.

    ``compute(...)`` is the same with the extra keywords that cross-batch
    memory and the distributed wrapper use: ``ref_embeddings``,
    ``ref_labels``, ``self_index``, ``batch_size``, ``count_reduce`` and a
    ``reduction`` override.
    """

    reduction: str

    def forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        return self.compute(embeddings, labels, sample_weight)

    def compute(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None, *,
                ref_embeddings: Tensor | None = None, ref_labels: Tensor | None = None,
                self_index: Tensor | None = None, batch_size: int | None = None,
                count_reduce=None, reduction: str | None = None) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        spec = getattr(self, "_hp", {})
        return ", ".join(f"{k}={v!r}" for k, v in spec.items())


def _chk_pos(name, v, strict=False):
    if (v <= 0) if strict else (v < 0):
        raise ValueError(f"{name}: expected a value {'>' if strict else '>='} 0, got {v}")


@register("contrastive", family="pair", task="embedding",
          paper=Paper("Dimensionality Reduction by Learning an Invariant Mapping", 2006, None),
          summary="Contrastive loss: pull positive pairs within pos_margin, push negatives beyond neg_margin.")
class ContrastiveLoss(PairLoss):
    """Contrastive loss (Hadsell, Chopra, LeCun, CVPR 2006) with PML's two margins.

    Positives ``[d - pos_margin]_+``, negatives ``[neg_margin - d]_+`` on L2
    distances of normalised embeddings; ``squared_hinge=True`` gives the
    paper's ``1/2 [.]_+^2``.  See ``losskit.functional.pair.contrastive_loss``.
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, distance: str = "euclidean",
                 normalize: bool = True, squared_hinge: bool = False, pair_average: str = "nonzero",
                 reduction: str = "mean"):
        super().__init__()
        if pair_average not in PAIR_AVERAGES:
            raise ValueError(f"pair_average: expected one of {PAIR_AVERAGES}, got {pair_average!r}")
        self.reduction = check_reduction(reduction)
        self._hp = dict(pos_margin=pos_margin, neg_margin=neg_margin, distance=distance, normalize=normalize,
                        squared_hinge=squared_hinge, pair_average=pair_average)

    def compute(self, embeddings, labels, sample_weight=None, *, ref_embeddings=None, ref_labels=None,
                self_index=None, batch_size=None, count_reduce=None, reduction=None):
        hp = self._hp
        return contrastive_loss(embeddings, labels, hp["pos_margin"], hp["neg_margin"], reduction or self.reduction,
                                sample_weight, distance=hp["distance"], normalize=hp["normalize"],
                                squared_hinge=hp["squared_hinge"], pair_average=hp["pair_average"],
                                ref_embeddings=ref_embeddings, ref_labels=ref_labels, self_index=self_index,
                                batch_size=batch_size, count_reduce=count_reduce)


@register("triplet", family="pair", task="embedding",
          paper=Paper("FaceNet: A Unified Embedding for Face Recognition and Clustering", 2015, "1503.03832"),
          summary="Triplet loss [d(a,p) - d(a,n) + margin]_+ with all, batch-hard or semi-hard mining.")
class TripletLoss(PairLoss):
    """FaceNet's triplet loss on squared L2 distances of normalised embeddings.

    ``mining``: ``all``, ``hard`` (batch-hard) or ``semi-hard`` (FaceNet).
    """

    def __init__(self, margin: float = 0.2, mining: str = "semi-hard", distance: str = "squared-euclidean",
                 normalize: bool = True, smooth: bool = False, pair_average: str = "nonzero",
                 reduction: str = "mean"):
        super().__init__()
        if mining not in TRIPLET_MINING:
            raise ValueError(f"mining: expected one of {TRIPLET_MINING}, got {mining!r}")
        if pair_average not in PAIR_AVERAGES:
            raise ValueError(f"pair_average: expected one of {PAIR_AVERAGES}, got {pair_average!r}")
        self.reduction = check_reduction(reduction)
        self._hp = dict(margin=margin, mining=mining, distance=distance, normalize=normalize, smooth=smooth,
                        pair_average=pair_average)

    def compute(self, embeddings, labels, sample_weight=None, *, ref_embeddings=None, ref_labels=None,
                self_index=None, batch_size=None, count_reduce=None, reduction=None):
        hp = self._hp
        return triplet_loss(embeddings, labels, hp["margin"], hp["mining"], reduction or self.reduction,
                            sample_weight, distance=hp["distance"], normalize=hp["normalize"], smooth=hp["smooth"],
                            pair_average=hp["pair_average"], ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                            self_index=self_index, batch_size=batch_size, count_reduce=count_reduce)


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
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, lam: float = 1.0, epsilon: float = 0.1,
                 mining: bool = True, distance: str = "cosine", official_positive_filter: bool = False,
                 chunk_size: int | None = None, reduction: str = "mean"):
        super().__init__()
        _chk_pos("alpha", alpha, True)
        _chk_pos("beta", beta, True)
        _chk_pos("epsilon", epsilon)
        if distance not in ("cosine", "dot"):
            raise ValueError(f"distance: expected 'cosine' or 'dot' (a similarity), got {distance!r}")
        self.reduction = check_reduction(reduction)
        self._hp = dict(alpha=alpha, beta=beta, lam=lam, epsilon=epsilon, mining=mining, distance=distance,
                        official_positive_filter=official_positive_filter, chunk_size=chunk_size)

    def compute(self, embeddings, labels, sample_weight=None, *, ref_embeddings=None, ref_labels=None,
                self_index=None, batch_size=None, count_reduce=None, reduction=None):
        hp = self._hp
        return multi_similarity_loss(embeddings, labels, hp["alpha"], hp["beta"], hp["lam"], hp["epsilon"],
                                     reduction or self.reduction, sample_weight, distance=hp["distance"],
                                     mining=hp["mining"], official_positive_filter=hp["official_positive_filter"],
                                     chunk_size=hp["chunk_size"], ref_embeddings=ref_embeddings,
                                     ref_labels=ref_labels, self_index=self_index, batch_size=batch_size)


@register("tcm", family="pair", task="embedding",
          paper=Paper("Threshold-Consistent Margin Loss for Open-World Deep Metric Learning", 2024, "2307.04047"),
          summary="Threshold-Consistent Margin regulariser added to a base loss (default Multi-Similarity).")
class TCMLoss(PairLoss):
    """``base loss + TCM`` (Zhang et al., ICLR 2024).

    ``base``: a registry name (built with ``base_kwargs`` and this
    ``reduction``), an ``nn.Module`` called as ``base(embeddings, labels,
    sample_weight)``, or None for the regulariser alone.  TCM hinges cosine
    similarities of positive pairs below ``margin_plus`` and of negative
    pairs above ``margin_minus`` (defaults as PML: lambda+- 1, m+ 0.9, m- 0.5).
    """

    def __init__(self, base: Any = "multi-similarity", base_kwargs: dict | None = None, lambda_plus: float = 1.0,
                 lambda_minus: float = 1.0, margin_plus: float = 0.9, margin_minus: float = 0.5,
                 reduction: str = "mean"):
        super().__init__()
        self.reduction = check_reduction(reduction)
        _chk_pos("lambda_plus", lambda_plus)
        _chk_pos("lambda_minus", lambda_minus)
        for name, v in (("margin_plus", margin_plus), ("margin_minus", margin_minus)):
            if not -1.0 <= v <= 1.0:
                raise ValueError(f"{name}: expected a cosine margin in [-1, 1], got {v}")
        if isinstance(base, str):
            from losskit import registry

            if base == "tcm":
                raise ValueError("base: 'tcm' cannot wrap itself")
            base = registry.get(base, **{"reduction": reduction, **(base_kwargs or {})})
        elif base is not None and not isinstance(base, nn.Module):
            raise TypeError(f"base: expected a registry name, an nn.Module or None, got {type(base).__name__}")
        elif base_kwargs:
            raise ValueError("base_kwargs: only used when base is a registry name")
        self.base = base
        self._hp = dict(lambda_plus=lambda_plus, lambda_minus=lambda_minus, margin_plus=margin_plus,
                        margin_minus=margin_minus)

    def regularizer(self, embeddings, labels, sample_weight=None, **kw):
        hp = self._hp
        red = kw.pop("reduction", None) or self.reduction
        return tcm_regularizer(embeddings, labels, hp["lambda_plus"], hp["lambda_minus"], hp["margin_plus"],
                               hp["margin_minus"], red, sample_weight, **kw)

    def compute(self, embeddings, labels, sample_weight=None, *, ref_embeddings=None, ref_labels=None,
                self_index=None, batch_size=None, count_reduce=None, reduction=None):
        kw = dict(ref_embeddings=ref_embeddings, ref_labels=ref_labels, self_index=self_index,
                  batch_size=batch_size, count_reduce=count_reduce, reduction=reduction or self.reduction)
        reg = self.regularizer(embeddings, labels, sample_weight, **dict(kw))
        if self.base is None:
            return reg
        if isinstance(self.base, PairLoss):
            return self.base.compute(embeddings, labels, sample_weight, **kw) + reg
        if any(v is not None for k, v in kw.items() if k != "reduction"):
            raise ValueError("base: a plain nn.Module base cannot score against references; use a losskit pair loss")
        return self.base(embeddings, labels, sample_weight) + reg
