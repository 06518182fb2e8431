"""Dynamic loss-based sample reweighting (Sow, Woisetschlaeger, Bulusu, Wang,
Jacobsen, Liang, "Dynamic Loss-Based Sample Reweighting for Improved Large
Language Model Pretraining", ICLR 2025, arXiv:2502.06733, Algorithm 1, "Fully
Online Instance Reweighting"; formulas as in the project notes,
preference-and-weighting.md section 1, checked against the official code
sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025
(``src/trainer.py``, ``h_func``, ``f_func_*``, ``g_func`` and the training step).

Over the **global** batch (the losses of every rank, gathered; ``N`` rows)::

    h_i = 2 delta (l_i - (lmax + lmin) / 2) / max(lmax - lmin, 1e-6)     # losses mapped to [-delta, delta]
    f_i = LinUpper: min(h_i + delta, delta)     (down-weights the easiest samples)
          Quadratic: 1 - h_i^2 / delta^2         (down-weights both extremes; the code calls it "mid")
          Extremes:  |h_i|                       (up-weights both extremes)
    p   = softmax((f - max f) / r)               # argmax_w  sum_i w_i f_i - r KL(w || uniform)

and the weight of row ``i`` is ``w_i = N p_i`` (mean 1 over the global
batch, so ``mean(w * l)`` is the paper's ``sum_i p_i l_i`` and uniform
weights are the plain mean).  ``r -> inf`` gives uniform weights;
``burn_in`` optimiser steps (counted by :meth:`step`) use uniform weights
first (the paper: 1000).  Weights are computed without gradient.

**Token counts.**  For a sequence loss (``l_i`` the mean token cross-entropy
of sequence ``i``) pass ``lengths`` (``n_i``, the non-ignored tokens): the
weights become ``w_i = N p_i n_i / mean(n)``, so uniform ``p`` gives the
token-weighted mean, as the official trainer's ``sum_i p_i (n_i / sum n) l_i
x W x B`` does.  One difference: the trainer divides by its *local* token
total ``sum n`` on each rank; here the token mean runs over the global batch
(an all-reduce), so two ranks give exactly the weights of one process on the
joined batch (the trainer's differ when the ranks' token totals differ).

**Across ranks.**  With ``process_group`` (or the default group when
torch.distributed is initialised) the losses are all-gathered
(:func:`losskit.distributed.collectives.all_gather_no_grad`, unequal row
counts allowed), the weights computed on the global batch and each rank gets
the slice of its own rows.  Each rank's ``mean(w * l)`` over its rows, averaged
by DDP, is then the single-process loss of the joined batch when the ranks'
batch sizes are equal (docs/design.md, "Distributed").
"""

from __future__ import annotations

import torch
from torch import Tensor

from losskit.core.checks import check_choice, check_hparam, check_int, check_vector
from losskit.core.registry import Paper, register
from losskit.distributed.collectives import all_gather_no_grad, all_reduce_sum, gather_sizes, world
from losskit.weighting.base import Weighter

__all__ = ["LossReweighting", "LinUpper", "Quadratic", "Extremes", "loss_reweighting_weights", "STRATEGIES",
           "SOW_PAPER"]

SOW_PAPER = Paper("Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining", 2025,
                  "2502.06733")

STRATEGIES = ("linupper", "quadratic", "extremes")
#: the denominator floor of h (the official h_func's max(lmax - lmin, 1e-6))
RANGE_EPS = 1e-6


def _scores(h: Tensor, strategy: str, delta: float) -> Tensor:
    if strategy == "linupper":
        return torch.minimum(h + delta, torch.full_like(h, delta))
    if strategy == "quadratic":
        return 1 - h * h / (delta * delta)
    return h.abs()


def loss_reweighting_weights(losses: Tensor, strategy: str = "linupper", r: float = 1.0,
                             delta: float = 1.0) -> Tensor:
    """The weights ``N p`` (mean 1) of one global batch of losses ``[N]`` (no
    burn-in, no token counts, no gradient)."""
    strategy = check_choice("strategy", strategy, STRATEGIES)
    if losses.numel() == 0:
        return torch.ones_like(losses)
    lw = losses.detach().to(torch.float64 if losses.dtype == torch.float64 else torch.float32)
    lmin, lmax = lw.min(), lw.max()
    h = 2 * delta * (lw - (lmax + lmin) / 2) / torch.clamp(lmax - lmin, min=RANGE_EPS)
    f = _scores(h, strategy, delta)
    p = torch.softmax((f - f.max()) / r, dim=0)
    return (p * losses.shape[0]).to(losses.dtype)


