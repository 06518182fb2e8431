"""Projected gradient ascent (PGD, Madry et al. 2018) in an l2 or l_inf ball,
for any differentiable objective of the input: the inner maximisation of the
smooth adversarial comp-sum loss (maximise ``||h(x') - h(x)||_2``) and the
attack of the robust-accuracy metric (maximise the cross-entropy).

Per row ``i`` (a batch of inputs of any shape ``[B, ...]``), from a random
start in the ball::

    linf: x' <- clip(P(x' + step * sign(g)))
    l2:   x' <- clip(P(x' + step * g / ||g||))

with ``g`` the gradient of ``objective(x').sum()`` w.r.t. ``x'`` (rows do
not interact when the objective is a sum of per-row terms), ``P`` the
projection onto ``{||x' - x|| <= radius}`` and ``clip`` the input range.
Only ``x'`` is differentiated (``torch.autograd.grad``): the model's
parameters accumulate no gradient.  The model is called in whatever mode it
is in (set ``model.eval()`` first if batch-norm statistics must not move).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from losskit.core.checks import check_choice, check_hparam, check_int

__all__ = ["pgd_perturb", "NORMS", "project"]

NORMS = ("linf", "l2")


def _row_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.flatten(1), dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(delta: Tensor, radius: float, norm: str) -> Tensor:
    """``delta`` projected onto the ``radius`` ball of ``norm``, row by row."""
    if norm == "linf":
        return delta.clamp(-radius, radius)
    n = _row_norm(delta)
    return delta * torch.clamp(radius / n.clamp_min(1e-12), max=1.0)


def pgd_perturb(objective: Callable[[Tensor], Tensor], x: Tensor, radius: float, steps: int, step_size: float,
                norm: str = "linf", clip: tuple[float, float] | None = None, *, random_start: bool = True,
                generator: torch.Generator | None = None) -> Tensor:
    """The PGD maximiser ``x'`` (detached, ``x``'s shape and dtype) of
    ``objective(x')`` (a scalar, or per-row values that are summed) with
    ``||x' - x|| <= radius``.  ``radius == 0`` returns ``x``."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"x: expected a floating-point tensor [B, ...], got "
                        f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
    radius = check_hparam("radius", radius, low=0.0)
    steps = check_int("steps", steps, low=0)
    step_size = check_hparam("step_size", step_size, low=0.0)
    norm = check_choice("norm", norm, NORMS)
    x = x.detach()
    if radius == 0.0:
        return x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device) * 2 - 1
        if norm == "l2":
            noise = noise / _row_norm(noise).clamp_min(1e-12) * torch.rand(
                (x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, dtype=x.dtype).to(x.device)
        delta = noise * radius
    else:
        delta = torch.zeros_like(x)
    xa = x + delta
    if clip is not None:
        xa = xa.clamp(*clip)
    for _ in range(steps):
        xa = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            val = objective(xa)
            val = val.sum() if val.dim() else val
            (g,) = torch.autograd.grad(val, xa)
        with torch.no_grad():
            if norm == "linf":
                step = g.sign()
            else:
                step = g / _row_norm(g).clamp_min(1e-12)
            xa = x + project(xa.detach() + step_size * step - x, radius, norm)
            if clip is not None:
                xa = xa.clamp(*clip)
    return xa.detach()
