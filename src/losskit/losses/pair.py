"""Pair-based metric learning: contrastive, triplet, Multi-Similarity and the TCM regulariser.

A pair loss module is its functional form plus a registration:
:class:`PairLoss` validates the hyperparameters once at construction (with
the functional's own ``check_*_hparams``) and calls the functional with
``self.hparams`` (captured by the registry from the ``__init__`` signature).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from losskit.core.checks import check_reduction
from losskit.core.context import PairReference
from losskit.core.registry import Paper, register
from losskit.functional import multi_similarity as _ms
from losskit.functional import pair as _pair

__all__ = ["PairLoss", "ContrastiveLoss", "TripletLoss", "MultiSimilarityLoss", "TCMLoss"]


class PairLoss(nn.Module):
    """Base of the pair losses: ``loss(embeddings, labels, sample_weight=None, *, reference=None)``.

    ``reference`` (a :class:`losskit.core.PairReference`) scores the anchors
    against another set; cross-batch memory and the distributed wrapper pass
    it.  A subclass names its ``functional`` (called with its hyperparameters
    by keyword) and ``check_hparams`` (the functional's validator, run once
    here at construction); its ``__init__`` is the signature and
    ``super().__init__(reduction)``.
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

    def forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None, *,
                reference: PairReference | None = None) -> Tensor:
        return type(self).functional(embeddings, labels, reduction=self.reduction, sample_weight=sample_weight,
                                     reference=reference, **self._functional_hparams())

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
        return super().forward(embeddings, labels, sample_weight, reference=reference)

    def forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None, *,
                reference: PairReference | None = None) -> Tensor:
        reg = self.regularizer(embeddings, labels, sample_weight, reference=reference)
        if self.base is None:
            return reg
        if isinstance(self.base, PairLoss):
            return self.base(embeddings, labels, sample_weight, reference=reference) + reg
        if reference is not None:
            raise ValueError("base: a plain nn.Module base cannot score against a reference; use a losskit pair loss")
        return self.base(embeddings, labels, sample_weight) + reg
