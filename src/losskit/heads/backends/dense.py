"""``head='dense'``: the ``B x C`` cosine matrix, the readable reference.

No host synchronisation with ``losskit.tensor_checks(False)`` for policies
whose phase 1 has none (every one but CFCD and ElasticFace): it compiles
with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import Tensor

from losskit.functional import margins as FM
from losskit.heads.backends.base import HeadBackend, prepare_policy

__all__ = ["DenseBackend"]


class DenseBackend(HeadBackend):
    name = "dense"

    def per_row(self, head, xn: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        valid = labels >= 0
        yc = labels.clamp_min(0)
        with torch.autocast(device_type=xn.device.type, enabled=False):
            cos = torch.mm(xn, Fn.normalize(weight.to(xn.dtype), dim=1).t())
        cos_y = cos.gather(1, yc[:, None]).squeeze(1)

        def nt_lse(rows: Tensor, s: float) -> Tensor:
            with torch.no_grad():
                lg = (cos[rows] * s).scatter(1, yc[rows][:, None], float("-inf"))
                return torch.logsumexp(lg, 1)

        batch = prepare_policy(head, cos_y, valid, nt_lse)
        logits = FM.apply_target(cos, labels, head.policy.target(cos_y, batch), batch.scale)
        lse = torch.logsumexp(logits, 1)
        extra = head.policy.extra_lse(xn, labels, batch)
        if extra is not None:
            lse = torch.logaddexp(lse, extra)
        tgt = logits.gather(1, yc[:, None]).squeeze(1)
        return torch.where(valid, lse - tgt, torch.zeros_like(lse))
