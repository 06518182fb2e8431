"""Normalized LR+GD (Tyurin 2024) and plain LR+GD, for logistic models.

Tyurin, "From Logistic Regression to the Perceptron Algorithm: Exploring
Gradient Descent with Large Step Sizes" (arXiv:2412.08424).  For the logistic
loss ``f(theta) = (1/n) sum_i log(1 + exp(-m_i))`` with margins
``m_i = y_i a_i^T theta`` and weights ``w_i = sigma(-m_i)``:

* LR+GD:            ``theta <- theta + gamma (1/n) sum_i w_i y_i a_i``
* Normalized LR+GD: ``theta <- theta + gamma sum_i w_i y_i a_i / sum_i w_i``

i.e. the normalized step divides the gradient by ``mean(w)``.  As the data
become separated every ``w_i`` underflows, so ``1 / mean(w)`` is never
formed: the normalized weights ``w_i / sum_j w_j`` are a softmax of
``log w_i = -softplus(m_i)``, which stays exact for margins of any size.

Both are written for any model whose margins are differentiable: the step is
the gradient of the surrogate ``-sum_i p_i m_i`` with ``p`` detached (``p =
w / sum w`` or ``w / n``), which for a linear model is exactly the paper's
update.  The optimizer therefore needs the margins, not a loss: ``step``
takes a closure that returns ``m [n]`` (as ``torch.optim.LBFGS`` takes a
closure that returns the loss).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from losskit.core.checks import check_bool, check_hparam, check_int, shape_str
from losskit.core.registry import Paper, register

__all__ = ["NormalizedLRGD", "normalized_weights", "logistic_weights", "worst_case_dataset",
           "check_linearly_separable", "iterations_to_separate", "TYURIN_PAPER"]

TYURIN_PAPER = Paper("From Logistic Regression to the Perceptron Algorithm: Exploring Gradient Descent with Large "
                     "Step Sizes", 2024, "2412.08424")


def normalized_weights(margins: Tensor) -> Tensor:
    """``w_i / sum_j w_j`` with ``w_i = sigma(-m_i)``, computed as a softmax of
    ``-softplus(m_i)`` (exact when every ``w_i`` underflows)."""
    m = margins.detach().to(torch.promote_types(margins.dtype, torch.float32))
    return torch.softmax(-torch.nn.functional.softplus(m), dim=0).to(margins.dtype)


def logistic_weights(margins: Tensor) -> Tensor:
    """``w_i / n`` with ``w_i = sigma(-m_i)``: the weights of plain LR+GD's step."""
    m = margins.detach().to(torch.promote_types(margins.dtype, torch.float32))
    return (torch.sigmoid(-m) / m.numel()).to(margins.dtype)


@register("normalized-lr-gd", family="theory", kind="optimizer", paper=TYURIN_PAPER)
class NormalizedLRGD(Optimizer):
    """Gradient descent on the logistic loss, normalized by the mean logistic weight.

    ``step(closure)``: the closure returns the margins ``y_i f(x_i)`` as a
    ``[n]`` tensor that depends on the parameters (no ``backward`` needed:
    the optimizer differentiates the surrogate itself and leaves ``.grad``
    untouched).  ``step`` returns the mean logistic loss at the margins it
    was given.  ``normalized=False`` is plain LR+GD with the same interface,
    so the two are compared like for like.
    """

    def __init__(self, params: Iterable, lr: float, normalized: bool = True):
        lr = check_hparam("lr", lr, low=0, low_open=True)
        normalized = check_bool("normalized", normalized)
        super().__init__(params, {"lr": lr, "normalized": normalized})
        self.hparams = {"lr": lr, "normalized": normalized}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise TypeError("NormalizedLRGD.step needs a closure that returns the margins y_i * f(x_i) as a "
                            "[n] tensor that depends on the parameters (the step is normalized by the "
                            "logistic weights sigma(-margin), which a gradient alone does not carry)")
        with torch.enable_grad():
            margins = closure()
        if not isinstance(margins, Tensor) or margins.dim() != 1 or margins.numel() == 0:
            got = shape_str(margins) if isinstance(margins, Tensor) else type(margins).__name__
            raise ValueError(f"closure must return the margins as a non-empty 1-D tensor [n]; got {got}")
        if not margins.requires_grad:
            raise ValueError("closure must return margins that depend on the parameters (requires_grad is False)")
        if not bool(torch.isfinite(margins.detach()).all()):
            raise ValueError("closure returned non-finite margins")
        loss = torch.nn.functional.softplus(-margins.detach().double()).mean().to(margins.dtype)
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.requires_grad]
            if not ps:
                continue
            p_w = normalized_weights(margins) if group["normalized"] else logistic_weights(margins)
            with torch.enable_grad():
                surrogate = -(p_w * margins).sum()
                grads = torch.autograd.grad(surrogate, ps, retain_graph=True, allow_unused=True)
            for p, g in zip(ps, grads):
                if g is not None:
                    p.add_(g.to(p.dtype), alpha=-group["lr"])
        return loss


