"""Comp-sum losses on logits (family "robust", task "logits"): ``comp-sum``
with its parameter ``tau``, its presets ``sum-exponential`` (tau 0),
``gce`` (tau = 1 + q) and ``mae`` (tau 2), plain ``cross-entropy`` (tau 1,
``torch.nn.functional.cross_entropy``), and ``adversarial-comp-sum``.

Each is called ``loss(logits [B, C], labels [B], sample_weight=None)``
(``adversarial-comp-sum`` also takes ``adv_logits``, or builds them from a
model with :meth:`AdversarialCompSumLoss.from_model`).  Formulas, defaults
and the official code's conventions: docs/robust.md.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losskit.core.checks import check_choice, check_embeddings, check_hparam, check_int, check_labels, \
    check_reduction
from losskit.core.reduction import reduce_loss
from losskit.core.registry import Paper, register
from losskit.functional.adversarial import NORMS, pgd_perturb
from losskit.functional.comp_sum import adversarial_comp_sum_loss, check_row_losses, comp_sum_loss, logit_distance

__all__ = ["CrossEntropyLoss", "CompSumLoss", "SumExponentialLoss", "GCELoss", "MAELoss", "AdversarialCompSumLoss"]

COMP_SUM = Paper("Cross-Entropy Loss Functions: Theoretical Analysis and Applications", 2023, "2304.07288")
GCE = Paper("Generalized Cross Entropy Loss for Training Deep Neural Networks with Noisy Labels", 2018,
            "1805.07836")


@register("cross-entropy", family="baseline", task="logits",
          summary="Softmax cross-entropy on logits (torch.nn.functional.cross_entropy), comp-sum with tau = 1.")
class CrossEntropyLoss(nn.Module):
    """``-log softmax(logits)[y]`` per row; labels ``-1`` are ignored rows (0)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, labels: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        check_embeddings(logits, "logits", finite=False)    # finiteness: on the [B] row losses
        check_labels(labels, logits.shape[0], device=logits.device, num_classes=logits.shape[1], allow_ignore=True)
        z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        per = F.cross_entropy(z, labels, reduction="none", ignore_index=-1)
        check_row_losses(per)
        return reduce_loss(per, self.reduction, sample_weight).to(logits.dtype)


@register("comp-sum", family="robust", task="logits", paper=COMP_SUM,
          summary="Comp-sum loss Phi_tau(sum_{y'!=y} e^{h_y'-h_y}): tau 0 sum-exponential, 1 cross-entropy, "
                  "(1, 2) GCE, 2 MAE.")
class CompSumLoss(nn.Module):
    """``l_tau`` (functional.comp_sum.comp_sum_loss); ``tau >= 0``, default 1 (cross-entropy, so
    ``comp-sum`` in the bench's default list doubles as a check of ``cross-entropy``'s numbers)."""

    def __init__(self, tau: float = 1.0, reduction: str = "mean"):
        super().__init__()
        self.tau = check_hparam("tau", tau, low=0.0)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, labels: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        return comp_sum_loss(logits, labels, self.tau, self.reduction, sample_weight)


@register("sum-exponential", family="robust", task="logits", paper=COMP_SUM,
          summary="Comp-sum at tau = 0: sum_{y'!=y} exp(h_y' - h_y) (the multi-class exponential loss).")
class SumExponentialLoss(CompSumLoss):
    def __init__(self, reduction: str = "mean"):
        super().__init__(0.0, reduction)


@register("gce", family="robust", task="logits", paper=GCE,
          summary="Generalized cross-entropy (1 - p_y^q)/q, comp-sum at tau = 1 + q; q 0.7 (Zhang & Sabuncu).")
class GCELoss(CompSumLoss):
    """``q`` in ``(0, 1)``: comp-sum with ``tau = 1 + q``; 0.7 is Zhang and Sabuncu's default."""

    def __init__(self, q: float = 0.7, reduction: str = "mean"):
        self.q = check_hparam("q", q, low=0.0, high=1.0, low_open=True, high_open=True)
        super().__init__(1.0 + self.q, reduction)


@register("mae", family="robust", task="logits", paper=COMP_SUM,
          summary="Comp-sum at tau = 2: 1 - p_y (mean absolute error between one-hot and softmax, over 2).")
class MAELoss(CompSumLoss):
    def __init__(self, reduction: str = "mean"):
        super().__init__(2.0, reduction)


@register("adversarial-comp-sum", family="robust", task="logits", paper=COMP_SUM,
          summary="Smooth adversarial comp-sum: l_tau(h(x)) + nu sup_{||x'-x||<=gamma} ||h(x') - h(x)||_2 (PGD).")
class AdversarialCompSumLoss(nn.Module):
    """``loss(logits, labels, adv_logits)`` is the formula on given ``h(x)``
    and ``h(x')``; ``loss.from_model(model, x, labels)`` runs the inner
    maximisation by PGD (``steps`` steps of ``step_size`` in the ``radius``
    ball of norm ``norm``, random start, inputs clipped to ``clip``) and then
    the formula, with gradient through both forward passes.

    Defaults: ``tau`` 1 (the paper's adversarial experiments use comp-sum with
    cross-entropy-like tau), ``nu`` 1, radius 8/255 l_inf, 10 steps of
    2/255 (the TRADES/Madry settings for images in [0, 1])."""

    def __init__(self, tau: float = 1.0, nu: float = 1.0, radius: float = 8 / 255, steps: int = 10,
                 step_size: float = 2 / 255, norm: str = "linf", clip: tuple[float, float] | None = (0.0, 1.0),
                 reduction: str = "mean"):
        super().__init__()
        self.tau = check_hparam("tau", tau, low=0.0)
        self.nu = check_hparam("nu", nu, low=0.0)
        self.radius = check_hparam("radius", radius, low=0.0)
        self.steps = check_int("steps", steps, low=0)
        self.step_size = check_hparam("step_size", step_size, low=0.0)
        self.norm = check_choice("norm", norm, NORMS)
        if clip is not None:
            if not (isinstance(clip, (tuple, list)) and len(clip) == 2):
                raise TypeError(f"clip: expected None or a pair (low, high), got {clip!r}")
            lo = check_hparam("clip[0]", clip[0])
            hi = check_hparam("clip[1]", clip[1], low=lo)
            clip = (lo, hi)
        self.clip = clip
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, labels: Tensor, adv_logits: Tensor,
                sample_weight: Tensor | None = None) -> Tensor:
        return adversarial_comp_sum_loss(logits, labels, adv_logits, self.tau, self.nu, self.reduction,
                                         sample_weight)

    def perturb(self, model: Callable[[Tensor], Tensor], x: Tensor, logits: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """The PGD maximiser ``x'`` of ``||h(x') - h(x)||_2`` (detached)."""
        ref = (model(x) if logits is None else logits).detach()

        def objective(xa: Tensor) -> Tensor:
            return logit_distance(model(xa), ref).sum()

        return pgd_perturb(objective, x, self.radius, self.steps, self.step_size, self.norm, self.clip,
                           generator=generator)

    def from_model(self, model: Callable[[Tensor], Tensor], x: Tensor, labels: Tensor,
                   sample_weight: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``l_tau(h(x)) + nu ||h(x') - h(x)||`` with ``x'`` from :meth:`perturb`."""
        logits = model(x)
        x_adv = self.perturb(model, x, logits, generator)
        return self(logits, labels, model(x_adv), sample_weight)
