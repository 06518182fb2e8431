"""``head='chunked'``: never builds ``B x C``: the chunked non-target
log-sum-exp kernel (:mod:`losskit.kernels.chunked_lse`); same numbers as dense."""

from __future__ import annotations

import torch
from torch import Tensor

from losskit.heads.backends.base import HeadBackend, prepare_policy, row_loss, target_cosines, target_logits
from losskit.kernels.chunked_lse import nontarget_lse, nontarget_lse_nograd

__all__ = ["ChunkedBackend"]


class ChunkedBackend(HeadBackend):
    name = "chunked"

    def per_row(self, head, xn: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        valid = labels >= 0
        ly = torch.where(valid, labels, torch.full_like(labels, -1))
        chunk = head.chunk_for(xn.shape[0], weight.shape[0])

        def nt_lse(rows: Tensor, s: float) -> Tensor:
            return nontarget_lse_nograd(xn[rows], weight, ly[rows], s, chunk)

        batch = prepare_policy(head, target_cosines(xn, weight, labels), valid, nt_lse)
        n, cos_y = nontarget_lse(xn, weight, ly, batch.scale, chunk, return_target=True)
        t = target_logits(head.policy, cos_y.clamp(-1.0, 1.0), valid, batch)
        return row_loss(n, t, head.policy.extra_lse(xn, labels, batch), valid)
