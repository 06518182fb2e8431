"""IGNITE (Dao, Nguyen, Truong, Hoang, 2025): a surrogate-sharpness regulariser
for offline (model-based) optimisation.

The surrogate ``f_beta`` of a black-box function is trained on offline data
by minimising its loss ``L(beta)`` subject to a bound on its sharpness,
``rho ||grad_beta G(beta)|| <= eps`` where ``G(beta)`` is the batch mean of the
surrogate's predictions.  The Lagrangian ``L + lambda (rho ||grad G|| - eps)``
is minimised in ``beta`` and maximised in ``lambda`` (dual ascent).

The gradient of ``rho ||grad G||`` is ``rho H g / ||g||`` (``g = grad G``, ``H``
its Hessian); IGNITE approximates that Hessian-vector product by a finite
difference along the normalised gradient::

    g       = grad G(beta)                       (clean inputs)
    beta^   = beta + r g / ||g||
    total   = grad L(beta) + (lambda rho / r) (grad G(beta^) - g)
    beta   <- optimizer step with ``total``
    lambda <- max(0, lambda + eta (rho ||g|| - eps))

Defaults are the paper's: ``lambda_init=1e-3``, ``dual_lr`` (eta) ``1e-3``,
``eps=0.1``, ``rho=0.05``, ``r=0.05``.  The official code does not clamp
``lambda`` at 0; the dual variable of an inequality constraint must stay
``>= 0`` (a negative ``lambda`` *rewards* sharpness once the constraint is
slack), so losskit clamps by default and ``clamp_lambda=False`` reproduces
the official behaviour.  The surrogate's loss uses the (optionally noised)
training inputs, ``G`` the clean ones, as in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from losskit.core.checks import check_bool, check_embeddings, check_hparam, check_int
from losskit.core.registry import Paper, register

__all__ = ["IGNITE", "IgniteLog", "run_ignite", "IGNITE_PAPER"]

IGNITE_PAPER = Paper("Incorporating Surrogate Gradient Norm to Improve Offline Optimization Techniques", 2025,
                     "2503.04242")


@dataclass
class IgniteLog:
    """One IGNITE step: the surrogate loss, ``||grad G||``, the constraint
    value ``rho ||grad G|| - eps`` and ``lambda`` after the dual update."""

    loss: float
    grad_norm: float
    constraint: float
    lam: float


class IGNITE:
    """The IGNITE training step around any surrogate ``model`` and ``optimizer``.

    ``step(loss_fn, inputs)``: ``loss_fn()`` returns the surrogate's training
    loss (a scalar built from ``model``), ``inputs`` are the clean inputs whose
    mean prediction is ``G``.  The parameters regularised are those of the
    optimizer that require grad.  ``state_dict()`` holds ``lambda`` and the
    step count.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, rho: float = 0.05,
                 r: float = 0.05, eps: float = 0.1, lambda_init: float = 1e-3, dual_lr: float = 1e-3,
                 clamp_lambda: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer = model, optimizer
        self.rho = check_hparam("rho", rho, low=0)
        self.r = check_hparam("r", r, low=0, low_open=True)
        self.eps = check_hparam("eps", eps, low=0)
        self.dual_lr = check_hparam("dual_lr", dual_lr, low=0)
        self.clamp_lambda = check_bool("clamp_lambda", clamp_lambda)
        self.lam = check_hparam("lambda_init", lambda_init, low=0 if clamp_lambda else None)
        self.steps = 0
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not self.params:
            raise ValueError("optimizer: no parameter requires grad")

    def _grad_G(self, inputs: Tensor) -> list[Tensor]:
        with torch.enable_grad():
            pred = self.model(inputs)
            G = pred.mean()
            return list(torch.autograd.grad(G, self.params, allow_unused=True))

    def step(self, loss_fn: Callable[[], Tensor], inputs: Tensor) -> IgniteLog:
        x = check_embeddings(inputs, "inputs") if inputs.dim() == 2 else inputs
        if not torch.is_floating_point(x):
            raise TypeError(f"inputs: expected a floating tensor, got {x.dtype}")
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(self._grad_G(x), self.params)]
        gnorm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g))
        gn = float(gnorm)
        if not torch.isfinite(gnorm):
            raise ValueError(f"the surrogate's gradient norm ||grad G|| is {gn}; check the model and inputs")
        correction = None
        if gn > 0 and self.lam != 0 and self.rho != 0:
            saved = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for p, gi in zip(self.params, g):
                    p.add_(gi, alpha=self.r / gn)
            g_hat = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(self._grad_G(x), self.params)]
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)
            c = self.lam * self.rho / self.r
            correction = [(gh - gi) * c for gh, gi in zip(g_hat, g)]
        self.optimizer.zero_grad()
        with torch.enable_grad():
            loss = loss_fn()
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError("loss_fn: expected it to return a scalar tensor")
        lv = float(loss.detach())
        if lv != lv or lv in (float("inf"), float("-inf")):
            raise ValueError(f"loss_fn returned a non-finite loss ({lv})")
        loss.backward()
        if correction is not None:
            with torch.no_grad():
                for p, ci in zip(self.params, correction):
                    if p.grad is None:
                        p.grad = ci.clone()
                    else:
                        p.grad.add_(ci)
        self.optimizer.step()
        constraint = self.rho * gn - self.eps
        self.lam = self.lam + self.dual_lr * constraint
        if self.clamp_lambda:
            self.lam = max(0.0, self.lam)
        self.steps += 1
        return IgniteLog(lv, gn, constraint, self.lam)

    def state_dict(self) -> dict:
        return {"lam": self.lam, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])
        self.steps = int(state["steps"])


