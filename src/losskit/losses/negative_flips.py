"""Registered objectives for negative-flip-free model updates (functional/negative_flips.py)."""

from __future__ import annotations

from torch import Tensor, nn

from losskit.core.checks import check_hparam, check_reduction
from losskit.core.registry import Paper, register
from losskit.functional.negative_flips import focal_distillation_loss, margin_preserving_loss

__all__ = ["FocalDistillationLoss", "MarginPreservingLoss"]

MPT_PAPER = Paper("Mitigating Negative Flips via Margin Preserving Training", 2025, "2511.08322")


@register("focal-distillation", family="continual", task="logits", paper=MPT_PAPER)
class FocalDistillationLoss(nn.Module):
    """Focal distillation from a reference model: ``(alpha + beta 1[ref correct]) KL(p_ref^T || p^T)``
    on the reference's classes; called as ``loss(logits, labels, ref_logits=..., sample_weight=None)``."""

    def __init__(self, alpha: float = 1.0, beta: float = 5.0, temperature: float = 5.0, reduction: str = "mean"):
        super().__init__()
        self.alpha = check_hparam("alpha", alpha, low=0.0)
        self.beta = check_hparam("beta", beta, low=0.0)
        self.temperature = check_hparam("temperature", temperature, low=0.0, low_open=True)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, labels: Tensor, ref_logits: Tensor, sample_weight: Tensor | None = None):
        return focal_distillation_loss(logits, labels, ref_logits, self.alpha, self.beta, self.temperature,
                                       self.reduction, sample_weight)


@register("mpt", family="continual", task="logits", paper=MPT_PAPER)
class MarginPreservingLoss(nn.Module):
    """Margin Preserving Training: margin-calibrated CE (new classes' logits + bias) plus double-source
    focal distillation (old model on the old classes, new model on all); called as
    ``loss(logits, labels, old_logits=..., new_logits=None, sample_weight=None)``."""

    def __init__(self, bias: float = 4.0, alpha: float = 1.0, beta: float = 5.0, temperature: float = 5.0,
                 reduction: str = "mean"):
        super().__init__()
        self.bias = check_hparam("bias", bias)
        self.alpha = check_hparam("alpha", alpha, low=0.0)
        self.beta = check_hparam("beta", beta, low=0.0)
        self.temperature = check_hparam("temperature", temperature, low=0.0, low_open=True)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, labels: Tensor, old_logits: Tensor, new_logits: Tensor | None = None,
                sample_weight: Tensor | None = None):
        return margin_preserving_loss(logits, labels, old_logits, new_logits, self.bias, self.alpha, self.beta,
                                      self.temperature, self.reduction, sample_weight)