class LossReweighting(Weighter):
    """Sow et al.'s loss-based weights (see the module docstring).

    ``strategy``: ``'linupper'`` (default), ``'quadratic'`` or ``'extremes'``;
    ``r`` > 0 the KL temperature (the paper: 1.0 for Quadratic at 124M, 0.4 for
    LinUpper/Extremes in the larger runs); ``delta`` > 0 the range of ``h``
    (1, fixed in the official code); ``burn_in`` optimiser steps with uniform
    weights (1000 in the paper); ``process_group``: the ranks whose batches form
    the global batch (``None``: the default group when initialised, else this
    process alone).
    """

    def __init__(self, strategy: str = "linupper", r: float = 0.4, delta: float = 1.0, burn_in: int = 1000,
                 process_group=None):
        super().__init__()
        self.strategy = check_choice("strategy", strategy, STRATEGIES)
        self.r = check_hparam("r", r, low=0.0, low_open=True)
        self.delta = check_hparam("delta", delta, low=0.0, low_open=True)
        self.burn_in = check_int("burn_in", burn_in, low=0)
        self.process_group = process_group

    def compute(self, losses: Tensor, ids: list[int] | None, lengths: Tensor | None = None) -> Tensor:
        n_local = losses.shape[0]
        if lengths is not None:
            lengths = check_vector(lengths, "lengths", n_local, losses, floating=False, finite=False,
                                   what="one token count per sequence")
            lengths = lengths.to(losses.dtype)
            if lengths.numel() and bool((lengths < 0).any()):
                raise ValueError(f"lengths: expected token counts >= 0, got min {float(lengths.min())}")
        w_size, rank = world(self.process_group)
        if w_size > 1:
            sizes = gather_sizes(n_local, losses.device, self.process_group)
            glob = all_gather_no_grad(losses, self.process_group, sizes)
            start = sum(sizes[:rank])
        else:
            glob, start = losses, 0
        if self.num_steps < self.burn_in or glob.numel() == 0:
            w = torch.ones_like(losses)
        else:
            w = loss_reweighting_weights(glob, self.strategy, self.r, self.delta)[start:start + n_local]
        if lengths is not None:
            total = all_reduce_sum(lengths.sum().reshape(1), self.process_group) if w_size > 1 else lengths.sum()
            count = sum(sizes) if w_size > 1 else n_local
            mean_n = (total.reshape(()) / max(count, 1)).clamp_min(torch.finfo(lengths.dtype).tiny)
            w = w * lengths / mean_n
        return w


@register("linupper", family="robust", kind="weighter", paper=SOW_PAPER,
          summary="Sow et al.'s LinUpper: softmax(min(h + delta, delta) / r) over the global batch; "
                  "down-weights the lowest losses.")
class LinUpper(LossReweighting):
    def __init__(self, r: float = 0.4, delta: float = 1.0, burn_in: int = 1000, process_group=None):
        super().__init__("linupper", r, delta, burn_in, process_group)


@register("quadratic", family="robust", kind="weighter", paper=SOW_PAPER,
          summary="Sow et al.'s Quadratic: softmax((1 - h^2 / delta^2) / r) over the global batch; "
                  "down-weights both the lowest and the highest losses.")
class Quadratic(LossReweighting):
    def __init__(self, r: float = 1.0, delta: float = 1.0, burn_in: int = 1000, process_group=None):
        super().__init__("quadratic", r, delta, burn_in, process_group)


@register("extremes", family="robust", kind="weighter", paper=SOW_PAPER,
          summary="Sow et al.'s Extremes: softmax(|h| / r) over the global batch; up-weights both the "
                  "lowest and the highest losses.")
class Extremes(LossReweighting):
    def __init__(self, r: float = 0.4, delta: float = 1.0, burn_in: int = 1000, process_group=None):
        super().__init__("extremes", r, delta, burn_in, process_group)