@register("ignite", family="optim", kind="recipe", paper=IGNITE_PAPER,
          summary="IGNITE: train an offline-optimisation surrogate under a sharpness constraint "
                  "rho ||grad G|| <= eps (finite-difference HVP, dual ascent on lambda, clamped at 0).")
def run_ignite(model: nn.Module, data: Sequence[Tensor], *, epochs: int = 50, batch_size: int = 128,
               lr: float = 1e-3, rho: float = 0.05, r: float = 0.05, eps: float = 0.1, lambda_init: float = 1e-3,
               dual_lr: float = 1e-3, clamp_lambda: bool = True, input_noise: float = 0.0,
               loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, regularise: bool = True,
               seed: int = 0) -> list[IgniteLog]:
    """Train the surrogate ``model`` in place on ``data = (x [N, D], y [N])``
    with Adam and IGNITE; returns one :class:`IgniteLog` per step.

    ``loss_fn(pred, y)`` defaults to the mean squared error (the Gaussian NLL
    with unit variance, up to constants); ``input_noise`` adds Gaussian noise of
    that scale to the loss's inputs (``G`` uses the clean ones);
    ``regularise=False`` trains the same surrogate without IGNITE (the baseline,
    same batches and optimiser)."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError("data: expected (x [N, D], y [N])")
    x, y = data
    x = check_embeddings(x, "data[0]")
    if not isinstance(y, Tensor) or y.shape[:1] != x.shape[:1]:
        raise ValueError(f"data[1]: expected targets with {x.shape[0]} rows, got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
    check_int("epochs", epochs, low=1)
    check_int("batch_size", batch_size, low=1)
    check_hparam("lr", lr, low=0, low_open=True)
    check_hparam("input_noise", input_noise, low=0)
    check_bool("regularise", regularise)
    lf = loss_fn or (lambda pred, t: ((pred - t) ** 2).mean())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ig = IGNITE(model, opt, rho=rho, r=r, eps=eps, lambda_init=lambda_init, dual_lr=dual_lr,
                clamp_lambda=clamp_lambda)
    gen = torch.Generator().manual_seed(seed)
    logs = []
    n = x.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            xb, yb = x[idx], y[idx]
            xn = xb + input_noise * torch.randn(xb.shape, generator=gen, dtype=xb.dtype) if input_noise else xb

            def closure(xn=xn, yb=yb):
                return lf(model(xn).reshape(yb.shape), yb)

            if regularise:
                logs.append(ig.step(closure, xb))
            else:
                opt.zero_grad()
                loss = closure()
                loss.backward()
                opt.step()
                logs.append(IgniteLog(float(loss.detach()), float("nan"), float("nan"), 0.0))
    return logs
