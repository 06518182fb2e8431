"""The one interface every head backend implements, and the steps they share.

A backend is a small stateless object; :class:`losskit.heads.MarginHead`
picks one by name and calls

    backend.loss(head, xn, weight, labels, reduction, sample_weight) -> Tensor

with ``xn`` the normalised embeddings ``[B, D]`` in the compute dtype,
``weight`` the class centres it scores against (the head's, or a subset for
``'sampled'``), ``labels`` ``[B]`` indices into ``weight`` (-1: ignored row),
and ``sample_weight`` already validated.  The default :meth:`loss` computes
:meth:`per_row` (``[B]``, aligned with the input rows, 0 for ignored rows)
and reduces it with :func:`losskit.core.reduction.reduce_loss`; the fused
backend instead hands :func:`losskit.core.reduction.row_coefficients` to its
kernel.  No backend applies ``reduction`` or ``sample_weight`` itself.

Every backend runs the policy in two phases (``heads.margin_spec``):
``prepare`` on detached target cosines, then ``target`` / ``extra_lse`` with
gradient; the helpers below are those steps, written once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losskit.core.reduction import reduce_loss
from losskit.functional.comp_sum import comp_sum_rows
from losskit.heads.margin_spec import MarginBatch, MarginPolicy, NontargetFn, SyncFn, _identity
from losskit.kernels.constants import NORM_EPS

__all__ = ["HeadBackend", "prepare_policy", "target_logits", "row_loss", "target_cosines", "has_extra"]


class HeadBackend:
    """Base class: ``name``; ``collective`` is True when every rank must call it
    (even with no rows)."""

    name = "?"
    collective = False

    def loss(self, head, xn: Tensor, weight: Tensor, labels: Tensor, reduction: str,
             sample_weight: Tensor | None) -> Tensor:
        per = self.per_row(head, xn, weight, labels)
        per = comp_sum_rows(per, getattr(head, "tau", 1.0))   # the identity at tau = 1 (cross-entropy)
        return reduce_loss(per.to(xn.dtype), reduction, sample_weight, checked=True)

    def per_row(self, head, xn: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<head backend {self.name!r}>"


def prepare_policy(head, cos_y: Tensor, valid: Tensor, nontarget_lse: NontargetFn | None,
                   sync: SyncFn = _identity) -> MarginBatch:
    """Phase 1 on the detached target cosines (clamped to [-1, 1])."""
    return head.policy.prepare(cos_y.detach().clamp(-1.0, 1.0), valid, training=head.training,
                               nontarget_lse=nontarget_lse, sync=sync)


def target_logits(policy: MarginPolicy, cos_y: Tensor, valid: Tensor, batch: MarginBatch) -> Tensor:
    """``s * psi(cos_y)`` on the valid rows, 0 on the ignored ones."""
    psi = policy.target(cos_y, batch).to(cos_y.dtype)
    return torch.where(valid, psi, torch.zeros_like(psi)) * batch.scale


def row_loss(n: Tensor, t: Tensor, extra: Tensor | None, valid: Tensor) -> Tensor:
    """``log(e^N + e^E + e^t) - t`` per row from the non-target log-sum-exp
    ``N``, the extra columns' ``E`` and the target logit ``t``; 0 where not valid."""
    if extra is not None:
        n = torch.logaddexp(n, extra)
    lse = torch.logaddexp(n, t)
    return torch.where(valid, lse - t, torch.zeros_like(lse))


@torch.no_grad()
def target_cosines(xn: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """No-grad ``cos(x_i, w_{y_i})`` (any value on rows with label -1)."""
    w0 = weight[labels.clamp_min(0)].to(xn.dtype)
    w0 = w0 / torch.linalg.vector_norm(w0, dim=1, keepdim=True).clamp_min(NORM_EPS)
    return torch.linalg.vecdot(xn.detach(), w0)


def has_extra(policy: MarginPolicy) -> bool:
    """Whether the policy contributes extra log-sum-exp columns."""
    return type(policy).extra_lse is not MarginPolicy.extra_lse
