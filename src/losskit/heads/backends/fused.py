"""``head='fused'``: row blocks spanning all classes, gradients computed in
forward (:mod:`losskit.kernels.fused_margin_ce`, 3 GEMMs).  It needs the
row coefficients of a scalar loss at forward time
(:func:`losskit.core.reduction.row_coefficients`): 'mean' or 'sum', sample
weights without gradient, a gradient needed; otherwise it runs the chunked
backend (same numbers)."""

from __future__ import annotations

import torch
from torch import Tensor

from losskit.core.checks import tensor_checks_enabled
from losskit.core.reduction import row_coefficients
from losskit.functional.comp_sum import comp_sum_from_ce, comp_sum_rows
from losskit.heads.backends.base import HeadBackend, has_extra, prepare_policy, target_cosines, target_logits
from losskit.heads.backends.chunked import ChunkedBackend
from losskit.kernels.chunked_lse import nontarget_lse_nograd
from losskit.kernels.fused_margin_ce import fused_margin_ce

__all__ = ["FusedBackend"]


def sync_allowed() -> bool:
    return tensor_checks_enabled() and not torch.compiler.is_compiling()


class FusedBackend(HeadBackend):
    name = "fused"
    fallback = ChunkedBackend()

    @staticmethod
    def applies(xn: Tensor, weight: Tensor, reduction: str, sample_weight: Tensor | None) -> bool:
        return (reduction != "none" and torch.is_grad_enabled() and (xn.requires_grad or weight.requires_grad)
                and (sample_weight is None or not sample_weight.requires_grad))

    def per_row(self, head, xn, weight, labels):
        return self.fallback.per_row(head, xn, weight, labels)

    def loss(self, head, xn: Tensor, weight: Tensor, labels: Tensor, reduction: str,
             sample_weight: Tensor | None) -> Tensor:
        if not self.applies(xn, weight, reduction, sample_weight):
            return self.fallback.loss(head, xn, weight, labels, reduction, sample_weight)
        B = xn.shape[0]
        coef = row_coefficients(B, reduction, None if sample_weight is None else sample_weight.detach(),
                                dtype=xn.dtype, device=xn.device)
        valid = labels >= 0
        ly = torch.where(valid, labels, torch.full_like(labels, -1))
        chunk = head.chunk_for(B, weight.shape[0])
        policy = head.policy

        def nt_lse(rows: Tensor, s: float) -> Tensor:
            return nontarget_lse_nograd(xn[rows], weight, ly[rows], s, chunk)

        batch = prepare_policy(head, target_cosines(xn, weight, labels), valid, nt_lse)

        def target_fn(cos_y: Tensor) -> Tensor:
            return target_logits(policy, cos_y, valid, batch)

        extra_fn = (lambda x: policy.extra_lse(x, labels, batch)) if has_extra(policy) else None
        tau = getattr(head, "tau", 1.0)
        row_fn = None if tau == 1.0 else (lambda ce: comp_sum_from_ce(ce, tau))
        out = fused_margin_ce(xn, weight, ly, coef, batch.scale, target_fn, extra_fn, head.row_chunk_size, row_fn)
        if row_fn is not None and tau < 1.0 and sync_allowed() and not bool(torch.isfinite(out)):
            comp_sum_rows(torch.full((1,), float("inf")), tau)   # the overflow error of comp_sum_rows
        return out.to(xn.dtype)
