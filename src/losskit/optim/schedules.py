"""Learning-rate schedules from "When, Why and How Much? Adaptive Learning Rate
Scheduling by Refinement" (Defazio, Cutkosky, Mehta, Mishchenko, 2023).

* :class:`LinearDecayLR`: linear warmup, then linear decay to 0 at the last
  step: with ``W`` warmup steps and ``T`` steps in all, the learning rate of
  step ``t`` (0-based) is ``base (t + 1) / (W + 1)`` for ``t < W`` and
  ``base (T - 1 - t) / (T - 1 - W)`` from ``t = W`` to ``t = T - 1``
  (0 afterwards).  ``T = 10``, ``W = 0``: ``1, 8/9, ..., 1/9, 0`` -- the
  paper's ``eta_t = 1 - t / T`` over ``t = 1..T`` normalised by its first value.
* :class:`RefinedLR`: the refined schedule (the paper's Algorithm 1 and
  Section 3.1).  From a previous run's gradient norms ``G_t``: a median filter
  ``Ghat`` (window ``smoothing`` of the run, reflect-padded), interpolated to
  the new run's length; weights ``w_t = Ghat_t^-2`` for SGD (``G`` the L2 norm)
  or ``w_t = Ghat_t^-1`` for Adam (``G`` the L1 norm); then
  ``eta_t = w_t sum_{p > t} w_p`` (so ``eta_T = 0``), normalised by its
  maximum.  Constant ``G`` gives exactly :class:`LinearDecayLR`.
* :class:`GradNormRecorder`: logs the L1 and L2 gradient norms of every step
  of an ordinary run (an optimizer step pre-hook; no host synchronisation
  until the norms are read).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from losskit.core.checks import check_choice, check_hparam, check_int
from losskit.core.registry import Paper, register

__all__ = ["LinearDecayLR", "RefinedLR", "GradNormRecorder", "linear_decay_factors", "refined_factors",
           "median_filter", "REFINEMENT_PAPER"]

REFINEMENT_PAPER = Paper("When, Why and How Much? Adaptive Learning Rate Scheduling by Refinement", 2023,
                         "2310.07831")


def _check_lengths(total_steps: int, warmup_steps: int) -> tuple[int, int]:
    check_int("total_steps", total_steps, low=1)
    check_int("warmup_steps", warmup_steps, low=0)
    if total_steps < warmup_steps + 2:
        raise ValueError(f"total_steps: expected at least warmup_steps + 2 = {warmup_steps + 2} (the warmup, then "
                         f"a decay of at least two steps), got total_steps={total_steps} with "
                         f"warmup_steps={warmup_steps}")
    return total_steps, warmup_steps


def _warmup(warmup_steps: int) -> list[float]:
    return [(t + 1) / (warmup_steps + 1) for t in range(warmup_steps)]


def linear_decay_factors(total_steps: int, warmup_steps: int = 0) -> list[float]:
    """The multipliers of :class:`LinearDecayLR` for steps ``0..total_steps-1``."""
    total_steps, warmup_steps = _check_lengths(total_steps, warmup_steps)
    n = total_steps - warmup_steps  # decay steps, the last one 0
    return _warmup(warmup_steps) + [(n - 1 - t) / (n - 1) for t in range(n)]


class _FactorLR(LRScheduler):
    """``lr_t = base_lr * factor(t)`` from a closed-form factor (0 after the run)."""

    def _factor(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        f = self._factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


@register("linear-decay", family="optim", kind="scheduler", task="other", paper=REFINEMENT_PAPER,
          summary="Linear warmup, then linear decay to 0 at the last step (the paper's recommended default).")
class LinearDecayLR(_FactorLR):
    """Linear warmup for ``warmup_steps`` steps, then linear decay to 0 at
    step ``total_steps - 1`` (see the module docstring for the formula).
    ``total_steps`` counts ``scheduler.step()`` calls (one per optimizer step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 last_epoch: int = -1):
        self.total_steps, self.warmup_steps = _check_lengths(total_steps, warmup_steps)
        self.factors = linear_decay_factors(total_steps, warmup_steps)
        super().__init__(optimizer, last_epoch)

    def _factor(self, t: int) -> float:
        return self.factors[t] if 0 <= t < len(self.factors) else 0.0


def median_filter(x: Tensor, window: int) -> Tensor:
    """Running median of a 1-D float64 tensor over a centred window of
    ``window`` points (odd; even widths are made odd by adding one), reflect-padded at both ends."""
    check_int("window", window, low=1)
    w = window if window % 2 else window + 1
    if w == 1 or x.numel() == 1:
        return x.clone()
    half = w // 2
    half = min(half, x.numel() - 1)  # reflect padding needs fewer points than the series
    xp = torch.nn.functional.pad(x[None, None], (half, half), mode="reflect")[0, 0]
    return xp.unfold(0, 2 * half + 1, 1).median(dim=1).values


def _interpolate(x: Tensor, n: int) -> Tensor:
    """``x`` (length m) resampled to ``n`` points by linear interpolation on [0, 1]."""
    m = x.numel()
    if m == n:
        return x.clone()
    if m == 1:
        return x.expand(n).clone()
    pos = torch.linspace(0, m - 1, n, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=m - 2)
    frac = pos - lo
    return x[lo] * (1 - frac) + x[lo + 1] * frac


