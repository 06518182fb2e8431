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

from losskit.heads.classifier import MarginHead
from losskit.heads.margin_spec import ArcMargin, CFCDMargin, CombinedMargin, CosMargin, ElasticMargin, MarginPolicy
from losskit.registry import Paper, register

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


def _head_kw(head, chunk_size, sample_rate, process_group, reduction):
    return dict(head=head, chunk_size=chunk_size, sample_rate=sample_rate, process_group=process_group,
                reduction=reduction)


@register("normalized-softmax", family="margin", task="embedding", paper=NORMFACE,
          summary="Cosine softmax s*cos(theta) on normalised embeddings and class centres (no margin).")
class NormalizedSoftmaxLoss(MarginHead):
    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, reduction: str = "mean",
                 head: str = "auto", chunk_size: int | None = None, sample_rate: float = 0.1,
                 process_group=None):
        super().__init__(num_classes, embedding_dim, MarginPolicy(scale),
                         **_head_kw(head, chunk_size, sample_rate, process_group, reduction))


@register("arcface", family="margin", task="embedding", paper=ARCFACE,
          summary="Additive angular margin: target logit s*cos(theta+m), m in radians.")
class ArcFaceLoss(MarginHead):
    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, margin: float = 0.5,
                 easy_margin: bool = False, straight_through: bool = False, reduction: str = "mean",
                 head: str = "auto", chunk_size: int | None = None, sample_rate: float = 0.1,
                 process_group=None):
        super().__init__(num_classes, embedding_dim, ArcMargin(scale, margin, easy_margin, straight_through),
                         **_head_kw(head, chunk_size, sample_rate, process_group, reduction))


@register("cosface", family="margin", task="embedding", paper=COSFACE,
          summary="Large margin cosine loss: target logit s*(cos(theta)-m).")
class CosFaceLoss(MarginHead):
    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, margin: float = 0.35,
                 reduction: str = "mean", head: str = "auto", chunk_size: int | None = None,
                 sample_rate: float = 0.1, process_group=None):
        super().__init__(num_classes, embedding_dim, CosMargin(scale, margin),
                         **_head_kw(head, chunk_size, sample_rate, process_group, reduction))


@register("combined-margin", family="margin", task="embedding", paper=ARCFACE,
          summary="insightface's combined margin: target logit s*(cos(m1*theta+m2)-m3).")
class CombinedMarginLoss(MarginHead):
    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, m1: float = 1.0,
                 m2: float = 0.3, m3: float = 0.2, reduction: str = "mean", head: str = "auto",
                 chunk_size: int | None = None, sample_rate: float = 0.1, process_group=None):
        super().__init__(num_classes, embedding_dim, CombinedMargin(scale, m1, m2, m3),
                         **_head_kw(head, chunk_size, sample_rate, process_group, reduction))


def _elastic_std(std, plus, normal, plus_default):
    return (plus_default if plus else normal) if std is None else float(std)


@register("elastic-arcface", family="margin", task="embedding", paper=ELASTIC,
          summary="ArcFace with a margin drawn per sample from N(mean, std^2); plus=True gives larger "
                  "margins to harder samples.")
class ElasticArcFaceLoss(MarginHead):
    """``std=None`` means the paper's value: 0.05, or 0.0175 with ``plus``."""

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, mean: float = 0.5,
                 std: float | None = None, plus: bool = False, legacy_permutation: bool = False,
                 reduction: str = "mean", head: str = "auto", chunk_size: int | None = None,
                 sample_rate: float = 0.1, process_group=None, generator: torch.Generator | None = None):
        pol = ElasticMargin("arc", scale, mean, _elastic_std(std, plus, 0.05, 0.0175), plus, legacy_permutation,
                            generator)
        super().__init__(num_classes, embedding_dim, pol,
                         **_head_kw(head, chunk_size, sample_rate, process_group, reduction))


@register("elastic-cosface", family="margin", task="embedding", paper=ELASTIC,
          summary="CosFace with a margin drawn per sample from N(mean, std^2); plus=True gives larger "
                  "margins to harder samples.")
class ElasticCosFaceLoss(MarginHead):
    """``std=None`` means the paper's value: 0.05, or 0.025 with ``plus``."""

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, mean: float = 0.35,
                 std: float | None = None, plus: bool = False, legacy_permutation: bool = False,
                 reduction: str = "mean", head: str = "auto", chunk_size: int | None = None,
                 sample_rate: float = 0.1, process_group=None, generator: torch.Generator | None = None):
        pol = ElasticMargin("cos", scale, mean, _elastic_std(std, plus, 0.05, 0.025), plus, legacy_permutation,
                            generator)
        super().__init__(num_classes, embedding_dim, pol,
                         **_head_kw(head, chunk_size, sample_rate, process_group, reduction))


@register("cfcd", family="margin", task="embedding", paper=CFCD,
          summary="MadaCos: per-batch adaptive scale and margin putting the median sample's target "
                  "probability at alpha.")
class CFCDLoss(MarginHead):
    def __init__(self, num_classes: int, embedding_dim: int, alpha: float = 0.02, bbar: str = "median",
                 min_scale: float = 32.0, reduction: str = "mean", head: str = "auto",
                 chunk_size: int | None = None, sample_rate: float = 0.1, process_group=None):
        super().__init__(num_classes, embedding_dim, CFCDMargin(alpha, bbar, min_scale),
                         **_head_kw(head, chunk_size, sample_rate, process_group, reduction))

    @property
    def last_scale(self):
        return self.policy.last_scale

    @property
    def last_margin(self):
        return self.policy.last_margin


@register("unpg", family="margin", task="embedding", paper=UNPG,
          summary="ArcFace/CosFace plus in-batch negative pair similarities (box-and-whisker filtered) "
                  "as extra softmax columns.")
class UNPGLoss(MarginHead):
    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, margin: float = 0.5,
                 base: str = "arcface", whisker: float = 1.5, reduction: str = "mean", head: str = "auto",
                 chunk_size: int | None = None, sample_rate: float = 0.1, process_group=None):
        if base == "arcface":
            pol = ArcMargin(scale, margin)
        elif base == "cosface":
            pol = CosMargin(scale, margin)
        else:
            raise ValueError(f"base: expected 'arcface' or 'cosface', got {base!r}")
        if not whisker >= 0:
            raise ValueError(f"whisker: expected a value >= 0, got {whisker!r}")
        super().__init__(num_classes, embedding_dim, pol, unpg_whisker=float(whisker),
                         **_head_kw(head, chunk_size, sample_rate, process_group, reduction))
