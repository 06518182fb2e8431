"""Any logits objective trained with a sample-weighting policy (family
"robust", task "logits"): ``reweighted`` = ``objective`` per row, weighted by
the registered ``weighter`` (:mod:`losskit.weighting`: ``linupper``,
``quadratic``, ``extremes``, ``glow``), reduced once.

    loss = losskit.get("reweighted", objective="cross-entropy", weighter="linupper", burn_in=100)
    out = loss(logits, labels, sample_ids=idx)     # sample_ids: needed by GLOW only
    out.backward(); opt.step(); loss.step()         # step(): once per optimiser step (burn-in, GLOW's history)
    loss.end_epoch()                                # GLOW: at each epoch's end (a no-op otherwise)

``r`` and ``burn_in`` (``None``: the weighter's defaults) set those of Sow
et al.'s weighters; the weighter's state travels in ``state_dict()`` (as the
module's extra state).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from losskit.core.checks import check_hparam, check_int, check_reduction
from losskit.core.reduction import reduce_loss
from losskit.core.registry import get, register, spec
from losskit.weighting.loss_based import SOW_PAPER, LossReweighting

__all__ = ["ReweightedLoss"]


@register("reweighted", family="robust", task="logits", paper=SOW_PAPER,
          summary="A logits objective (default cross-entropy) weighted per sample by a registered weighter "
                  "(default Sow et al.'s LinUpper).")
class ReweightedLoss(nn.Module):
    """``reduce(w * l)`` with ``l = objective(logits, labels)`` per row and
    ``w = weighter(l.detach(), sample_ids)`` (see the module docstring)."""

    def __init__(self, objective: str = "cross-entropy", weighter: str = "linupper", r: float | None = None,
                 burn_in: int | None = None, reduction: str = "mean"):
        super().__init__()
        s = spec(objective, kind="objective")
        if s.task != "logits" or s.cls is type(self):
            raise ValueError(f"objective: expected a 'logits' objective other than 'reweighted', got {objective!r} "
                             f"(task {s.task!r})")
        spec(weighter, kind="weighter")
        self.reduction = check_reduction(reduction)
        kw: dict[str, Any] = {}
        if r is not None:
            kw["r"] = check_hparam("r", r, low=0.0, low_open=True)
        if burn_in is not None:
            kw["burn_in"] = check_int("burn_in", burn_in, low=0)
        self.base = get(objective, reduction="none")
        wcls = spec(weighter, kind="weighter").cls
        if kw and not issubclass(wcls, LossReweighting):
            raise ValueError(f"r, burn_in: only Sow et al.'s weighters (linupper, quadratic, extremes) take them; "
                             f"weighter {weighter!r} does not")
        self.weighter = get(weighter, **kw)

    def forward(self, logits: Tensor, labels: Tensor, sample_ids: Tensor | None = None,
                sample_weight: Tensor | None = None) -> Tensor:
        per = self.base(logits, labels)
        w = self.weighter(per.detach(), sample_ids)
        if sample_weight is not None:      # the caller's weights multiply the policy's (checked by reduce_loss)
            return reduce_loss(per * w, self.reduction, sample_weight)
        if self.reduction == "none" or per.dim() != 1:
            return reduce_loss(per, self.reduction, w, checked=True)   # the policy's weights: finite, >= 0
        # reduce_loss's rule (sum_i w_i l_i, over B for 'mean') as one dot product: one autograd node
        # instead of three (mul, sum, div); the 1/B goes on the detached weights
        return torch.dot(per, w if self.reduction == "sum" else w * (1.0 / max(per.shape[0], 1)))

    def step(self) -> None:
        """Once after each optimiser step."""
        self.weighter.step()

    def end_epoch(self) -> None:
        if hasattr(self.weighter, "end_epoch"):
            self.weighter.end_epoch()

    def get_extra_state(self) -> dict[str, Any]:
        return {"weighter": self.weighter.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.weighter.load_state_dict(state["weighter"])
