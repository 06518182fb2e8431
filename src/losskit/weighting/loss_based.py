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

import math

import torch
import torch.distributed as dist
from torch import Tensor

from losskit.core.checks import check_choice, check_finite, check_hparam, check_int, check_vector, \
    tensor_checks_enabled
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


def _weights_from_range(lw: Tensor, lo, hi, strategy: str, r: float, delta: float) -> Tensor:
    """``N softmax(f / r)`` from the losses ``lw`` (compute dtype) and their range ``lo``, ``hi``
    (Python floats, or 0-d tensors: no host read).

    The softmax is shift-invariant, so the constants of ``f`` are dropped and
    ``f / r`` is written as ``k * s(l - mid)`` with ``mid = (lo + hi) / 2``,
    ``a = 2 delta / max(hi - lo, 1e-6)`` (``h = a (l - mid)``) and:
    LinUpper ``min(h + delta, delta) = delta + a min(l - mid, 0)``: ``s = min(t, 0)``, ``k = a / r``;
    Quadratic ``1 - h^2 / delta^2``: ``s = t^2``, ``k = -a^2 / (delta^2 r)``;
    Extremes ``|h|``: ``s = |t|``, ``k = a / r``.  Five ``[N]`` operations."""
    n = lw.shape[0]
    if isinstance(lo, Tensor):
        a = (2.0 * delta) / torch.clamp(hi - lo, min=RANGE_EPS)
        mid = (lo + hi) * 0.5
    else:
        a = 2.0 * delta / max(hi - lo, RANGE_EPS)
        mid = (lo + hi) * 0.5
    t = lw - mid
    if strategy == "linupper":
        t.clamp_max_(0.0)
        k = a / r
    elif strategy == "quadratic":
        t.square_()
        k = -(a * a) / (delta * delta * r)
    else:
        t.abs_()
        k = a / r
    p = torch.softmax(t.mul_(k), dim=0)
    return p.mul_(n)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_reweighting_weights(losses: Tensor, strategy: str = "linupper", r: float = 1.0,
                             delta: float = 1.0) -> Tensor:
    """The weights ``N p`` (mean 1) of one global batch of losses ``[N]`` (no
    burn-in, no token counts, no gradient, no host read)."""
    strategy = check_choice("strategy", strategy, STRATEGIES)
    if losses.numel() == 0:
        return torch.ones_like(losses)
    lw = losses.detach().to(_compute_dtype(losses.dtype))
    lo, hi = torch.aminmax(lw)
    return _weights_from_range(lw, lo, hi, strategy, r, delta).to(losses.dtype)


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

    #: the finiteness of the losses is checked here, from their range (one host read, no [B] scan)
    checks_finite = True

    def compute(self, losses: Tensor, ids: Tensor | None, lengths: Tensor | None = None) -> Tensor:
        n_local = losses.shape[0]
        if lengths is not None:
            lengths = check_vector(lengths, "lengths", n_local, losses, floating=False, finite=False,
                                   what="one token count per sequence")
            lengths = lengths.to(losses.dtype)
            if lengths.numel() and bool((lengths < 0).any()):
                raise ValueError(f"lengths: expected token counts >= 0, got min {float(lengths.min())}")
        w_size, rank = world(self.process_group) if self.process_group is not None or _dist_on() else (1, 0)
        if w_size > 1:
            sizes = gather_sizes(n_local, losses.device, self.process_group)
            glob = all_gather_no_grad(losses, self.process_group, sizes)
            start = sum(sizes[:rank])
        else:
            glob, start = losses, 0
        if self.num_steps < self.burn_in or glob.numel() == 0:
            check_finite(losses, "losses")
            w = torch.ones_like(losses)
        else:
            lw = glob.to(_compute_dtype(glob.dtype))
            lo, hi = torch.aminmax(lw)
            if tensor_checks_enabled() or lw.device.type == "cpu":
                # one read of the range: it checks the losses (NaN and inf propagate to the min or max)
                # and makes the scalar arithmetic Python's; on CPU there is no device to wait for
                lo, hi = float(lo), float(hi)
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    check_finite(losses, "losses")          # names the index when the bad loss is ours
                    raise ValueError("losses: expected finite values, got a NaN or inf loss on another rank")
            w = _weights_from_range(lw, lo, hi, self.strategy, self.r, self.delta)
            w = w[start:start + n_local] if w_size > 1 else w
        if lengths is not None:
            total = all_reduce_sum(lengths.sum().reshape(1), self.process_group) if w_size > 1 else lengths.sum()
            count = sum(sizes) if w_size > 1 else n_local
            mean_n = (total.reshape(()) / max(count, 1)).clamp_min(torch.finfo(lengths.dtype).tiny)
            w = w * lengths / mean_n
        return w


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


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

