"""Margin transforms on cosine logits (ArcFace, CosFace, combined, ElasticFace,
CFCD's MadaCos, UNPG).  Pure functions, no parameters.

Two levels:

* **target transforms** act on the target cosines ``cos_y`` (shape ``[B]``)
  and return the unscaled target value ``psi`` (``cos(theta + m)``,
  ``cos theta - m``, ...).  Every margin here only changes the target column,
  so the heads in :mod:`losskit.heads` apply them without building ``B x C``.
* **logit transforms** (``arcface_logits``, ``cosface_logits``, ...) take the
  full cosine matrix ``[B, C]`` and labels and return the scaled logits with
  the target column replaced, ready for cross-entropy.  They are the readable
  reference; the heads give the same numbers.

Labels equal to ``-1`` are *ignored rows* (Partial FC / ElasticFace code
convention): their logits are left unchanged (no margin) and the losses give
them 0.  Margins are in radians (ArcFace) or cosine units (CosFace).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from losskit.core.checks import check_hparam, check_labels
from losskit.core.reduction import reduce_loss

__all__ = [
    "SIN_EPS",
    "arcface_target",
    "cosface_target",
    "combined_target",
    "assign_elastic_margins",
    "draw_elastic_margins",
    "cfcd_scale",
    "cfcd_margin",
    "unpg_negatives",
    "apply_target",
    "arcface_logits",
    "cosface_logits",
    "combined_logits",
    "elastic_arcface_logits",
    "elastic_cosface_logits",
    "cfcd_logits",
    "margin_cross_entropy",
]

#: ``sin theta = sqrt(max(1 - cos^2, SIN_EPS))``: keeps the gradient of the
#: ArcFace transform finite at ``cos = +-1`` (it is 0 there instead of inf).
SIN_EPS = 1e-12


def _as_margin(m: float | Tensor, like: Tensor) -> Tensor | float:
    if isinstance(m, Tensor):
        if m.dim() not in (0, 1) or (m.dim() == 1 and m.shape[0] != like.shape[0]):
            raise ValueError(f"margin: expected a float, a scalar or a [{like.shape[0]}] tensor, got {list(m.shape)}")
        return m.to(device=like.device, dtype=like.dtype)
    return float(m)


def arcface_target(cos_y: Tensor, margin: float | Tensor = 0.5, *, easy_margin: bool = False,
                   straight_through: bool = False) -> Tensor:
    """ArcFace's target value ``cos(theta + m)`` (margin in radians; a float,
    or a per-sample ``[B]`` tensor for ElasticFace).

    Computed as ``cos t cos m - sin t sin m`` with ``sin t = sqrt(max(1 -
    cos^2, SIN_EPS))`` so the gradient is finite at ``cos = +-1`` (no acos).

    ``theta + m > pi`` (``cos t < cos(pi - m)``) is handled as insightface's
    ArcFace code and the paper's released training code do: the target becomes
    ``cos t - m sin m`` there, which keeps the target logit monotone in theta.
    ``easy_margin=True`` instead applies the margin only where ``cos t > 0``.
    ``straight_through=True`` reproduces insightface's arcface_torch, which
    applies the margin under ``no_grad``: forward value ``cos(t + m)``, but
    the gradient of plain ``cos t`` (an explicit option, not the default).
    """
    c = cos_y.clamp(-1.0, 1.0)
    m = _as_margin(margin, c)
    if isinstance(m, Tensor):
        cos_m, sin_m = torch.cos(m), torch.sin(m)
    else:
        cos_m, sin_m = math.cos(m), math.sin(m)
    sin_t = torch.sqrt((1.0 - c * c).clamp_min(SIN_EPS))
    phi = c * cos_m - sin_t * sin_m
    if easy_margin:
        psi = torch.where(c > 0, phi, c)
    else:
        # theta + m > pi  <=>  cos t < cos(pi - m) = -cos m
        psi = torch.where(c > -cos_m, phi, c - m * sin_m)
    if straight_through:
        psi = c + (psi - c).detach()
    return psi


def cosface_target(cos_y: Tensor, margin: float | Tensor = 0.35) -> Tensor:
    """CosFace's target value ``cos theta - m`` (float or per-sample margin)."""
    return cos_y - _as_margin(margin, cos_y)


