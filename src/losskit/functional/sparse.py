"""Sparse signal recovery: ISTA and IHT steps, their objectives, NMSE.

For ``y = A x* + n`` (``A`` of shape ``[M, N]``, batches of signals as rows
``[B, N]`` and measurements ``[B, M]``):

* ISTA (l1):  ``x <- S_{a lam}(x + a A^T (y - A x))`` with the soft threshold
  ``S_t(v) = sign(v) max(|v| - t, 0)``; objective ``1/2 ||y - A x||^2 + lam ||x||_1``.
* IHT (l0):   ``x <- H_{sqrt(2 a lam)}(x + a A^T (y - A x))`` with the hard
  threshold ``H_t(v) = v 1[|v| > t]``; objective ``1/2 ||y - A x||^2 + lam ||x||_0``.

(Nagahisa, Hayakawa and Iiguni, "Comparison between Supervised and
Unsupervised Learning in Deep Unfolded Sparse Signal Recovery", arXiv:2509.01331.)
The hard threshold's mask is piecewise constant: its gradient flows through
the kept entries only (the threshold itself has zero derivative almost everywhere).
"""

from __future__ import annotations

import torch
from torch import Tensor

from losskit.core.checks import shape_str

__all__ = ["soft_threshold", "hard_threshold", "ista_step", "iht_step", "l1_objective", "l0_objective", "nmse",
           "lipschitz_step", "check_sparse_problem"]


def check_sparse_problem(y: Tensor, a: Tensor, x: Tensor | None = None) -> None:
    if not isinstance(a, Tensor) or a.dim() != 2:
        raise ValueError(f"A must be a [M, N] matrix; got {shape_str(a) if isinstance(a, Tensor) else type(a)}")
    if not isinstance(y, Tensor) or y.dim() != 2 or y.shape[1] != a.shape[0]:
        got = shape_str(y) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be [B, M] with M = {a.shape[0]} (A's rows); got {got}")
    if x is not None and (x.dim() != 2 or x.shape != (y.shape[0], a.shape[1])):
        raise ValueError(f"x must be [B, N] = [{y.shape[0]}, {a.shape[1]}]; got {shape_str(x)}")


def soft_threshold(v: Tensor, t: Tensor | float) -> Tensor:
    return torch.sign(v) * torch.clamp(v.abs() - t, min=0)


def hard_threshold(v: Tensor, t: Tensor | float) -> Tensor:
    return v * (v.abs() > t).to(v.dtype)


def _gradient_step(x: Tensor, y: Tensor, a: Tensor, step: Tensor | float) -> Tensor:
    return x + step * ((y - x @ a.T) @ a)


def ista_step(x: Tensor, y: Tensor, a: Tensor, step: Tensor | float, lam: float) -> Tensor:
    return soft_threshold(_gradient_step(x, y, a, step), step * lam)


def iht_step(x: Tensor, y: Tensor, a: Tensor, step: Tensor | float, lam: float) -> Tensor:
    # a learned step can cross zero: the threshold of a non-positive step is 0 (no NaN from the root)
    thr = torch.sqrt(2 * lam * torch.as_tensor(step, dtype=x.dtype, device=x.device).clamp_min(0))
    return hard_threshold(_gradient_step(x, y, a, step), thr)


def l1_objective(x: Tensor, y: Tensor, a: Tensor, lam: float) -> Tensor:
    """``[B]``: ``1/2 ||y - A x||^2 + lam ||x||_1`` per signal."""
    return 0.5 * ((y - x @ a.T) ** 2).sum(-1) + lam * x.abs().sum(-1)


def l0_objective(x: Tensor, y: Tensor, a: Tensor, lam: float) -> Tensor:
    """``[B]``: ``1/2 ||y - A x||^2 + lam ||x||_0`` per signal (the count has no gradient)."""
    return 0.5 * ((y - x @ a.T) ** 2).sum(-1) + lam * (x != 0).sum(-1).to(x.dtype)


def nmse(x: Tensor, x_true: Tensor) -> Tensor:
    """``sum ||x - x*||^2 / sum ||x*||^2`` over the batch (a scalar; ``10 log10`` of it is NMSE in dB)."""
    return ((x - x_true) ** 2).sum() / (x_true ** 2).sum().clamp_min(torch.finfo(x.dtype).tiny)


def lipschitz_step(a: Tensor) -> float:
    """``1 / ||A||_2^2``: the classical step size of ISTA and IHT."""
    return float(1.0 / torch.linalg.matrix_norm(a.double(), ord=2) ** 2)
