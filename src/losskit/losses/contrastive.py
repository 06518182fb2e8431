"""Registered contrastive objectives on paired embeddings (task ``paired``:
``loss(a, b, sample_weight=None)``): ``info-nce`` (CLIP), ``cement``
(InfoNCE with concreteness margins on hard negatives) and ``lexlip`` (InfoNCE
plus the FLOPS regulariser on lexicon vectors); and ``pamc`` (task ``other``:
graph clustering, ``loss(embeddings, adjacency)``).  Formulas in
:mod:`losskit.functional.contrastive` and docs/contrastive.md."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from losskit.core.checks import check_bool, check_hparam, check_int, check_reduction
from losskit.core.registry import Paper, register
from losskit.functional.contrastive import cement_margins, info_nce_loss, lexlip_loss, pamc_objective, \
    soft_assignment

__all__ = ["InfoNCELoss", "CementLoss", "LexLIPLoss", "PamCLoss", "CLIP_PAPER"]

CLIP_PAPER = Paper("Learning Transferable Visual Models From Natural Language Supervision", 2021, "2103.00020")


class _Temperature(nn.Module):
    """A fixed temperature, or CLIP's learnable logit scale: ``s = exp(t)`` with ``t`` initialised to
    ``log(1 / temperature)`` and clipped so that ``s <= max_scale`` (CLIP: "clipped to prevent
    scaling the logits by more than 100"; the clip is applied in the forward pass, so no optimiser hook
    is needed and a clipped scale gets no gradient)."""

    def _init_temperature(self, temperature: float, learnable: bool, max_scale: float) -> None:
        self.temperature = check_hparam("temperature", temperature, low=0, low_open=True)
        self.learnable = check_bool("learnable", learnable)
        self.max_scale = check_hparam("max_scale", max_scale, low=0, low_open=True)
        if 1.0 / self.temperature > self.max_scale:
            raise ValueError(f"temperature: expected 1 / temperature <= max_scale = {self.max_scale:g}, "
                             f"got temperature {temperature:g}")
        if self.learnable:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.temperature)))

    def _init_paired(self, temperature: float, learnable: bool, max_scale: float, symmetric: bool,
                     normalize: bool, chunk_size: int | None, gather: bool, reduction: str) -> None:
        """The temperature plus the options every InfoNCE-style objective here shares."""
        self._init_temperature(temperature, learnable, max_scale)
        self.symmetric = check_bool("symmetric", symmetric)
        self.normalize = check_bool("normalize", normalize)
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, low=1)
        self.gather = check_bool("gather", gather)
        self.reduction = check_reduction(reduction)

    def scale(self) -> float | Tensor:
        if not self.learnable:
            return 1.0 / self.temperature
        return self.logit_scale.clamp(max=math.log(self.max_scale)).exp()


@register("info-nce", family="contrastive", kind="objective", task="paired", paper=CLIP_PAPER)
class InfoNCELoss(_Temperature):
    """The symmetric CLIP loss on paired rows (``symmetric=False``: the one-sided a -> b InfoNCE).

    ``temperature``: fixed, or the initial value of CLIP's learnable logit scale (``learnable``,
    clipped at ``max_scale``); ``normalize``: L2-normalise ``a`` and ``b`` first; ``chunk_size``:
    rows per block of the chunked kernel (``None``: blocks of about 4M similarities); ``gather``: under torch.distributed, every rank's rows are negatives
    (gathered with gradient; each rank's mean is over its own rows).  ``forward(a, b,
    sample_weight=None, hard_negatives=None)``: optional ``[B, H, D]`` extra negatives of ``b``'s
    kind per row of ``a``.
    """

    def __init__(self, temperature: float = 0.07, learnable: bool = True, max_scale: float = 100.0,
                 symmetric: bool = True, normalize: bool = True, chunk_size: int | None = None,
                 gather: bool = False, reduction: str = "mean"):
        super().__init__()
        self._init_paired(temperature, learnable, max_scale, symmetric, normalize, chunk_size, gather, reduction)

    def forward(self, a: Tensor, b: Tensor, sample_weight: Tensor | None = None,
                hard_negatives: Tensor | None = None) -> Tensor:
        return info_nce_loss(a, b, self.scale(), symmetric=self.symmetric, normalize=self.normalize,
                             chunk_size=self.chunk_size, hard_negatives=hard_negatives, gather=self.gather,
                             reduction=self.reduction, sample_weight=sample_weight)


@register("cement", family="contrastive", kind="objective", task="paired",
          paper=Paper("Concrete Jungle", 2026, "2604.13313"))
class CementLoss(_Temperature):
    """InfoNCE whose hard negatives get a margin ``gamma * c`` on their logit, ``c`` the normalised
    concreteness (``(score - 1) / 4`` on the Brysbaert 1-5 scale) of the word the negative changed.

    ``forward(a, b, hard_negatives, concreteness, sample_weight=None)``: ``hard_negatives``
    ``[B, H, D]`` (``b``-side embeddings of perturbed captions, e.g. from
    :func:`losskit.data.concreteness.concrete_plant`), ``concreteness`` ``[B, H]`` scores on the
    norms' scale.  ``gamma = 0`` is InfoNCE with hard negatives.
    """

    def __init__(self, gamma: float = 1.0, temperature: float = 0.07, learnable: bool = True,
                 max_scale: float = 100.0, symmetric: bool = True, normalize: bool = True,
                 chunk_size: int | None = None, gather: bool = False, reduction: str = "mean"):
        super().__init__()
        self.gamma = check_hparam("gamma", gamma, low=0)
        self._init_paired(temperature, learnable, max_scale, symmetric, normalize, chunk_size, gather, reduction)

    def margins(self, concreteness: Tensor) -> Tensor:
        return cement_margins(concreteness, self.gamma)

    def forward(self, a: Tensor, b: Tensor, hard_negatives: Tensor, concreteness: Tensor,
                sample_weight: Tensor | None = None) -> Tensor:
        if not isinstance(hard_negatives, Tensor) or hard_negatives.dim() != 3:
            raise ValueError("hard_negatives: expected a [B, H, D] tensor of perturbed-caption embeddings, got "
                             f"{list(hard_negatives.shape) if isinstance(hard_negatives, Tensor) else type(hard_negatives).__name__}")
        if not isinstance(concreteness, Tensor) or tuple(concreteness.shape) != tuple(hard_negatives.shape[:2]):
            raise ValueError(f"concreteness: expected shape {list(hard_negatives.shape[:2])} (one score per hard "
                             f"negative), got {list(concreteness.shape) if isinstance(concreteness, Tensor) else type(concreteness).__name__}")
        return info_nce_loss(a, b, self.scale(), symmetric=self.symmetric, normalize=self.normalize,
                             chunk_size=self.chunk_size, hard_negatives=hard_negatives,
                             hard_margins=self.margins(concreteness), gather=self.gather,
                             reduction=self.reduction, sample_weight=sample_weight)


@register("lexlip", family="contrastive", kind="objective", task="paired",
          paper=Paper("LexLIP: Lexicon-Bottlenecked Language-Image Pre-Training for Large-Scale Image-Text "
                      "Sparse Retrieval", 2023, "2302.02908"))
class LexLIPLoss(_Temperature):
    """LexLIP's contrastive objective on lexicon vectors (``[B, V]``, e.g. from
    :class:`losskit.retrieval.LexiconHead`): symmetric InfoNCE at temperature 0.05 on the
    L2-normalised vectors plus ``flops_weight`` (0.002) times the FLOPS regulariser of each side.
    The scores of the trained vectors are served by :class:`losskit.retrieval.InvertedIndex`."""

    def __init__(self, temperature: float = 0.05, flops_weight: float = 0.002, learnable: bool = False,
                 max_scale: float = 100.0, chunk_size: int | None = None, gather: bool = False,
                 reduction: str = "mean"):
        super().__init__()
        self._init_temperature(temperature, learnable, max_scale)
        self.flops_weight = check_hparam("flops_weight", flops_weight, low=0)
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, low=1)
        self.gather = check_bool("gather", gather)
        self.reduction = check_reduction(reduction)

    def forward(self, a: Tensor, b: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        return lexlip_loss(a, b, self.scale(), flops_weight=self.flops_weight, chunk_size=self.chunk_size,
                           gather=self.gather, reduction=self.reduction, sample_weight=sample_weight)


@register("pamc", family="contrastive", kind="objective", task="other",
          paper=Paper("Efficient block contrastive learning via parameter-free meta-node approximation", 2022,
                      "2209.14067"))
class PamCLoss(nn.Module):
    """PamC's graph-clustering objective: ``beta KL(P || Q) + alpha L_PamC`` per node, ``Q`` the
    Student-t soft assignments of the embeddings to the learnable ``centers`` ``[K, D]`` (initialise
    them with k-means: :meth:`init_centers`), ``P`` its sharpened target, ``L_PamC`` the meta-node
    contrast over the propagated kNN graph.  ``forward(embeddings [N, D], adjacency [N, N],
    sample_weight=None)``: ``adjacency`` is ``A~`` from
    :func:`losskit.functional.propagated_adjacency` (sparse).  ``dense=True`` is the ``N x N``
    block-contrastive loss PamC approximates; ``official=True`` the official code's diagonal and
    epsilon (docs/contrastive.md).  Paper defaults for USPS: alpha 2, beta 2, tau 0.5 (R = 4 hops)."""

    def __init__(self, num_clusters: int, embedding_dim: int, tau: float = 0.5, alpha: float = 2.0,
                 beta: float = 2.0, v: float = 1.0, official: bool = False, dense: bool = False,
                 reduction: str = "mean"):
        super().__init__()
        self.num_clusters = check_int("num_clusters", num_clusters, low=1)
        self.embedding_dim = check_int("embedding_dim", embedding_dim, low=1)
        self.tau = check_hparam("tau", tau, low=0, low_open=True)
        self.alpha = check_hparam("alpha", alpha, low=0)
        self.beta = check_hparam("beta", beta, low=0)
        self.v = check_hparam("v", v, low=0, low_open=True)
        self.official = check_bool("official", official)
        self.dense = check_bool("dense", dense)
        self.reduction = check_reduction(reduction)
        self.centers = nn.Parameter(torch.randn(self.num_clusters, self.embedding_dim))

    @torch.no_grad()
    def init_centers(self, embeddings: Tensor, seed: int = 0, n_init: int = 10) -> None:
        """Set the centres by k-means on ``embeddings`` (scikit-learn, the ``bench`` extra)."""
        from sklearn.cluster import KMeans

        km = KMeans(self.num_clusters, n_init=n_init, random_state=seed).fit(embeddings.detach().double().cpu().numpy())
        self.centers.copy_(torch.as_tensor(km.cluster_centers_, dtype=self.centers.dtype))

    def assignments(self, embeddings: Tensor) -> Tensor:
        """Soft assignments ``Q`` ``[N, K]``."""
        return soft_assignment(embeddings, self.centers, self.v)

    def forward(self, embeddings: Tensor, adjacency: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        if embeddings.dim() == 2 and embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings: expected dimension {self.embedding_dim} (embedding_dim), "
                             f"got {list(embeddings.shape)}")
        return pamc_objective(embeddings, adjacency, self.centers, tau=self.tau, alpha=self.alpha, beta=self.beta,
                              v=self.v, official=self.official, dense=self.dense, reduction=self.reduction,
                              sample_weight=sample_weight)