# ----------------------------------------------------------------------------- the paper's checks

def worst_case_dataset(n: int = 1000, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The paper's worst-case data: one point ``(0.5, -1)`` labelled +1 and
    ``n - 1`` points ``(-0.5, -1)`` labelled -1 (features ``[n, 2]``, labels in {-1, +1})."""
    n = check_int("n", n, low=2)
    a = torch.tensor([[-0.5, -1.0]], dtype=dtype).repeat(n, 1)
    a[0] = torch.tensor([0.5, -1.0], dtype=dtype)
    y = -torch.ones(n, dtype=dtype)
    y[0] = 1.0
    return a, y


def check_linearly_separable(features: Tensor, labels: Tensor) -> np.ndarray:
    """A ``theta`` with ``y_i a_i^T theta >= 1`` for every ``i`` (a linear
    program), or ``ValueError`` if the data are not linearly separable
    through the origin (append a constant feature for a bias)."""
    from scipy.optimize import linprog

    a = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if a.ndim != 2 or y.shape != (a.shape[0],):
        raise ValueError(f"features must be [n, d] and labels [n]; got {list(a.shape)} and {list(y.shape)}")
    if not np.all(np.isin(y, (-1.0, 1.0))):
        raise ValueError("labels must be in {-1, +1}")
    res = linprog(np.zeros(a.shape[1]), A_ub=-(y[:, None] * a), b_ub=-np.ones(a.shape[0]),
                  bounds=[(None, None)] * a.shape[1], method="highs")
    if res.status != 0:
        raise ValueError("the data are not linearly separable (no theta with y_i a_i^T theta > 0 for every i; "
                         "append a constant feature if a bias is needed): the separation count is undefined")
    return res.x


def iterations_to_separate(features: Tensor, labels: Tensor, lr: float, *, normalized: bool = True,
                           max_iter: int = 1_000_000, check: bool = True) -> int:
    """Iterations of (Normalized) LR+GD from ``theta_0 = 0`` until every
    training point is classified correctly (``y_i a_i^T theta > 0``).

    Raises ``ValueError`` for data that no linear classifier separates
    (checked by a linear program first, unless ``check=False``) and
    ``RuntimeError`` if ``max_iter`` is reached.
    """
    lr = check_hparam("lr", lr, low=0, low_open=True)
    max_iter = check_int("max_iter", max_iter, low=1)
    if check:
        check_linearly_separable(features, labels)
    a = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64)
    theta = torch.zeros(a.shape[1], dtype=torch.float64, requires_grad=True)
    opt = NormalizedLRGD([theta], lr=lr, normalized=normalized)
    ya = y[:, None] * a
    for t in range(max_iter + 1):
        with torch.no_grad():
            if bool(((ya @ theta) > 0).all()):
                return t
        if t == max_iter:
            break
        opt.step(lambda: ya @ theta)
    raise RuntimeError(f"not separated after max_iter={max_iter} iterations (lr={lr}, normalized={normalized})")