def _check_norms(grad_norms: Any) -> Tensor:
    if isinstance(grad_norms, GradNormRecorder):
        raise TypeError("grad_norms: pass recorder.norms('l1') (Adam) or recorder.norms('l2') (SGD), "
                        "or use RefinedLR.from_recorder")
    try:
        g = torch.as_tensor(grad_norms, dtype=torch.float64).detach().cpu().flatten()
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"grad_norms: expected a sequence of numbers, got {type(grad_norms).__name__} ({e})") from None
    if g.numel() == 0:
        raise ValueError("grad_norms: expected the gradient norms of a previous run (at least one), got none")
    bad = (~torch.isfinite(g)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"grad_norms: expected finite gradient norms, got {g[i].item()} at step {i} "
                         f"({bad.numel()} non-finite of {g.numel()}); drop the skipped steps (e.g. AMP overflow) "
                         "before refining")
    neg = (g <= 0).nonzero().flatten()
    if neg.numel():
        i = int(neg[0])
        raise ValueError(f"grad_norms: expected positive gradient norms (the weights are their inverse), "
                         f"got {g[i].item()} at step {i}")
    return g


def refined_factors(grad_norms: Sequence[float] | Tensor, total_steps: int | None = None, warmup_steps: int = 0,
                    base: str = "adam", smoothing: float = 0.1) -> list[float]:
    """The multipliers of :class:`RefinedLR` for steps ``0..total_steps-1``."""
    g = _check_norms(grad_norms)
    check_choice("base", base, ("adam", "sgd"))
    check_hparam("smoothing", smoothing, low=0, high=1)
    total_steps = g.numel() if total_steps is None else total_steps
    total_steps, warmup_steps = _check_lengths(total_steps, warmup_steps)
    window = max(1, round(smoothing * g.numel()))
    ghat = median_filter(g, window)
    n = total_steps - warmup_steps
    ghat = _interpolate(ghat, n)
    w = ghat.pow(-2) if base == "sgd" else ghat.reciprocal()
    # eta_t = w_t * sum_{p > t} w_p  (a reversed cumulative sum, shifted by one)
    tail = torch.flip(torch.cumsum(torch.flip(w, [0]), 0), [0]) - w
    eta = w * tail
    eta = eta / eta.max()
    return _warmup(warmup_steps) + eta.tolist()


@register("refined", family="optim", kind="scheduler", task="other", paper=REFINEMENT_PAPER,
          summary="The refined schedule from a previous run's gradient norms (median filter, w = G^-2 for SGD, "
                  "||g||_1^-1 for Adam, eta_t = w_t sum_{p>t} w_p), with optional warmup.")
class RefinedLR(_FactorLR):
    """The refined schedule of Defazio et al. (2023), Algorithm 1.

    ``grad_norms``: the previous run's per-step gradient norms (L1 norms for
    ``base="adam"``, L2 norms for ``base="sgd"``; :class:`GradNormRecorder`
    records both).  ``total_steps``: the new run's length (default: the
    previous run's); the smoothed norms are interpolated to it.
    ``smoothing``: the median filter's window as a fraction of the previous
    run (the paper's 10%).  ``warmup_steps``: a linear warmup in front, as
    :class:`LinearDecayLR` (the refined shape is fitted to the remaining steps).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, grad_norms: Sequence[float] | Tensor,
                 total_steps: int | None = None, warmup_steps: int = 0, base: str = "adam",
                 smoothing: float = 0.1, last_epoch: int = -1):
        self.factors = refined_factors(grad_norms, total_steps, warmup_steps, base, smoothing)
        self.total_steps = len(self.factors)
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch)

    @classmethod
    def from_recorder(cls, optimizer: torch.optim.Optimizer, recorder: "GradNormRecorder", base: str = "adam",
                      **kw) -> "RefinedLR":
        """Build from a :class:`GradNormRecorder` (L1 norms for Adam, L2 for SGD)."""
        return cls(optimizer, recorder.norms("l1" if base == "adam" else "l2"), base=base, **kw)

    def _factor(self, t: int) -> float:
        return self.factors[t] if 0 <= t < len(self.factors) else 0.0


class GradNormRecorder:
    """Records the gradient norms a refinement needs during an ordinary run.

    ``GradNormRecorder(optimizer)`` registers an optimizer step pre-hook that
    stores, before every ``optimizer.step()``, the L1 and L2 norms of all the
    optimizer's gradients (as tensors on their device: no host sync).
    ``norms("l1")`` / ``norms("l2")`` return them as floats; ``state_dict()``
    / ``load_state_dict()`` save them; ``remove()`` detaches the hook.
    Call :meth:`record` yourself instead with ``optimizer=None``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None = None):
        self._l1: list[Tensor] = []
        self._l2: list[Tensor] = []
        self._handle = None
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"optimizer: expected a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
            self._handle = optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        self.record([p for g in optimizer.param_groups for p in g["params"]])

    @torch.no_grad()
    def record(self, params) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            raise ValueError("params: no parameter has a gradient; call record after backward()")
        vn = torch.linalg.vector_norm
        l1 = sum(vn(g.detach(), 1, dtype=torch.float64) for g in grads)
        l2 = torch.sqrt(sum(vn(g.detach(), 2, dtype=torch.float64) ** 2 for g in grads))
        self._l1.append(l1)
        self._l2.append(l2)

    def __len__(self) -> int:
        return len(self._l1)

    def norms(self, kind: str = "l1") -> list[float]:
        check_choice("kind", kind, ("l1", "l2"))
        src = self._l1 if kind == "l1" else self._l2
        return torch.stack(src).cpu().tolist() if src else []

    def state_dict(self) -> dict[str, list[float]]:
        return {"l1": self.norms("l1"), "l2": self.norms("l2")}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self._l1 = [torch.tensor(v, dtype=torch.float64) for v in state["l1"]]
        self._l2 = [torch.tensor(v, dtype=torch.float64) for v in state["l2"]]

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
