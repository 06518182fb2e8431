"""Margin classification heads (family "margin"): NormFace, ArcFace, CosFace,
combined margin, ElasticFace, CFCD's MadaCos and UNPG.

Each module *is* a :class:`losskit.heads.MarginHead`: it owns ``weight``
(``[C, D]``, normalised on the fly) and takes ``loss(embeddings, labels,
sample_weight=None)``.  ``head`` picks the softmax implementation
(``'auto' | 'dense' | 'chunked' | 'fused' | 'sampled' | 'sharded'``); all give the same
numbers except ``'sampled'`` (Partial FC, an approximation by design).
Margins are in radians (ArcFace) or cosine units (CosFace).  See
docs/margin.md for formulas, defaults and deviations from official code.
"""

from __future__ import annotations

import torch

from losskit.core.checks import check_choice
from losskit.core.registry import Paper, register
from losskit.heads.classifier import MarginHead
from losskit.heads.margin_spec import (ArcMargin, CFCDMargin, CombinedMargin, CosMargin, ElasticMargin,
                                       MarginPolicy, UNPGMargin)

ARCFACE = Paper("ArcFace: Additive Angular Margin Loss for Deep Face Recognition", 2019, "1801.07698")
COSFACE = Paper("CosFace: Large Margin Cosine Loss for Deep Face Recognition", 2018, "1801.09414")
ELASTIC = Paper("ElasticFace: Elastic Margin Loss for Deep Face Recognition", 2022, "2109.09416")
NORMFACE = Paper("NormFace: L2 Hypersphere Embedding for Face Verification", 2017, "1704.06369")
CFCD = Paper("Coarse-to-Fine: Learning Compact Discriminative Representation for Single-Stage Image Retrieval",
             2023, "2308.04008")
UNPG = Paper("Unified Negative Pair Generation toward Well-discriminative Feature Space for Face Recognition",
             2022, "2203.11593")

__all__ = ["NormalizedSoftmaxLoss", "ArcFaceLoss", "CosFaceLoss", "CombinedMarginLoss", "ElasticArcFaceLoss",
           "ElasticCosFaceLoss", "CFCDLoss", "UNPGLoss"]

#: the head options every margin loss takes (read from ``self.hparams``)
HEAD_OPTIONS = ("head", "chunk_size", "sample_rate", "process_group", "reduction")


class _MarginLoss(MarginHead):
    """A registered margin loss: its signature (read once by the registry and
    captured in ``self.hparams``) is the policy's hyperparameters plus
    :data:`HEAD_OPTIONS`; ``policy_from(self.hparams)`` builds the policy."""

    def __init__(self, num_classes: int, embedding_dim: int):
        hp = self.hparams
        super().__init__(num_classes, embedding_dim, self.policy_from(hp),
                         **{k: hp[k] for k in HEAD_OPTIONS if k in hp})

    def policy_from(self, hp: dict) -> MarginPolicy:
        raise NotImplementedError


@register("normalized-softmax", family="margin", task="embedding", paper=NORMFACE,
          summary="Cosine softmax s*cos(theta) on normalised embeddings and class centres (no margin).")
class NormalizedSoftmaxLoss(_MarginLoss):
    """NormFace: cross-entropy on ``scale * cos(theta)``.

    Differs from pytorch-metric-learning's ``NormalizedSoftmaxLoss`` by default: its
    ``temperature=0.05`` is a scale of 20; losskit's ``scale`` is 64.
    """

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, reduction: str = "mean",
                 head: str = "auto", chunk_size: int | None = None, sample_rate: float = 0.1,
                 process_group=None):
        super().__init__(num_classes, embedding_dim)

    def policy_from(self, hp):
        return MarginPolicy(hp["scale"])


@register("arcface", family="margin", task="embedding", paper=ARCFACE,
          summary="Additive angular margin: target logit s*cos(theta+m), m in radians.")
class ArcFaceLoss(_MarginLoss):
    """ArcFace: the target logit is ``scale * cos(theta + margin)``, ``margin`` in radians.

    Against pytorch-metric-learning's ``ArcFaceLoss``: its ``margin=28.6`` is in degrees
    (0.499 rad, losskit 0.5 rad), its ``scale=64`` is the same, and it takes
    ``embedding_size`` where losskit takes ``embedding_dim``.
    """

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, margin: float = 0.5,
                 easy_margin: bool = False, straight_through: bool = False, reduction: str = "mean",
                 head: str = "auto", chunk_size: int | None = None, sample_rate: float = 0.1,
                 process_group=None):
        super().__init__(num_classes, embedding_dim)

    def policy_from(self, hp):
        return ArcMargin(hp["scale"], hp["margin"], hp["easy_margin"], hp["straight_through"])


@register("cosface", family="margin", task="embedding", paper=COSFACE,
          summary="Large margin cosine loss: target logit s*(cos(theta)-m).")
