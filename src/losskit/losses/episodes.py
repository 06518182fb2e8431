"""Episode losses for few-shot metric learning: Proto-Triplet, ICNN, GPAM.

Each works on an ordinary class-balanced batch, ``loss(embeddings, labels,
sample_weight=None)``: every class's rows are split into support (first
``ceil(n_c / 2)`` rows in batch order) and query (the rest), or pass
``support_mask=`` (bool ``[B]``) to choose.  ``reduction='none'`` gives
``[B]`` aligned with the rows (support rows 0), ``'mean'`` divides by the
number of query rows (ICNN: anchor rows).  Hyperparameters are validated once,
here at construction.  See :mod:`losskit.functional.episodes` and docs/pair.md
(episode losses).
"""

from __future__ import annotations

from torch import Tensor, nn

from losskit.core.checks import check_reduction
from losskit.core.registry import Paper, register
from losskit.distances import BaseDistance
from losskit.functional.episodes import (
    _gpam_hparams,
    _gpam_loss,
    _gpam_predict,
    _icnn_extra_hparams,
    _icnn_hparams,
    _icnn_loss,
    _icnn_score,
    _proto_triplet,
    _proto_triplet_hparams,
)

__all__ = ["ProtoTripletLoss", "ICNNLoss", "GPAMLoss"]

SUSANA = Paper(
    "SuSana Distancia is all you need: Enforcing class separability in metric learning via two "
    "novel distance-based loss functions for few-shot image classification",
    2023,
    "2305.09062",
)

GPAM = Paper("Few-shot Open Relation Extraction with Gaussian Prototype and Adaptive Margin", 2024, "2410.20320")


class _EpisodeLoss(nn.Module):
    """The episode losses' shared repr: the captured hyperparameters (``self.hparams``)."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


@register("proto-triplet", family="pair", task="embedding", paper=SUSANA,
          summary="Triplet hinge between a query, its class prototype and the other prototypes "
                  "(support/query split inside the batch).")
class ProtoTripletLoss(_EpisodeLoss):
    """Proto-Triplet loss: ``[d(q, c_y) - d(q, c_k) + margin]_+`` against the
    nearest other prototype (``negatives='hardest'``, the default: the authors'
    code, maumruiz/FSL-Loss ``algorithms/icnn_loss.py``) or averaged over the
    other prototypes ``k`` (``negatives='all'``).  Margin 0.5 is the authors'
    code default.  ``distance``: a name of the distance vocabulary
    (:mod:`losskit.distances`) or a distance object; ``self.distance`` is the
    resolved object."""

    def __init__(self, margin: float = 0.5, negatives: str = "hardest", distance: str | BaseDistance = "euclidean",
                 reduction: str = "mean"):
        super().__init__()
        self.margin, self.negatives, self.distance = _proto_triplet_hparams(margin, negatives, distance)
        self.reduction = check_reduction(reduction)

    def forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None,
                support_mask: Tensor | None = None) -> Tensor:
        return _proto_triplet(embeddings, labels, self.margin, self.negatives, self.distance,
                              self.reduction, sample_weight, support_mask)



@register("icnn", family="pair", task="embedding", paper=SUSANA,
          summary="-log ICNN: the inter/intra-class nearest-neighbour score (k = 4), as the "
                  "authors' code trains it (soft relaxation and 1 - score as options).")
class ICNNLoss(_EpisodeLoss):
    """ICNN loss over the ``k`` nearest neighbours of every anchor.

    Defaults as the authors' released code trains it (maumruiz/FSL-Loss,
    ``algorithms/icnn_loss.py``: ``modified_score`` and ``get_icnn_loss``):
    hard neighbours (``tau=0``), score ``(lambda + gamma) / 2``
    (``omega=False``), the nearest other-class row among the ``k + 1``
    nearest (``nn_candidates=None``), loss ``-log(score)`` (``log=True``).
    Options: ``tau > 0`` soft neighbour membership (our relaxation),
    ``omega=True`` the ``(lambda + gamma + omega) / 3`` score, ``log=False``
    the loss ``1 - score``, ``nn_candidates`` (e.g. ``shot + query`` as the
    code's ``fullicnn`` passes, or ``>= B - 1`` for the whole batch).
    :meth:`score` returns the exact (hard) score."""

    def __init__(self, k: int = 4, tau: float = 0.0, omega: bool = False, anchors: str = "all",
                 log: bool = True, nn_candidates: int | None = None, reduction: str = "mean"):
        super().__init__()
        self.k, self.tau, self.omega, self.anchors = _icnn_hparams(k, tau, omega, anchors)
        self.log, self.nn_candidates = _icnn_extra_hparams(log, nn_candidates)
        self.reduction = check_reduction(reduction)

    def forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None,
                support_mask: Tensor | None = None) -> Tensor:
        return _icnn_loss(embeddings, labels, self.k, self.tau, self.omega, self.anchors,
                          self.reduction, sample_weight, support_mask, self.log, self.nn_candidates)

    def score(self, embeddings: Tensor, labels: Tensor, support_mask: Tensor | None = None) -> Tensor:
        """The exact ICNN score in [0, 1] (hard neighbours); NaN when no anchor counts."""
        return _icnn_score(embeddings, labels, self.k, 0.0, self.omega, self.anchors, support_mask,
                           self.nn_candidates)



@register("gpam", family="pair", task="embedding", paper=GPAM,
          summary="Gaussian prototypes (diagonal, shrunk covariance) with class ranges and "
                  "none-of-the-above (label -1) support.")
class GPAMLoss(_EpisodeLoss):
    """GPAM boundary loss ``[d_y - r_y + m]_+ + sum_{k != y} [r_k + m - d_k]_+``
    with Gaussian class distance ``d_k`` and range ``r_k``; rows labelled ``-1``
    (none of the above / negatives) use only the second term.  :meth:`predict`
    returns ``-1`` when the nearest class is out of range."""

    def __init__(self, margin: float = 0.5, radius: float = 1.0, shrinkage: float = 0.5,
                 min_var: float = 1e-4, reduction: str = "mean"):
        super().__init__()
        self.margin, self.radius, self.shrinkage, self.min_var = _gpam_hparams(margin, radius, shrinkage, min_var)
        self.reduction = check_reduction(reduction)

    def forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None,
                support_mask: Tensor | None = None) -> Tensor:
        return _gpam_loss(embeddings, labels, self.margin, self.radius, self.shrinkage, self.min_var,
                          self.reduction, sample_weight, support_mask)

    def predict(self, queries: Tensor, support: Tensor, support_labels: Tensor) -> Tensor:
        """Class id per query, or -1 (none of the above)."""
        return _gpam_predict(queries, support, support_labels, self.radius, self.shrinkage, self.min_var)

