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
losses and the epoch counter, so a resumed run reproduces the weights (the
official code keeps the history in a module-level dict that is lost on
resume).

    glow = GLOW(alpha=1.0, beta=20.0)
    for epoch in range(E):
        for batch in loader:
            for micro in split(batch):
                per_sample = seq_mean_ce(model, micro)          # [b], with graph
                (glow(per_sample, micro["sample_id"]) / n_micro).backward()
            opt.step(); opt.zero_grad(); glow.step()
        glow.end_epoch()
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from losskit._checks import check_finite, check_reduction, reduce_loss

__all__ = ["GLOW", "glow_weights"]


def glow_weights(gain: Tensor, alpha: float = 1.0, beta: float = 20.0, w_min: float = 0.5,
                 w_max: float = 5.0) -> Tensor:
    """``clip(alpha (1 - sigma(beta gain)), w_min, w_max)``, detached."""
    return (alpha * torch.sigmoid(-beta * gain.detach())).clamp(w_min, w_max)


def _ids(sample_ids: Tensor | Sequence[int], n: int) -> list[int]:
    if isinstance(sample_ids, Tensor):
        if sample_ids.dim() != 1 or sample_ids.is_floating_point():
            raise ValueError(f"sample_ids: expected a [B] integer tensor, got shape {list(sample_ids.shape)} "
                             f"dtype {sample_ids.dtype}")
        ids = [int(v) for v in sample_ids.tolist()]
    else:
        ids = [int(v) for v in sample_ids]
    if len(ids) != n:
        raise ValueError(f"sample_ids: expected {n} ids (one per loss), got {len(ids)}")
    return ids


class GLOW:
    """Per-sample GLOW weights with an id-keyed loss history (see the module docstring).

    ``alpha`` 1 and ``beta`` 20 are the paper's math defaults (beta 5 for MMLU);
    ``w_min``/``w_max`` 0.5/5 the official clip; ``warmup_epochs`` 1 keeps
    ``w = 1`` for the first epoch.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 20.0, w_min: float = 0.5, w_max: float = 5.0,
                 warmup_epochs: int = 1):
        if not (alpha > 0 and beta > 0 and 0 <= w_min <= w_max and math.isfinite(w_max)):
            raise ValueError(f"GLOW needs alpha > 0, beta > 0, 0 <= w_min <= w_max < inf; got alpha={alpha}, "
                             f"beta={beta}, w_min={w_min}, w_max={w_max}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs: expected >= 0, got {warmup_epochs}")
        self.alpha, self.beta, self.w_min, self.w_max = float(alpha), float(beta), float(w_min), float(w_max)
        self.warmup_epochs = int(warmup_epochs)
        self.epoch = 0
        self.history: dict[int, float] = {}
        self.pending: dict[int, float] = {}

    # -- weights --------------------------------------------------------------------------------
    def weights(self, losses: Tensor, sample_ids: Tensor | Sequence[int], record: bool = True) -> Tensor:
        """Weights ``[B]`` (detached, losses' dtype/device); stages the losses when ``record``."""
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            raise ValueError(f"losses: expected a [B] tensor of per-sample losses, got "
                             f"{list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}")
        check_finite(losses, "losses")
        ids = _ids(sample_ids, losses.shape[0])
        cur = losses.detach()
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

    def __call__(self, losses: Tensor, sample_ids: Tensor | Sequence[int], reduction: str = "mean") -> Tensor:
        """``mean(w * losses)`` (or ``'sum'``/``'none'``) with the GLOW weights."""
        check_reduction(reduction)
        w = self.weights(losses, sample_ids)
        return reduce_loss(losses, reduction, w)

    # -- bookkeeping ----------------------------------------------------------------------------
    def step(self) -> None:
        """Commit the staged losses of this optimiser step into the history."""
        self.history.update(self.pending)
        self.pending.clear()

    def end_epoch(self) -> None:
        self.step()
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        def pack(d: dict[int, float]) -> dict[str, Tensor]:
            return {"ids": torch.tensor(list(d.keys()), dtype=torch.long),
                    "losses": torch.tensor(list(d.values()), dtype=torch.float64)}

        return {"epoch": self.epoch, "history": pack(self.history), "pending": pack(self.pending),
                "hparams": {"alpha": self.alpha, "beta": self.beta, "w_min": self.w_min, "w_max": self.w_max,
                            "warmup_epochs": self.warmup_epochs}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def unpack(d: dict[str, Tensor]) -> dict[int, float]:
            return {int(i): float(v) for i, v in zip(d["ids"].tolist(), d["losses"].tolist())}

        self.epoch = int(state["epoch"])
        self.history = unpack(state["history"])
        self.pending = unpack(state["pending"])
        for k, v in state.get("hparams", {}).items():
            setattr(self, k, v)
