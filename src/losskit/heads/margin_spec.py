"""Margin policies used by :class:`losskit.heads.MarginHead`.

A policy maps the target cosines ``cos_y`` (``[B]``, with gradient) to the
unscaled target value ``psi`` and fixes the scale ``s``; every other logit is
``s * cos``.  A call has two phases and keeps **no state between calls**:

1. ``batch = policy.prepare(cos_y, valid, ...)`` on the *detached* target
   cosines: returns a :class:`MarginBatch` (the scale and any per-batch
   margin: ElasticFace's draws, CFCD's adaptive margin).  Policies that need
   statistics over the non-target logits (CFCD's ``B_i``) call
   ``nontarget_lse(rows, scale)``, a no-grad callback each head backend
   implements (dense: from the matrix; chunked: an extra chunked pass over
   those rows only; sharded: combined across ranks).  ``sync(t)`` makes
   random draws identical on all ranks.
2. ``psi = policy.target(cos_y, batch)`` (with gradient), elementwise over
   all ``B`` rows (the head ignores the rows with label -1); and
   ``policy.extra_lse(xn, labels, batch)``: the log-sum-exp of extra logit
   columns appended to every row (UNPG's in-batch negatives), or ``None``.

Hyperparameters are checked once, at construction (``core.checks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from losskit.core.checks import check_bool, check_choice, check_hparam
from losskit.functional import margins as F

__all__ = ["MarginBatch", "MarginPolicy", "NoMargin", "ArcMargin", "CosMargin", "CombinedMargin", "ElasticMargin",
           "CFCDMargin", "UNPGMargin"]

#: ``nontarget_lse(rows, scale) -> [len(rows)]``: no-grad ``log sum_{j != y_i} exp(scale cos_ij)``
#: for the batch rows ``rows`` (indices into the batch)
NontargetFn = Callable[[Tensor, float], Tensor]
SyncFn = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class MarginBatch:
    """What phase 1 fixed for one batch: the softmax ``scale`` and the
    policy's per-batch ``margin`` (a float, a ``[B]`` tensor aligned with the
    batch rows, or ``None``)."""

    scale: float
    margin: float | Tensor | None = None


class MarginPolicy:
    """Base: ``s * cos`` with no margin (NormFace)."""

    def __init__(self, scale: float = 64.0):
        self.scale = check_hparam("scale", scale, low=0.0, low_open=True)

    def prepare(self, cos_y: Tensor, valid: Tensor | None = None, *, training: bool = True,
                nontarget_lse: NontargetFn | None = None, sync: SyncFn = _identity) -> MarginBatch:
        """Phase 1 on the detached target cosines ``[B]`` (``valid``: the rows
        with a label, ``None`` = all)."""
        return MarginBatch(self.scale)

    def target(self, cos_y: Tensor, batch: MarginBatch) -> Tensor:
        """Phase 2: the unscaled target value ``psi`` (with gradient)."""
        return cos_y

    def extra_lse(self, xn: Tensor, labels: Tensor, batch: MarginBatch) -> Tensor | None:
        """Log-sum-exp (scaled, with gradient) of extra columns appended to every row, or ``None``."""
        return None

    def __call__(self, cos_y: Tensor, *, training: bool = True, nontarget_lse: NontargetFn | None = None,
                 sync: SyncFn = _identity) -> tuple[Tensor, float]:
        batch = self.prepare(cos_y.detach(), training=training, nontarget_lse=nontarget_lse, sync=sync)
        return self.target(cos_y, batch), batch.scale

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


NoMargin = MarginPolicy


class ArcMargin(MarginPolicy):
    def __init__(self, scale: float = 64.0, margin: float = 0.5, easy_margin: bool = False,
                 straight_through: bool = False):
        super().__init__(scale)
        self.margin = check_hparam("margin", margin, low=0.0, high=math.pi, high_open=True)
        self.easy_margin = check_bool("easy_margin", easy_margin)
        self.straight_through = check_bool("straight_through", straight_through)

    def target(self, cos_y: Tensor, batch: MarginBatch) -> Tensor:
        return F.arcface_target(cos_y, self.margin, easy_margin=self.easy_margin,
                                straight_through=self.straight_through)


class CosMargin(MarginPolicy):
    def __init__(self, scale: float = 64.0, margin: float = 0.35):
        super().__init__(scale)
        self.margin = check_hparam("margin", margin, low=0.0)

    def target(self, cos_y: Tensor, batch: MarginBatch) -> Tensor:
        return F.cosface_target(cos_y, self.margin)


class CombinedMargin(MarginPolicy):
    """insightface's ``cos(m1 theta + m2) - m3``: ``m1 > 0``, ``m2`` in
    ``[0, pi)`` (radians), ``m3 >= 0``."""

    def __init__(self, scale: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0):
        super().__init__(scale)
        self.m1 = check_hparam("m1", m1, low=0.0, low_open=True)
        self.m2 = check_hparam("m2", m2, low=0.0, high=math.pi, high_open=True)
        self.m3 = check_hparam("m3", m3, low=0.0)

    def target(self, cos_y: Tensor, batch: MarginBatch) -> Tensor:
        return F.combined_target(cos_y, self.m1, self.m2, self.m3)


class ElasticMargin(MarginPolicy):
    """ElasticArcFace (``kind='arc'``) or ElasticCosFace (``kind='cos'``):
    one margin per valid row drawn in :meth:`prepare` and carried by the
    returned :class:`MarginBatch` (``batch.margin``, ``[B]``, 0 on ignored
    rows), never stored on the policy."""

    def __init__(self, kind: str = "arc", scale: float = 64.0, mean: float = 0.5, std: float = 0.05,
                 plus: bool = False, legacy_permutation: bool = False, generator: torch.Generator | None = None):
        super().__init__(scale)
        self.kind = check_choice("kind", kind, ("arc", "cos"))
        self.mean = check_hparam("mean", mean, low=0.0, high=math.pi, high_open=True)
        self.std = check_hparam("std", std, low=0.0)
        self.plus = check_bool("plus", plus)
        self.legacy_permutation = check_bool("legacy_permutation", legacy_permutation)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    def prepare(self, cos_y: Tensor, valid: Tensor | None = None, *, training: bool = True,
                sync: SyncFn = _identity, **kw) -> MarginBatch:
        if not training:
            return MarginBatch(self.scale, self.mean)
        cv = cos_y if valid is None else cos_y[valid]
        m = F.draw_elastic_margins(cv, self.mean, self.std, plus=False, generator=self.generator)
        m = sync(m)
        if self.plus and m.numel():
            m = F.assign_elastic_margins(cv, m, legacy_permutation=self.legacy_permutation)
        if valid is not None:
            m = torch.zeros_like(cos_y).masked_scatter(valid, m.to(cos_y.dtype))
        return MarginBatch(self.scale, m.detach())

    def target(self, cos_y: Tensor, batch: MarginBatch) -> Tensor:
        m = batch.margin
        if isinstance(m, Tensor):
            m = m.to(cos_y.dtype)
        if self.kind == "arc":
            return F.arcface_target(cos_y, m)
        return F.cosface_target(cos_y, m)


class CFCDMargin(MarginPolicy):
    """MadaCos: per-batch adaptive scale and margin (stop-gradient).

    ``last_scale`` / ``last_margin`` are a read-only diagnostic of the last
    call (floats); nothing in a later call reads them."""

    def __init__(self, alpha: float = 0.02, bbar: str = "median", min_scale: float = 32.0):
        min_scale = check_hparam("min_scale", min_scale, low=0.0, low_open=True)
        super().__init__(min_scale)
        self.alpha = check_hparam("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        self.bbar = check_choice("bbar", bbar, ("median", "mean"))
        self.min_scale = min_scale
        self._last: tuple[float, float] | None = None

    @property
    def last_scale(self) -> float | None:
        """The scale of the last batch (diagnostic)."""
        return None if self._last is None else self._last[0]

    @property
    def last_margin(self) -> float | None:
        """The margin of the last batch (diagnostic)."""
        return None if self._last is None else self._last[1]

    def prepare(self, cos_y: Tensor, valid: Tensor | None = None, *, training: bool = True,
                nontarget_lse: NontargetFn | None = None, sync: SyncFn = _identity) -> MarginBatch:
        rows = torch.arange(cos_y.shape[0], device=cos_y.device)
        if valid is not None:
            rows = rows[valid]
        cv = cos_y[rows]
        if cv.numel() == 0:
            self._last = (self.min_scale, 0.0)
            return MarginBatch(self.min_scale, 0.0)
        s_t, idx = F.cfcd_scale(cv, self.alpha, self.min_scale)
        s = float(s_t)
        m = 0.0
        if training:
            if nontarget_lse is None:
                raise RuntimeError("CFCDMargin needs the head's nontarget_lse callback")
            if self.bbar == "median":
                log_bbar = nontarget_lse(rows[idx].reshape(1), s)[0]
            else:
                lb = nontarget_lse(rows, s)
                log_bbar = torch.logsumexp(lb, 0) - math.log(lb.numel())
            m = float(F.cfcd_margin(cv[idx], log_bbar, torch.tensor(s, dtype=log_bbar.dtype), self.alpha))
        self._last = (s, m)
        return MarginBatch(s, m)

    def target(self, cos_y: Tensor, batch: MarginBatch) -> Tensor:
        return cos_y - batch.margin


class UNPGMargin(MarginPolicy):
    """UNPG: a base policy (ArcFace or CosFace) plus the in-batch negative
    pair similarities (box-and-whisker filtered, scaled by ``s``) as extra
    softmax columns of every row, through :meth:`extra_lse`."""

    def __init__(self, base: MarginPolicy, whisker: float = 1.5):
        if not isinstance(base, MarginPolicy):
            raise TypeError(f"base: expected a MarginPolicy, got {type(base).__name__}")
        super().__init__(base.scale)
        self.base = base
        self.whisker = check_hparam("whisker", whisker, low=0.0)

    def prepare(self, cos_y: Tensor, valid: Tensor | None = None, **kw) -> MarginBatch:
        return self.base.prepare(cos_y, valid, **kw)

    def target(self, cos_y: Tensor, batch: MarginBatch) -> Tensor:
        return self.base.target(cos_y, batch)

    def extra_lse(self, xn: Tensor, labels: Tensor, batch: MarginBatch) -> Tensor | None:
        neg = F.unpg_negatives(xn, labels, self.whisker)
        if neg.numel() == 0:
            return None
        return torch.logsumexp(neg * batch.scale, 0)
