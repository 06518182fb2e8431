"""The comp-sum losses (Mao, Mohri, Zhong, "Cross-Entropy Loss Functions:
Theoretical Analysis and Applications", ICML 2023, arXiv:2304.07288: the
comp-sum family and its smooth adversarial version, as written in the
project's notes, shared/papers/margin-and-metric.md section 10; the paper's
own equation numbers were not checked here).

For logits ``h`` and label ``y``, with ``u = sum_{y' != y} exp(h_y' - h_y)``::

    l_tau = Phi_tau(u),   Phi_tau(u) = log(1 + u)                       tau = 1
                                     = ((1 + u)^(1 - tau) - 1) / (1 - tau)   otherwise

``tau = 0`` is the sum-exponential loss ``u``, ``tau = 1`` cross-entropy,
``tau`` in ``(1, 2)`` generalized cross-entropy with ``q = tau - 1``
(``(1 - p_y^q) / q``) and ``tau = 2`` mean absolute error ``1 - p_y`` (the
``||onehot - softmax||_1`` of Ghosh et al. is twice that).

Computed in log space.  ``1 + u = 1 / p_y``, so with the row cross-entropy
``c = -log p_y = logsumexp(h) - h_y`` (never an exponential of a logit)::

    l_tau = expm1((1 - tau) c) / (1 - tau),   d l_tau / d c = exp((1 - tau) c) = p_y^(tau - 1)

continuous in ``tau`` through 1 (``expm1(a c) / a -> c``).  ``l_tau`` depends
on the logits only through ``c``, i.e. through the target logit and the
log-sum-exp of the others, so the margin heads' chunked and fused kernels
compute it over any number of classes (``MarginHead(..., tau=...)``).  For
``tau >= 1`` the loss is bounded by ``1 / (tau - 1)`` and is finite for any
finite logits; for ``tau < 1`` it grows like ``exp((1 - tau) c)`` and its true
value overflows the dtype when ``(1 - tau) c`` exceeds ~88 (float32): that is
refused with a ValueError, not returned as ``inf``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit.core.checks import check_embeddings, check_hparam, check_labels, shape_str, tensor_checks_enabled
from losskit.core.reduction import reduce_loss

__all__ = ["comp_sum_from_ce", "comp_sum_rows", "comp_sum_loss", "check_row_losses", "adversarial_comp_sum_loss", "logit_distance",
           "TAU_CE_TOL"]

#: ``|1 - tau|`` below this is computed as cross-entropy plus its first-order term (no 0/0)
TAU_CE_TOL = 1e-8


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def comp_sum_from_ce(ce: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """``(l_tau, d l_tau / d ce)`` from the row cross-entropies ``ce >= 0``
    (no gradient through the pair; :func:`comp_sum_rows` is the autograd form)."""
    a = 1.0 - float(tau)
    if abs(a) < TAU_CE_TOL:
        return ce + 0.5 * a * ce * ce, torch.exp(a * ce)
    return torch.expm1(a * ce) / a, torch.exp(a * ce)


def comp_sum_rows(ce: Tensor, tau: float, *, check: bool = True) -> Tensor:
    """``l_tau`` per row from the row cross-entropies ``ce`` (with gradient):
    ``expm1((1 - tau) ce) / (1 - tau)``; ``ce`` itself at ``tau = 1``.  With
    ``check`` (and tensor checks on) an overflow for ``tau < 1`` is a ValueError."""
    tau = float(tau)
    if tau == 1.0:
        return ce
    a = 1.0 - tau
    if abs(a) < TAU_CE_TOL:
        out = ce + 0.5 * a * ce * ce
    else:
        out = torch.expm1(a * ce) / a
    if check:
        _check_overflow(out, ce, tau)
    return out


def _check_overflow(out: Tensor, ce: Tensor, tau: float) -> None:
    """Refuse an overflow of the unbounded comp-sum losses (``tau < 1``) with a
    ValueError (a host read; skipped with tensor checks off)."""
    if tau < 1.0 and tensor_checks_enabled() and out.numel() and not bool(torch.isfinite(out).all()):
        worst = float(ce.detach().max())
        raise ValueError(f"tau: comp-sum with tau={tau} < 1 grows like exp((1 - tau) * ce) and overflows "
                         f"{out.dtype} here (the largest row cross-entropy is {worst:.4g}); use tau >= 1 "
                         "(bounded), scale the logits down, or compute in a wider dtype")


def check_row_losses(ce: Tensor, name: str = "logits") -> None:
    """Refuse non-finite logits through their rows' cross-entropies (a ``[B]``
    check instead of a ``[B, C]`` one): a NaN or ``+inf`` logit, or a target
    logit of ``-inf``, makes the row's cross-entropy NaN or infinite.  A
    non-target logit of ``-inf`` (a masked class, probability 0) is accepted.
    A value check (host read), skipped with tensor checks off."""
    if tensor_checks_enabled() and ce.numel() and not bool(torch.isfinite(ce.detach()).all()):
        row = int((~torch.isfinite(ce.detach())).nonzero()[0, 0])
        raise ValueError(f"{name}: expected finite values, got a NaN or +inf logit (or a target logit of -inf) "
                         f"in row {row}")


def _row_ce(logits: Tensor, labels: Tensor, name: str = "logits") -> tuple[Tensor, Tensor]:
    """Validated ``(ce [B], valid [B])`` in the compute dtype; rows with label -1 hold 0."""
    check_embeddings(logits, name, finite=False)       # finiteness: on the [B] row losses below
    check_labels(labels, logits.shape[0], device=logits.device, num_classes=logits.shape[1], allow_ignore=True)
    z = logits.to(_compute_dtype(logits.dtype))
    valid = labels >= 0
    if logits.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one class, got shape {shape_str(logits)}")
    ce = F.cross_entropy(z, labels.clamp_min(0), reduction="none")
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    check_row_losses(ce, name)
    return ce, valid


def comp_sum_loss(logits: Tensor, labels: Tensor, tau: float = 1.0, reduction: str = "mean",
                  sample_weight: Tensor | None = None) -> Tensor:
    """The comp-sum loss ``l_tau`` of ``logits [B, C]`` (any real values)
    and ``labels [B]`` in ``[0, C)`` (``-1``: an ignored row, 0, still counted
    by 'mean'), then ``sample_weight`` and ``reduction``.  The result has the
    logits' dtype (half precision is computed in float32)."""
    tau = check_hparam("tau", tau, low=0.0)
    ce, _ = _row_ce(logits, labels)
    per = comp_sum_rows(ce, tau)
    out = reduce_loss(per, reduction, sample_weight).to(logits.dtype)
    _check_overflow(out, ce, tau)     # the result in the logits' dtype (float16 overflows at 65504)
    return out


