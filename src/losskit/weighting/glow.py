"""GLOW: gain-based per-sample loss weighting for supervised fine-tuning.

Tian et al., "Learning from Mistakes: Negative Reasoning Samples Enhance
Out-of-Domain Generalization" (2026, arXiv:2601.04992); code Eureka-Maggie/GLOW.

For each sample (keyed by a stable integer id) with per-sample loss ``l_i``
(mean completion-token cross-entropy)::

    D_i = l_i(previous visit) - l_i(now)       # the gain; batch mean of l when no history
    w_i = clip(alpha (1 - sigma(beta D_i)), w_min, w_max)   # detached
    L   = mean_i(w_i l_i)                       # w = 1 during the first epoch

``D = 0`` gives ``w = alpha / 2``: a sample that stopped improving keeps half
weight, one that got worse gains weight, one that improved a lot loses it.

Gradient accumulation.  The official code writes each micro-batch's losses
into a global dictionary immediately, so a sample that occurs in two
micro-batches of the same optimiser step is compared with a loss measured
with the *same* parameters (``D ~ 0``).  Here the losses of a step are only
*staged*; :meth:`GLOW.step` (call it once after each ``optimizer.step()``)
commits them.  All micro-batches of one step therefore read the same
history, whatever their order, and the weights equal those of one large
batch except for the batch-mean fallback, which stays per micro-batch (as
the official code's).  :meth:`end_epoch` commits and advances the epoch.

``state_dict()`` / ``load_state_dict()`` carry the history, the staged
losses, the epoch and the optimiser-step counters, so a resumed run reproduces the weights (the
official code keeps the history in a module-level dict that is lost on
resume).  Hyperparameters are never loaded: they are the constructed
object's.  The state records the ones it was saved with, and loading it into
a GLOW constructed with others raises an error naming each mismatch
(``strict=False`` keeps the constructed ones silently).

Registered as the weighter ``glow`` (family ``robust``: it reweights the
training loss per sample): ``losskit.get("glow", alpha=1.0, beta=20.0)``.
It implements the weighting interface of :mod:`losskit.weighting.base`:
``glow(losses, ids)`` returns the detached weights, ``glow.loss(losses, ids)``
the weighted mean ``mean(w * l)``.

    glow = GLOW(alpha=1.0, beta=20.0)
    for epoch in range(E):
        for batch in loader:
            for micro in split(batch):
                per_sample = seq_mean_ce(model, micro)          # [b], with graph
                (glow.loss(per_sample, micro["sample_id"]) / n_micro).backward()
            opt.step(); opt.zero_grad(); glow.step()
        glow.end_epoch()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from losskit.core.checks import check_hparam, check_int
from losskit.core.registry import Paper, register
from losskit.weighting.base import Weighter

__all__ = ["GLOW", "glow_weights", "GLOW_PAPER"]

GLOW_PAPER = Paper("Learning from Mistakes: Negative Reasoning Samples Enhance Out-of-Domain Generalization", 2026,
                   "2601.04992")


def glow_weights(gain: Tensor, alpha: float = 1.0, beta: float = 20.0, w_min: float = 0.5,
                 w_max: float = 5.0) -> Tensor:
    """``clip(alpha (1 - sigma(beta gain)), w_min, w_max)``, detached."""
    return (alpha * torch.sigmoid(-beta * gain.detach())).clamp(w_min, w_max)


@register("glow", family="robust", kind="weighter", paper=GLOW_PAPER,
          summary="GLOW: per-sample weights from the loss gain since the sample's previous visit.")
class GLOW(Weighter):
    """Per-sample GLOW weights with an id-keyed loss history (see the module docstring).

    ``alpha`` 1 and ``beta`` 20 are the paper's math defaults (beta 5 for MMLU);
    ``w_min``/``w_max`` 0.5/5 the official clip; ``warmup_epochs`` 1 keeps
    ``w = 1`` for the first epoch.
    """

    needs_ids = True
    state_keys = ("epoch", "history", "pending")

    def __init__(self, alpha: float = 1.0, beta: float = 20.0, w_min: float = 0.5, w_max: float = 5.0,
                 warmup_epochs: int = 1):
        super().__init__()
        self.alpha = check_hparam("alpha", alpha, low=0.0, low_open=True)
        self.beta = check_hparam("beta", beta, low=0.0, low_open=True)
        self.w_min = check_hparam("w_min", w_min, low=0.0)
        self.w_max = check_hparam("w_max", w_max, low=self.w_min)
        self.warmup_epochs = check_int("warmup_epochs", warmup_epochs, low=0)
        self.epoch = 0
        self.history: dict[int, float] = {}
        self.pending: dict[int, float] = {}

    # -- weights --------------------------------------------------------------------------------
    def compute(self, losses: Tensor, ids: list[int], record: bool = True) -> Tensor:
        """Weights ``[B]``; stages the losses when ``record`` (committed by :meth:`step`)."""
        cur = losses
        if self.epoch < self.warmup_epochs or cur.numel() == 0:
            w = torch.ones_like(cur)
        else:
            fallback = float(cur.float().mean())
            prev = torch.tensor([self.history.get(i, fallback) for i in ids], dtype=cur.dtype, device=cur.device)
            w = glow_weights(prev - cur, self.alpha, self.beta, self.w_min, self.w_max)
        if record:
            for i, v in zip(ids, cur.float().tolist()):
                self.pending[i] = v
        return w

    # -- bookkeeping ----------------------------------------------------------------------------
    def step(self) -> None:
        """Commit the staged losses of this optimiser step into the history."""
        super().step()
        self.history.update(self.pending)
        self.pending.clear()

    def end_epoch(self) -> None:
        """Commit the staged losses and advance the epoch (no optimiser step is counted)."""
        self.history.update(self.pending)
        self.pending.clear()
        self.epoch += 1

    def extra_state(self) -> dict[str, Any]:
        """The epoch, the history and the staged losses."""
        def pack(d: dict[int, float]) -> dict[str, Tensor]:
            return {"ids": torch.tensor(list(d.keys()), dtype=torch.long),
                    "losses": torch.tensor(list(d.values()), dtype=torch.float64)}

        return {"epoch": self.epoch, "history": pack(self.history), "pending": pack(self.pending)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        def unpack(d: dict[str, Tensor]) -> dict[int, float]:
            return {int(i): float(v) for i, v in zip(d["ids"].tolist(), d["losses"].tolist())}

        self.epoch = int(state["epoch"])
        self.history = unpack(state["history"])
        self.pending = unpack(state["pending"])