class CosFaceLoss(_MarginLoss):
    """CosFace: the target logit is ``scale * (cos(theta) - margin)``.

    pytorch-metric-learning's ``CosFaceLoss`` has the same defaults (``margin=0.35``, ``scale=64``).
    """

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, margin: float = 0.35,
                 reduction: str = "mean", head: str = "auto", chunk_size: int | None = None,
                 sample_rate: float = 0.1, process_group=None):
        super().__init__(num_classes, embedding_dim)

    def policy_from(self, hp):
        return CosMargin(hp["scale"], hp["margin"])


@register("combined-margin", family="margin", task="embedding", paper=ARCFACE,
          summary="insightface's combined margin: target logit s*(cos(m1*theta+m2)-m3).")
class CombinedMarginLoss(_MarginLoss):
    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, m1: float = 1.0,
                 m2: float = 0.3, m3: float = 0.2, reduction: str = "mean", head: str = "auto",
                 chunk_size: int | None = None, sample_rate: float = 0.1, process_group=None):
        super().__init__(num_classes, embedding_dim)

    def policy_from(self, hp):
        return CombinedMargin(hp["scale"], hp["m1"], hp["m2"], hp["m3"])


class _ElasticLoss(_MarginLoss):
    """``std=None`` means the paper's value: 0.05, or ``PLUS_STD`` with ``plus``."""

    KIND = "arc"
    PLUS_STD = 0.0175

    def policy_from(self, hp):
        std = (self.PLUS_STD if hp["plus"] else 0.05) if hp["std"] is None else hp["std"]
        return ElasticMargin(self.KIND, hp["scale"], hp["mean"], std, hp["plus"], hp["legacy_permutation"],
                             hp["generator"])


@register("elastic-arcface", family="margin", task="embedding", paper=ELASTIC,
          summary="ArcFace with a margin drawn per sample from N(mean, std^2); plus=True gives larger "
                  "margins to harder samples.")
class ElasticArcFaceLoss(_ElasticLoss):
    """``std=None`` means the paper's value: 0.05, or 0.0175 with ``plus``."""

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, mean: float = 0.5,
                 std: float | None = None, plus: bool = False, legacy_permutation: bool = False,
                 reduction: str = "mean", head: str = "auto", chunk_size: int | None = None,
                 sample_rate: float = 0.1, process_group=None, generator: torch.Generator | None = None):
        super().__init__(num_classes, embedding_dim)


@register("elastic-cosface", family="margin", task="embedding", paper=ELASTIC,
          summary="CosFace with a margin drawn per sample from N(mean, std^2); plus=True gives larger "
                  "margins to harder samples.")
class ElasticCosFaceLoss(ElasticArcFaceLoss):
    """``std=None`` means the paper's value: 0.05, or 0.025 with ``plus``."""

    KIND = "cos"
    PLUS_STD = 0.025

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, mean: float = 0.35,
                 std: float | None = None, plus: bool = False, legacy_permutation: bool = False,
                 reduction: str = "mean", head: str = "auto", chunk_size: int | None = None,
                 sample_rate: float = 0.1, process_group=None, generator: torch.Generator | None = None):
        super().__init__(num_classes, embedding_dim)


@register("cfcd", family="margin", task="embedding", paper=CFCD,
          summary="MadaCos: per-batch adaptive scale and margin putting the median sample's target "
                  "probability at alpha.")
class CFCDLoss(_MarginLoss):
    """``last_scale`` / ``last_margin``: the last batch's values, a read-only
    diagnostic (no later call depends on them)."""

    def __init__(self, num_classes: int, embedding_dim: int, alpha: float = 0.02, bbar: str = "median",
                 min_scale: float = 32.0, reduction: str = "mean", head: str = "auto",
                 chunk_size: int | None = None, sample_rate: float = 0.1, process_group=None):
        super().__init__(num_classes, embedding_dim)

    def policy_from(self, hp):
        return CFCDMargin(hp["alpha"], hp["bbar"], hp["min_scale"])

    @property
    def last_scale(self) -> float | None:
        return self.policy.last_scale

    @property
    def last_margin(self) -> float | None:
        return self.policy.last_margin


@register("unpg", family="margin", task="embedding", paper=UNPG,
          summary="ArcFace/CosFace plus in-batch negative pair similarities (box-and-whisker filtered) "
                  "as extra softmax columns.")
class UNPGLoss(_MarginLoss):
    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, margin: float = 0.5,
                 base: str = "arcface", whisker: float = 1.5, reduction: str = "mean", head: str = "auto",
                 chunk_size: int | None = None, sample_rate: float = 0.1, process_group=None):
        super().__init__(num_classes, embedding_dim)

    def policy_from(self, hp):
        base = check_choice("base", hp["base"], ("arcface", "cosface"))
        pol = ArcMargin(hp["scale"], hp["margin"]) if base == "arcface" else CosMargin(hp["scale"], hp["margin"])
        return UNPGMargin(pol, hp["whisker"])