def logit_distance(adv_logits: Tensor, logits: Tensor) -> Tensor:
    """``||h(x') - h(x)||_2`` per row, with a zero (sub)gradient where the two are equal."""
    d = adv_logits - logits
    sq = (d * d).sum(dim=1)
    pos = sq != 0          # NaN stays NaN (and is refused by the callers' checks)
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def adversarial_comp_sum_loss(logits: Tensor, labels: Tensor, adv_logits: Tensor, tau: float = 1.0,
                              nu: float = 1.0, reduction: str = "mean",
                              sample_weight: Tensor | None = None) -> Tensor:
    """Smooth adversarial comp-sum (Mao et al. 2023):
    ``l_tau(h(x), y) + nu ||h(x') - h(x)||_2`` per row, where ``adv_logits``
    are ``h(x')`` at the inner maximiser ``x'`` of the distance in the
    ``gamma``-ball (found by PGD: :func:`losskit.functional.adversarial.pgd_perturb`);
    gradient flows into both.  Ignored rows (label -1) hold 0."""
    tau = check_hparam("tau", tau, low=0.0)
    nu = check_hparam("nu", nu, low=0.0)
    ce, valid = _row_ce(logits, labels)
    check_embeddings(adv_logits, "adv_logits", finite=False)
    if adv_logits.shape != logits.shape:
        raise ValueError(f"adv_logits: expected the logits' shape {shape_str(logits)}, got {shape_str(adv_logits)}")
    dist = logit_distance(adv_logits.to(ce.dtype), logits.to(ce.dtype))
    check_row_losses(dist, "adv_logits")
    per = comp_sum_rows(ce, tau) + nu * torch.where(valid, dist, torch.zeros_like(dist))
    out = reduce_loss(per, reduction, sample_weight).to(logits.dtype)
    _check_overflow(out, ce, tau)
    return out
