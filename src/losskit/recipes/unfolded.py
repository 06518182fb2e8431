"""Deep-unfolded ISTA and IHT with learned per-layer step sizes, trained with
a supervised (MSE) or an unsupervised (the original objective) loss.

Nagahisa, Hayakawa and Iiguni, "Comparison between Supervised and Unsupervised
Learning in Deep Unfolded Sparse Signal Recovery" (2025, arXiv:2509.01331;
no official code).  ``T`` iterations of ISTA/IHT become ``T`` layers whose
only parameters are the step sizes ``a_t`` (initialised at the classical
``1 / ||A||_2^2``); the losses are

* supervised:   ``E ||x_T - x*||^2``
* unsupervised: ``E [1/2 ||y - A x_T||^2 + lam ||x_T||_1]`` (ISTA) or
  ``... + lam ||x_T||_0`` (IHT; the count contributes no gradient).

The synthetic setup (the issue's; the paper's own sizes were not in the text
we could read): ``A`` Gaussian with entries of variance ``1 / M``, ``x*``
Bernoulli-Gaussian with activity ``p``, white noise at a given SNR.

Registered as the recipe ``deep-unfolding``: ``losskit.get("deep-unfolding",
loss="unsupervised", iterations=500)`` binds the options and returns
:func:`train_unfolded` to call with ``(model, problem)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from losskit.core.checks import check_choice, check_hparam, check_int
from losskit.core.registry import Paper, register
from losskit.functional.sparse import (check_sparse_problem, iht_step, ista_step, l0_objective, l1_objective,
                                       lipschitz_step, nmse)

__all__ = ["SparseProblem", "UnfoldedISTA", "UnfoldedIHT", "supervised_loss", "unsupervised_loss",
           "train_unfolded", "UNFOLDING_PAPER"]

UNFOLDING_PAPER = Paper("Comparison between Supervised and Unsupervised Learning in Deep Unfolded Sparse Signal "
                        "Recovery", 2025, "2509.01331")


@dataclass
class SparseProblem:
    """``y = A x* + n``: a fixed Gaussian ``A [M, N]`` (variance ``1/M``),
    Bernoulli-Gaussian signals with activity ``p``, noise at ``snr_db``."""

    n: int = 256
    m: int = 128
    p: float = 0.1
    snr_db: float = 30.0
    seed: int = 0
    dtype: torch.dtype = torch.float32
    a: Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.n = check_int("n", self.n, low=1)
        self.m = check_int("m", self.m, low=1)
        self.p = check_hparam("p", self.p, low=0, high=1, low_open=True)
        self.snr_db = check_hparam("snr_db", self.snr_db)
        g = torch.Generator().manual_seed(self.seed)
        self.a = (torch.randn(self.m, self.n, generator=g, dtype=torch.float64) / math.sqrt(self.m)).to(self.dtype)
        self._g = torch.Generator().manual_seed(self.seed + 1)

    def with_conditions(self, p: float | None = None, snr_db: float | None = None, seed: int | None = None):
        """The same ``A`` under other test conditions (the train/test mismatch)."""
        other = SparseProblem(self.n, self.m, self.p if p is None else p, self.snr_db if snr_db is None else snr_db,
                              self.seed, self.dtype)
        other.a = self.a
        if seed is not None:
            other._g = torch.Generator().manual_seed(seed)
        return other

    def sample(self, batch: int) -> tuple[Tensor, Tensor]:
        """``(y [B, M], x* [B, N])``."""
        batch = check_int("batch", batch, low=1)
        g = self._g
        support = torch.rand(batch, self.n, generator=g, dtype=torch.float64) < self.p
        x = torch.randn(batch, self.n, generator=g, dtype=torch.float64) * support
        clean = x @ self.a.double().T
        # SNR = E||A x||^2 / E||n||^2 with E||A x||^2 = p N (columns of unit expected norm)
        sigma2 = self.p * self.n / self.m / (10 ** (self.snr_db / 10))
        y = clean + math.sqrt(sigma2) * torch.randn(batch, self.m, generator=g, dtype=torch.float64)
        return y.to(self.dtype), x.to(self.dtype)


class _Unfolded(nn.Module):
    _step_fn = staticmethod(ista_step)
    objective = "l1"

    def __init__(self, a: Tensor, lam: float, layers: int = 16, step: float | None = None):
        super().__init__()
        if not isinstance(a, Tensor) or a.dim() != 2:
            raise ValueError("a must be the [M, N] measurement matrix")
        self.lam = check_hparam("lam", lam, low=0, low_open=True)
        self.layers = check_int("layers", layers, low=1)
        step = lipschitz_step(a) if step is None else check_hparam("step", step, low=0, low_open=True)
        self.register_buffer("a", a.detach().clone())
        self.steps = nn.Parameter(torch.full((self.layers,), float(step), dtype=a.dtype))

    def forward(self, y: Tensor, *, trace: bool = False) -> Tensor | list[Tensor]:
        """``x_T [B, N]`` from ``x_0 = 0``; ``trace=True`` returns ``[x_1, ..., x_T]``."""
        check_sparse_problem(y, self.a)
        x = y.new_zeros(y.shape[0], self.a.shape[1])
        xs = []
        for t in range(self.layers):
            x = self._step_fn(x, y, self.a, self.steps[t], self.lam)
            xs.append(x)
        return xs if trace else x

    def objective_value(self, x: Tensor, y: Tensor) -> Tensor:
        fn = l1_objective if self.objective == "l1" else l0_objective
        return fn(x, y, self.a, self.lam)


class UnfoldedISTA(_Unfolded):
    """``T`` ISTA layers with learned step sizes ``a_t`` (soft threshold ``a_t lam``)."""


class UnfoldedIHT(_Unfolded):
    """``T`` IHT layers with learned step sizes ``a_t`` (hard threshold ``sqrt(2 a_t lam)``)."""

    _step_fn = staticmethod(iht_step)
    objective = "l0"


def supervised_loss(x: Tensor, x_true: Tensor) -> Tensor:
    """``mean_b ||x_T - x*||^2``."""
    return ((x - x_true) ** 2).sum(-1).mean()


def unsupervised_loss(model: _Unfolded, x: Tensor, y: Tensor) -> Tensor:
    """``mean_b`` of the original objective at ``x_T`` (l1 for ISTA, l0 for IHT)."""
    return model.objective_value(x, y).mean()


@dataclass
class UnfoldingLog:
    losses: list[float] = field(default_factory=list)
    test_nmse_db: float = float("nan")


@register("deep-unfolding", family="theory", kind="recipe", paper=UNFOLDING_PAPER)
def train_unfolded(model: _Unfolded, problem: SparseProblem, *, loss: str = "supervised", iterations: int = 500,
                   batch_size: int = 64, lr: float = 1e-4, incremental: bool = False) -> UnfoldingLog:
    """Train ``model.steps`` with Adam on fresh batches from ``problem``.

    ``incremental=True`` trains the first ``t`` layers for ``iterations /
    T`` steps each, t = 1..T (the common incremental training of deep
    unfolding); the default trains all layers end to end.
    """
    loss = check_choice("loss", loss, ("supervised", "unsupervised"))
    iterations = check_int("iterations", iterations, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    lr = check_hparam("lr", lr, low=0, low_open=True)
    if not isinstance(model, _Unfolded):
        raise TypeError(f"model must be an UnfoldedISTA or UnfoldedIHT; got {type(model).__name__}")
    if tuple(problem.a.shape) != tuple(model.a.shape):
        raise ValueError(f"problem's A is {list(problem.a.shape)} but the model's is {list(model.a.shape)}")
    opt = torch.optim.Adam([model.steps], lr=lr)
    log = UnfoldingLog()
    schedule = ([(t, max(1, iterations // model.layers)) for t in range(1, model.layers + 1)] if incremental
                else [(model.layers, iterations)])
    for depth, n_it in schedule:
        for _ in range(n_it):
            y, x_true = problem.sample(batch_size)
            xs = model(y, trace=True)
            x = xs[depth - 1]
            value = supervised_loss(x, x_true) if loss == "supervised" else unsupervised_loss(model, x, y)
            opt.zero_grad()
            value.backward()
            opt.step()
            log.losses.append(float(value.detach()))
            if not math.isfinite(log.losses[-1]):
                raise FloatingPointError(f"the {loss} loss became non-finite at iteration {len(log.losses)}; "
                                         f"lower lr (got {lr})")
    with torch.no_grad():
        y, x_true = problem.sample(256)
        log.test_nmse_db = float(10 * torch.log10(nmse(model(y), x_true)))
    return log