def combined_target(cos_y: Tensor, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0) -> Tensor:
    """insightface's combined margin ``cos(m1 theta + m2) - m3``.

    ``m1 == 1`` uses the stable ArcFace form (with its ``theta + m2 > pi``
    rule) minus ``m3``.  For ``m1 != 1`` theta comes from ``acos`` of the
    cosine clamped to ``+-(1 - 1e-7)`` (finite gradient); where
    ``m1 theta + m2 > pi`` the target continues as ``cos theta - (cos(theta*) + 1) - m3``
    with ``theta* = (pi - m2) / m1``, continuous and monotone (insightface
    has no rule for this case).
    """
    check_hparam("m1", m1, low=0.0, low_open=True)
    check_hparam("m2", m2, low=0.0, high=math.pi, high_open=True)
    check_hparam("m3", m3, finite=True)
    if m1 == 1.0:
        return arcface_target(cos_y, m2) - m3
    c = cos_y.clamp(-1.0 + 1e-7, 1.0 - 1e-7)
    theta = torch.acos(c)
    t_star = (math.pi - m2) / m1
    inside = torch.cos(m1 * theta + m2)
    outside = c - (math.cos(t_star) + 1.0)
    return torch.where(theta <= t_star, inside, outside) - m3


def assign_elastic_margins(cos_y: Tensor, margins: Tensor, *, legacy_permutation: bool = False) -> Tensor:
    """ElasticFace "+": reorder drawn ``margins`` so that the smallest target
    cosine gets the largest margin (rank-based scatter, the paper's intent).

    ``legacy_permutation=True`` reproduces the released code, which indexes
    the ascending-sorted margins with the *descending* sort permutation of the
    cosines instead of scattering them (so the assignment is not monotone).
    With cos = [.1, .9, .5, .3, .7] and margins {.40,.45,.50,.55,.60}:
    intended [.60, .40, .50, .55, .45]; legacy [.45, .60, .50, .55, .40].
    """
    with torch.no_grad():
        if legacy_permutation:
            order = torch.argsort(cos_y.detach(), descending=True)
            return torch.sort(margins).values[order]
        order = torch.argsort(cos_y.detach())            # smallest cosine first
        out = torch.empty_like(margins)
        out[order] = torch.sort(margins, descending=True).values
        return out


