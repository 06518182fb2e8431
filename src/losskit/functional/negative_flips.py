"""Model updates without negative flips: Margin Preserving Training (MPT).

Ricci, Biondi, Pernici, Del Bimbo, "Mitigating Negative Flips via Margin
Preserving Training" (AAAI 2026, arXiv:2511.08322); official code
miccunifi/negative_flip_MPT (``loss.py``, ``main.py``).

Convention: the old model knows the first ``C_old`` classes of the update
(``old_logits`` is ``[B, C_old]``, the old classes are columns ``0..C_old-1``
of ``logits``); the new classes are the columns ``C_old..C-1``.

* margin calibration: the cross-entropy is taken on ``z + b 1[c >= C_old]``
  (training only), so the old classes must win by a margin ``b`` over the new
  ones;
* focal distillation from a reference model ``r`` on the columns it knows:
  ``w_i = alpha + beta 1[argmax r_i = y_i]``,
  ``FD_i = w_i KL(softmax(r_i / T) || softmax(z_i[:C_r] / T))``, no ``T^2``;
* MPT: ``CE(z + b 1[new], y) + FD(z[:, :C_old]; old) + FD(z; new)``, the
  distillation on the *unbiased* logits (the official code adds the bias in
  place after computing the distillation terms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit.core.checks import check_embeddings, check_hparam, check_labels, check_reduction, \
    check_sample_weight, shape_str
from losskit.core.reduction import reduce_loss

__all__ = ["margin_calibrated_logits", "focal_distillation_loss", "margin_preserving_loss"]


def _check_ref(ref: Tensor, logits: Tensor, name: str, same_width: bool = False) -> Tensor:
    check_embeddings(ref, name)
    if ref.shape[0] != logits.shape[0]:
        raise ValueError(f"{name}: expected {logits.shape[0]} rows (one per logits row), got {shape_str(ref)}")
    if same_width and ref.shape[1] != logits.shape[1]:
        raise ValueError(f"{name}: expected {logits.shape[1]} classes (as logits), got {ref.shape[1]}")
    if ref.shape[1] > logits.shape[1] or ref.shape[1] < 1:
        raise ValueError(f"{name}: the reference model's classes do not match: it has {ref.shape[1]} classes, "
                         f"the updated model {logits.shape[1]} (the reference's classes must be the first "
                         f"columns of logits)")
    if ref.device != logits.device:
        raise ValueError(f"{name}: expected device {logits.device}, got {ref.device}")
    return ref


def margin_calibrated_logits(logits: Tensor, num_old_classes: int, bias: float = 4.0) -> Tensor:
    """``z + bias * 1[c >= num_old_classes]``: the new classes' logits raised
    by ``bias`` (out of place).  The paper's default ``b = 4``."""
    check_embeddings(logits, "logits")
    if not 0 < num_old_classes <= logits.shape[1]:
        raise ValueError(f"num_old_classes: expected a value in [1, {logits.shape[1]}], got {num_old_classes}")
    bias = check_hparam("bias", bias)
    shift = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
    shift[num_old_classes:] = bias
    return logits + shift


def _fd_rows(logits: Tensor, ref: Tensor, labels: Tensor, alpha: float, beta: float, temperature: float) -> Tensor:
    c = ref.shape[1]
    z = logits[:, :c].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :c]
    r = ref.detach().to(z.dtype)
    log_q = F.log_softmax(z / temperature, 1)
    log_p = F.log_softmax(r / temperature, 1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)
    correct = (r.argmax(1) == labels).to(z.dtype)
    return ((alpha + beta * correct) * kl).to(logits.dtype)


def focal_distillation_loss(logits: Tensor, labels: Tensor, ref_logits: Tensor, alpha: float = 1.0,
                            beta: float = 5.0, temperature: float = 5.0, reduction: str = "mean",
                            sample_weight: Tensor | None = None) -> Tensor:
    """Focal distillation (``[B]`` for ``reduction='none'``):
    ``(alpha + beta 1[argmax ref_i = y_i]) KL(softmax(ref_i / T) || softmax(z_i[:C_ref] / T))``.

    ``ref_logits`` ``[B, C_ref]`` (``C_ref <= C``) is treated as a constant.
    Defaults: alpha 1, beta 5, T 5 (the paper; the official function's own
    default is T 100, but its ``main.py`` passes 5)."""
    check_embeddings(logits, "logits")
    labels = check_labels(labels, logits.shape[0], device=logits.device, num_classes=logits.shape[1])
    _check_ref(ref_logits, logits, "ref_logits")
    alpha = check_hparam("alpha", alpha, low=0.0)
    beta = check_hparam("beta", beta, low=0.0)
    temperature = check_hparam("temperature", temperature, low=0.0, low_open=True)
    reduction = check_reduction(reduction)
    w = check_sample_weight(sample_weight, logits.shape[0], logits)
    return reduce_loss(_fd_rows(logits, ref_logits, labels, alpha, beta, temperature), reduction, w)


def margin_preserving_loss(logits: Tensor, labels: Tensor, old_logits: Tensor, new_logits: Tensor | None = None,
                           bias: float = 4.0, alpha: float = 1.0, beta: float = 5.0, temperature: float = 5.0,
                           reduction: str = "mean", sample_weight: Tensor | None = None) -> Tensor:
    """MPT per row: ``CE(z + b 1[c >= C_old], y) + FD(z[:, :C_old]; old) [+ FD(z; new)]``.

    ``old_logits`` ``[B, C_old]`` from the old model (its width sets
    ``C_old``); ``new_logits`` ``[B, C]`` from an independently trained new
    model (``None``: the old-model term only).  ``bias = 0`` and no
    ``new_logits`` is focal distillation from the old model (PCT-style)."""
    check_embeddings(logits, "logits")
    B, C = logits.shape
    labels = check_labels(labels, B, device=logits.device, num_classes=C)
    _check_ref(old_logits, logits, "old_logits")
    if new_logits is not None:
        _check_ref(new_logits, logits, "new_logits", same_width=True)
    bias = check_hparam("bias", bias)
    alpha = check_hparam("alpha", alpha, low=0.0)
    beta = check_hparam("beta", beta, low=0.0)
    temperature = check_hparam("temperature", temperature, low=0.0, low_open=True)
    reduction = check_reduction(reduction)
    w = check_sample_weight(sample_weight, B, logits)
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    cal = margin_calibrated_logits(z, old_logits.shape[1], bias)
    rows = F.cross_entropy(cal, labels, reduction="none")
    rows = rows + _fd_rows(z, old_logits, labels, alpha, beta, temperature)
    if new_logits is not None:
        rows = rows + _fd_rows(z, new_logits, labels, alpha, beta, temperature)
    return reduce_loss(rows.to(logits.dtype), reduction, w)
