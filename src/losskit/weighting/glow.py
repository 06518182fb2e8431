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

import math
from typing import Any

import torch
from torch import Tensor

from losskit.core.checks import check_finite, check_hparam, check_int
from losskit.core.registry import Paper, register
from losskit.weighting.base import Weighter

__all__ = ["GLOW", "glow_weights", "GLOW_PAPER", "MAX_ID"]

GLOW_PAPER = Paper("Learning from Mistakes: Negative Reasoning Samples Enhance Out-of-Domain Generalization", 2026,
                   "2601.04992")


def glow_weights(gain: Tensor, alpha: float = 1.0, beta: float = 20.0, w_min: float = 0.5,
                 w_max: float = 5.0) -> Tensor:
    """``clip(alpha (1 - sigma(beta gain)), w_min, w_max)``, detached."""
    return (alpha * torch.sigmoid(-beta * gain.detach())).clamp(w_min, w_max)


#: ids at or above this are refused (the history is a table of ``largest id + 1`` float32 entries)
MAX_ID = 1 << 28


@register("glow", family="robust", kind="weighter", paper=GLOW_PAPER,
          summary="GLOW: per-sample weights from the loss gain since the sample's previous visit.")
class GLOW(Weighter):
    """Per-sample GLOW weights with an id-keyed loss history (see the module docstring).

    ``alpha`` 1 and ``beta`` 20 are the paper's math defaults (beta 5 for MMLU);
    ``w_min``/``w_max`` 0.5/5 the official clip; ``warmup_epochs`` 1 keeps
    ``w = 1`` for the first epoch.

    The history is a table indexed by sample id (ids are dataset indices in
    ``[0, 2^28)``; the table grows to the largest id seen + 1: float32 losses,
    as the official code's ``.item()`` of a float32 loss, NaN for none yet), on
    the losses' device: a call is a few ``[B]`` tensor operations and one host
    read (the ids' range, which also checks the losses through their sum), no
    Python loop over samples.  :attr:`history` and :attr:`pending` give
    ``{id: loss}`` snapshots.
    """

    needs_ids = True
    checks_finite = True
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
        self._loss = torch.zeros(0)                        # [table] float32: the last committed loss per id, NaN: none
        self._staged: list[tuple[Tensor, Tensor]] = []     # this step's (ids, losses), in call order

    # -- the table ------------------------------------------------------------------------------
    def _reserve(self, size: int, device: torch.device) -> None:
        """The table on ``device`` with at least ``size`` entries (grown geometrically, NaN-filled)."""
        if self._loss.device != device:
            self._loss = self._loss.to(device)
            self._staged = [(i.to(device), v.to(device)) for i, v in self._staged]
        n = self._loss.shape[0]
        if size > n:
            m = max(size, 2 * n, 1024)
            self._loss = torch.cat([self._loss, self._loss.new_full((m - n,), math.nan)])

    def _commit(self) -> None:
        if not self._staged:
            return
        if len(self._staged) == 1:
            ids, vals = self._staged[0]
        else:                                   # in call order: a later loss of the same id wins
            ids = torch.cat([i for i, _ in self._staged])
            vals = torch.cat([v for _, v in self._staged])
        self._loss.index_put_((ids,), vals)
        self._staged.clear()

    # -- weights --------------------------------------------------------------------------------
    def compute(self, losses: Tensor, ids: Tensor, record: bool = True) -> Tensor:
        """Weights ``[B]``; stages the losses when ``record`` (committed by :meth:`step`)."""
        cur = losses
        if cur.numel() == 0:
            return torch.ones_like(cur)
        lo, hi = torch.aminmax(ids)
        lo, hi, total = int(lo), int(hi), float(cur.sum(dtype=torch.float64))    # host reads (no device sync on CPU)
        if not math.isfinite(total):
            check_finite(cur, "losses")     # names the index (a finite batch whose sum overflows passes)
        if lo < 0 or hi >= MAX_ID:
            raise ValueError(f"sample_ids: expected ids in [0, 2^28) (dataset indices: GLOW keeps a table of "
                             f"largest id + 1 losses), got {int(lo)}..{int(hi)}")
        self._reserve(int(hi) + 1, cur.device)
        if self.epoch < self.warmup_epochs:
            w = torch.ones_like(cur)
        else:
            mean = total / cur.shape[0]
            prev = self._loss[ids]
            prev = (prev if cur.dtype == torch.float32 else prev.to(cur.dtype)).nan_to_num_(nan=mean)     # no history yet: the batch mean
            # glow_weights(prev - cur), in place: clip(alpha sigmoid(beta (cur - prev)), w_min, w_max)
            w = torch.sub(cur, prev).mul_(self.beta).sigmoid_()
            w = (w if self.alpha == 1.0 else w.mul_(self.alpha)).clamp_(self.w_min, self.w_max)
        if record:    # copies: the caller may reuse its tensors; within one call a repeated id keeps one loss
            self._staged.append((ids.clone(), cur.clone() if cur.dtype == torch.float32 else cur.float()))
        return w

    # -- bookkeeping ----------------------------------------------------------------------------
    def step(self) -> None:
        """Commit the staged losses of this optimiser step into the history."""
        super().step()
        self._commit()

    def end_epoch(self) -> None:
        """Commit the staged losses and advance the epoch (no optimiser step is counted)."""
        self._commit()
        self.epoch += 1

    def discard_staged(self) -> None:
        """Drop the losses staged since the last :meth:`step` (they never become history)."""
        self._staged.clear()

    @property
    def history(self) -> dict[int, float]:
        """``{id: loss}``: a snapshot of the committed losses."""
        ids = (~self._loss.isnan()).nonzero().squeeze(1)
        return dict(zip(ids.tolist(), self._loss[ids].double().tolist()))

    @property
    def pending(self) -> dict[int, float]:
        """``{id: loss}``: a snapshot of this step's staged losses (a later one of an id wins)."""
        out: dict[int, float] = {}
        for i, v in self._staged:
            out.update(zip(i.tolist(), v.double().tolist()))
        return out

    def extra_state(self) -> dict[str, Any]:
        """The epoch, the history and the staged losses (``ids`` int64 and ``losses`` float64, on the CPU)."""
        def pack(d: dict[int, float]) -> dict[str, Tensor]:
            return {"ids": torch.tensor(list(d.keys()), dtype=torch.long),
                    "losses": torch.tensor(list(d.values()), dtype=torch.float64)}

        return {"epoch": self.epoch, "history": pack(self.history), "pending": pack(self.pending)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        def ids_vals(d: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            return d["ids"].to(torch.long).reshape(-1), d["losses"].to(torch.float32).reshape(-1)

        device = self._loss.device
        hist_ids, hist_vals = ids_vals(state["history"])
        pend_ids, pend_vals = ids_vals(state["pending"])
        both = torch.cat([hist_ids, pend_ids])
        if both.numel() and (int(both.min()) < 0 or int(both.max()) >= MAX_ID):
            raise ValueError("GLOW.load_extra_state: the state holds ids outside [0, 2^28)")
        self.epoch = int(state["epoch"])
        self._loss = torch.zeros(0, device=device)
        self._staged = []
        self._reserve(int(both.max()) + 1 if both.numel() else 0, device)
        self._staged = [(hist_ids.to(device), hist_vals.to(device))]
        self._commit()
        if pend_ids.numel():
            self._staged = [(pend_ids.to(device), pend_vals.to(device))]
