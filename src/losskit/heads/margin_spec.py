"""Margin policies used by :class:`losskit.heads.MarginHead`.

A policy maps the target cosines ``cos_y`` (``[B]``, with gradient) to the
unscaled target value ``psi`` and the scale ``s``; every other logit is
``s * cos``.  Policies that need batch statistics over the non-target logits
(CFCD's ``B_i``) receive ``nontarget_lse(rows, scale)``, a no-grad callback
each head implements (dense: from the matrix; chunked: an extra chunked
pass over those rows only; sharded: all-reduced across ranks), so they work
in every head mode.  ``sync(t)`` makes random draws identical on all ranks.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from losskit.functional import margins as F

__all__ = ["MarginPolicy", "NoMargin", "ArcMargin", "CosMargin", "CombinedMargin", "ElasticMargin", "CFCDMargin"]

NontargetFn = Callable[[Tensor, float], Tensor]
SyncFn = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


class MarginPolicy:
    """Base: ``s * cos`` with no margin (NormFace)."""

    def __init__(self, scale: float = 64.0):
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
        self.scale = float(scale)

    def prepare(self, cos_y: Tensor, *, training: bool = True, nontarget_lse: NontargetFn | None = None,
                sync: SyncFn = _identity) -> float:
        """Phase 1, on the *detached* target cosines of the valid rows: fix
        this batch's scale and any per-batch state (drawn margins, CFCD's
        margin).  Returns the scale."""
        return self.scale

    def target(self, cos_y: Tensor) -> Tensor:
        """Phase 2: the unscaled target value ``psi`` (with gradient)."""
        return cos_y

    def __call__(self, cos_y: Tensor, *, training: bool = True, nontarget_lse: NontargetFn | None = None,
                 sync: SyncFn = _identity) -> tuple[Tensor, float]:
        s = self.prepare(cos_y.detach(), training=training, nontarget_lse=nontarget_lse, sync=sync)
        return self.target(cos_y), s

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


NoMargin = MarginPolicy


class ArcMargin(MarginPolicy):
    def __init__(self, scale: float = 64.0, margin: float = 0.5, easy_margin: bool = False,
                 straight_through: bool = False):
        super().__init__(scale)
        if not (0.0 <= margin < math.pi):
            raise ValueError(f"margin: expected radians in [0, pi), got {margin!r}")
        self.margin, self.easy_margin, self.straight_through = float(margin), easy_margin, straight_through

    def target(self, cos_y: Tensor) -> Tensor:
        return F.arcface_target(cos_y, self.margin, easy_margin=self.easy_margin,
                                straight_through=self.straight_through)


class CosMargin(MarginPolicy):
    def __init__(self, scale: float = 64.0, margin: float = 0.35):
        super().__init__(scale)
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin: expected a finite value >= 0, got {margin!r}")
        self.margin = float(margin)

    def target(self, cos_y: Tensor) -> Tensor:
        return F.cosface_target(cos_y, self.margin)


class CombinedMargin(MarginPolicy):
    def __init__(self, scale: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0):
        super().__init__(scale)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    def target(self, cos_y: Tensor) -> Tensor:
        return F.combined_target(cos_y, self.m1, self.m2, self.m3)


class ElasticMargin(MarginPolicy):
    """ElasticArcFace (``kind='arc'``) or ElasticCosFace (``kind='cos'``)."""

    def __init__(self, kind: str = "arc", scale: float = 64.0, mean: float = 0.5, std: float = 0.05,
                 plus: bool = False, legacy_permutation: bool = False, generator: torch.Generator | None = None):
        super().__init__(scale)
        if kind not in ("arc", "cos"):
            raise ValueError(f"kind: expected 'arc' or 'cos', got {kind!r}")
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"std: expected a finite value >= 0, got {std!r}")
        self.kind, self.mean, self.std = kind, float(mean), float(std)
        self.plus, self.legacy_permutation, self.generator = plus, legacy_permutation, generator
        self.last_margins: Tensor | None = None

    def prepare(self, cos_y: Tensor, *, training: bool = True, sync: SyncFn = _identity, **kw) -> float:
        if training:
            m = F.draw_elastic_margins(cos_y, self.mean, self.std, plus=False, generator=self.generator)
            m = sync(m)
            if self.plus and m.numel():
                m = F.assign_elastic_margins(cos_y, m, legacy_permutation=self.legacy_permutation)
        else:
            m = torch.full_like(cos_y, self.mean)
        self.last_margins = m.detach()
        return self.scale

    def target(self, cos_y: Tensor) -> Tensor:
        m = self.last_margins.to(cos_y.dtype)
        if self.kind == "arc":
            return F.arcface_target(cos_y, m)
        return F.cosface_target(cos_y, m)


class CFCDMargin(MarginPolicy):
    """MadaCos: per-batch adaptive scale and margin (stop-gradient)."""

    def __init__(self, alpha: float = 0.02, bbar: str = "median", min_scale: float = 32.0):
        super().__init__(min_scale)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha: expected a value in (0, 1), got {alpha!r}")
        if bbar not in ("median", "mean"):
            raise ValueError(f"bbar: expected 'median' or 'mean', got {bbar!r}")
        self.alpha, self.bbar, self.min_scale = float(alpha), bbar, float(min_scale)
        self.last_scale: float | None = None
        self.last_margin: float | None = None

    def prepare(self, cos_y: Tensor, *, training: bool = True, nontarget_lse: NontargetFn | None = None,
                sync: SyncFn = _identity) -> float:
        if cos_y.numel() == 0:
            self.last_scale, self.last_margin = self.min_scale, 0.0
            return self.min_scale
        s_t, idx = F.cfcd_scale(cos_y, self.alpha, self.min_scale)
        s = float(s_t)
        m = 0.0
        if training:
            if nontarget_lse is None:
                raise RuntimeError("CFCDMargin needs the head's nontarget_lse callback")
            if self.bbar == "median":
                log_bbar = nontarget_lse(idx.reshape(1), s)[0]
            else:
                rows = torch.arange(cos_y.shape[0], device=cos_y.device)
                lb = nontarget_lse(rows, s)
                log_bbar = torch.logsumexp(lb, 0) - math.log(lb.numel())
            m = float(F.cfcd_margin(cos_y.detach()[idx], log_bbar, torch.tensor(s, dtype=log_bbar.dtype), self.alpha))
        self.last_scale, self.last_margin = s, m
        return s

    def target(self, cos_y: Tensor) -> Tensor:
        return cos_y - self.last_margin