def draw_elastic_margins(cos_y: Tensor, mean: float, std: float, *, plus: bool = False,
                         legacy_permutation: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """One margin per sample from ``N(mean, std^2)`` (unclamped, as the
    paper), reassigned by rank when ``plus``.  Drawn on the CPU generator (or
    ``generator``) so dense and chunked heads see the same numbers."""
    n = cos_y.shape[0]
    m = torch.randn(n, generator=generator, dtype=torch.float64) * std + mean
    m = m.to(device=cos_y.device, dtype=cos_y.dtype)
    if plus and n > 0:
        m = assign_elastic_margins(cos_y, m, legacy_permutation=legacy_permutation)
    return m


def cfcd_scale(cos_y: Tensor, alpha: float, min_scale: float = 32.0) -> tuple[Tensor, Tensor]:
    """MadaCos scale ``s = ln(9999999 (1 - alpha) / alpha) / (1 - c_med)``,
    floored at ``min_scale``; ``c_med`` is the lower median of the target
    cosines.  Returns ``(s, index_of_median)``; both carry no gradient."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: expected a value in (0, 1), got {alpha}")
    with torch.no_grad():
        c_med, idx = torch.median(cos_y.detach(), dim=0)
        s = math.log(9999999.0 * (1.0 - alpha) / alpha) / (1.0 - c_med).clamp_min(1e-12)
        s = torch.clamp(s, min=min_scale)
    return s, idx


def cfcd_margin(c_med: Tensor, log_bbar: Tensor, scale: Tensor, alpha: float) -> Tensor:
    """MadaCos margin ``m = max(0, c_med - ln(Bbar alpha / (1 - alpha)) / s)``
    from ``log Bbar`` (log-domain: the official code's ``exp(s cos)``
    overflows for large ``s``).  No gradient.  With no non-target class
    (``C = 1``, ``Bbar = 0``) the formula gives ``m = inf``; we use 0."""
    with torch.no_grad():
        m = c_med - (log_bbar + math.log(alpha / (1.0 - alpha))) / scale
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        return m.clamp_min(0.0)


def unpg_negatives(embeddings: Tensor, labels: Tensor, whisker: float = 1.5) -> Tensor:
    """UNPG's in-batch negative similarities with box-and-whisker filtering.

    ``S_n = {x_i . x_j : i < j, y_i != y_j}`` on L2-normalised embeddings
    (rows with label -1 take no part); ``Q1 = sorted[floor(0.25 L)]``,
    ``Q3 = sorted[floor(0.75 L)]``; keeps ``[Q1 - w IQR, Q3 + w IQR]``.
    Returns a 1-D tensor (possibly empty) that keeps its gradient (the paper
    does not detach the negatives); only the selection is under no_grad.
    """
    x = torch.nn.functional.normalize(embeddings, dim=1)
    n = x.shape[0]
    iu = torch.triu_indices(n, n, offset=1, device=x.device)
    with torch.no_grad():
        keep = (labels[iu[0]] != labels[iu[1]]) & (labels[iu[0]] >= 0) & (labels[iu[1]] >= 0)
        iu = iu[:, keep]
    sims = (x[iu[0]] * x[iu[1]]).sum(dim=1)
    if sims.numel() == 0:
        return sims
    with torch.no_grad():
        srt = torch.sort(sims.detach()).values
        L = srt.numel()
        q1 = srt[int(math.floor(0.25 * L))]
        q3 = srt[min(int(math.floor(0.75 * L)), L - 1)]
        iqr = q3 - q1
        sel = (sims >= q1 - whisker * iqr) & (sims <= q3 + whisker * iqr)
    return sims[sel]


# ---------------------------------------------------------------------------
# Logit-level transforms ([B, C] -> [B, C]); readable reference forms.
# ---------------------------------------------------------------------------

def apply_target(cos: Tensor, labels: Tensor, psi: Tensor, scale: float | Tensor) -> Tensor:
    """``scale * cos`` with the target column of each row (label >= 0)
    replaced by ``scale * psi``."""
    valid = labels >= 0
    y = labels.clamp_min(0)
    cur = cos.gather(1, y[:, None]).squeeze(1)
    new = torch.where(valid, psi.to(cos.dtype), cur)
    out = cos.scatter(1, y[:, None], new[:, None])
    return out * scale


def _target_cos(cos: Tensor, labels: Tensor) -> Tensor:
    if cos.dim() != 2:
        raise ValueError(f"cos: expected shape [B, C], got {list(cos.shape)}")
    check_labels(labels, cos.shape[0], device=cos.device, num_classes=cos.shape[1], allow_ignore=True)
    return cos.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)


def arcface_logits(cos: Tensor, labels: Tensor, margin: float = 0.5, scale: float = 64.0, *,
                   easy_margin: bool = False, straight_through: bool = False) -> Tensor:
    c = _target_cos(cos, labels)
    return apply_target(cos, labels, arcface_target(c, margin, easy_margin=easy_margin,
                                                     straight_through=straight_through), scale)


def cosface_logits(cos: Tensor, labels: Tensor, margin: float = 0.35, scale: float = 64.0) -> Tensor:
    c = _target_cos(cos, labels)
    return apply_target(cos, labels, cosface_target(c, margin), scale)


def combined_logits(cos: Tensor, labels: Tensor, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                    scale: float = 64.0) -> Tensor:
    c = _target_cos(cos, labels)
    return apply_target(cos, labels, combined_target(c, m1, m2, m3), scale)


def _elastic(cos: Tensor, labels: Tensor, mean: float, std: float, plus: bool, legacy_permutation: bool,
             margins: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    c = _target_cos(cos, labels)
    if margins is None:
        valid = labels >= 0
        m = torch.zeros_like(c)
        drawn = draw_elastic_margins(c[valid], mean, std, plus=plus, legacy_permutation=legacy_permutation,
                                     generator=generator)
        m[valid] = drawn
        margins = m
    return c, margins


def elastic_arcface_logits(cos: Tensor, labels: Tensor, mean: float = 0.5, std: float = 0.05,
                           scale: float = 64.0, *, plus: bool = False, legacy_permutation: bool = False,
                           margins: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """ElasticArcFace: ``s cos(theta_y + m_i)``, ``m_i ~ N(mean, std^2)``
    (``margins`` overrides the draw)."""
    c, m = _elastic(cos, labels, mean, std, plus, legacy_permutation, margins, generator)
    return apply_target(cos, labels, arcface_target(c, m), scale)


def elastic_cosface_logits(cos: Tensor, labels: Tensor, mean: float = 0.35, std: float = 0.05,
                           scale: float = 64.0, *, plus: bool = False, legacy_permutation: bool = False,
                           margins: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """ElasticCosFace: ``s (cos theta_y - m_i)``, ``m_i ~ N(mean, std^2)``."""
    c, m = _elastic(cos, labels, mean, std, plus, legacy_permutation, margins, generator)
    return apply_target(cos, labels, cosface_target(c, m), scale)


def cfcd_logits(cos: Tensor, labels: Tensor, alpha: float = 0.02, *, training: bool = True,
                bbar: str = "median", min_scale: float = 32.0) -> tuple[Tensor, Tensor, Tensor]:
    """MadaCos logits: ``s cos`` for non-targets, ``s (cos_y - m)`` for the
    target, with ``s`` and ``m`` from the batch (stop-gradient).  Returns
    ``(logits, s, m)``.  ``bbar``: ``'median'`` (B at the median sample, the
    paper) or ``'mean'`` (mean of B_i).  ``training=False`` sets ``m = 0``."""
    c = _target_cos(cos, labels)
    valid = labels >= 0
    cv = c[valid]
    if cv.numel() == 0:
        s = torch.tensor(float(min_scale), dtype=cos.dtype, device=cos.device)
        return cos * s, s, torch.zeros_like(s)
    s, idx = cfcd_scale(cv, alpha, min_scale)
    with torch.no_grad():
        logits_nt = (cos.detach()[valid] * s).scatter(1, labels[valid][:, None], float("-inf"))
        log_b = torch.logsumexp(logits_nt, dim=1)
        log_bbar = log_b[idx] if bbar == "median" else torch.logsumexp(log_b, 0) - math.log(log_b.numel())
        m = cfcd_margin(cv.detach()[idx], log_bbar, s, alpha) if training else torch.zeros_like(s)
    return apply_target(cos, labels, c - m, s), s, m


def margin_cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean",
                         sample_weight: Tensor | None = None, extra_logits: Tensor | None = None) -> Tensor:
    """Cross-entropy on margin logits; rows with label -1 give 0.

    ``extra_logits`` (1-D, already scaled) are columns appended to *every*
    row (UNPG); they are folded into one log-sum-exp, which is exact."""
    valid = labels >= 0
    y = labels.clamp_min(0)
    lse = torch.logsumexp(logits, dim=1)
    if extra_logits is not None and extra_logits.numel() > 0:
        lse = torch.logaddexp(lse, torch.logsumexp(extra_logits.to(lse.dtype), 0))
    per = lse - logits.gather(1, y[:, None]).squeeze(1)
    per = torch.where(valid, per, torch.zeros_like(per))
    return reduce_loss(per, reduction, sample_weight)
