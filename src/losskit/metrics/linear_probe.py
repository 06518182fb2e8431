"""Linear evaluation of frozen embeddings: Gaussian naive Bayes beside
logistic regression (Zheng et al., "Revisiting Discriminative vs. Generative
Classifiers: Theory and Implications", ICML 2023, arXiv:2302.02334,
the naive Bayes and logistic-regression linear evaluation as in the project notes,
optimisation-and-recipes.md section 9; code ML-GSAI/Revisiting-Dis-vs-Gen-Classifiers,
``models/gaussnb.py`` and ``main_train_offline.py``).

**Naive Bayes** with the paper's *shared* diagonal variance::

    mu_k      = mean of the class-k rows;  pi_k = n_k / n
    sigma_j^2 = sum_k pi_k var_kj + eps                 (var_kj: the population variance, ddof 0)
    predict   argmax_k  log pi_k - 1/2 sum_j (x_j - mu_kj)^2 / sigma_j^2

(the official code adds ``eps`` = 1e-9 to each class's variance before the
prior-weighted sum, which is the same).  scikit-learn's ``GaussianNB`` keeps
a variance per class (``var_[k, j]``, and adds ``var_smoothing * max_j
var(X_j)``): it is a quadratic classifier, this one is linear in ``x``; the
two agree when every class has the same variance (tested).

**Logistic regression**: multinomial, L2, ``C = 1``, scikit-learn's
objective ``C sum_i CE_i + ||W||^2 / 2`` (bias not penalised), minimised with
L-BFGS in float64 until the largest gradient entry is below ``tol`` (1e-4,
scikit-learn's default; at most ``max_iter`` 1000 iterations: the paper uses ``sklearn.linear_model.LogisticRegression
(penalty='l2', C=1, solver='lbfgs', max_iter=1000)``; the coefficients agree
with it, tested).

The paper's prediction: naive Bayes reaches its (higher) asymptotic error
with O(log n) samples, logistic regression its lower one with O(n), so naive
Bayes is ahead with few samples per class and logistic regression ahead with
many (:func:`sample_curve` measures both; :func:`crossover` finds where).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from losskit.core.checks import check_choice, check_embeddings, check_hparam, check_int, check_labels

__all__ = ["GaussianNaiveBayes", "LogisticRegressionProbe", "linear_probe", "sample_curve", "crossover",
           "CLASSIFIERS", "subsample_per_class"]

CLASSIFIERS = ("logistic", "naive-bayes")


def _xy(x, y, name: str = "x") -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    check_embeddings(x, name)
    check_labels(y, x.shape[0], device=x.device)
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one row, got shape {list(x.shape)}")
    return x.double(), y.long()


class GaussianNaiveBayes:
    """Gaussian naive Bayes with the prior-weighted shared diagonal variance (module docstring)."""

    def __init__(self, eps: float = 1e-9):
        self.eps = check_hparam("eps", eps, low=0.0)
        self.classes_: Tensor | None = None

    def fit(self, x, y) -> "GaussianNaiveBayes":
        x, y = _xy(x, y)
        classes, inv, counts = torch.unique(y, return_inverse=True, return_counts=True)
        k = classes.shape[0]
        mu = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, inv, x) / counts[:, None]
        sq = torch.zeros_like(mu).index_add_(0, inv, (x - mu[inv]) ** 2) / counts[:, None]   # per-class var
        prior = counts.double() / x.shape[0]
        self.classes_, self.means_, self.class_var_, self.prior_ = classes, mu, sq, prior
        self.var_ = (prior[:, None] * (sq + self.eps)).sum(0)
        return self

    def joint_log_likelihood(self, x) -> Tensor:
        """``[N, K]``: ``log pi_k - 1/2 sum_j (x_j - mu_kj)^2 / sigma_j^2`` (the class-independent
        normaliser dropped, as the official ``predict``)."""
        if self.classes_ is None:
            raise RuntimeError("GaussianNaiveBayes: call fit first")
        x = torch.as_tensor(x)
        check_embeddings(x, "x")
        if x.shape[1] != self.means_.shape[1]:
            raise ValueError(f"x: expected shape [N, {self.means_.shape[1]}] (the fitted dimension), "
                             f"got {list(x.shape)}")
        x = x.double()
        inv_var = 1.0 / self.var_.clamp_min(torch.finfo(torch.float64).tiny)
        # sum_j (x - mu)^2 / s^2 = x^2/s^2 - 2 x mu / s^2 + mu^2 / s^2, one GEMM
        quad = (x * x * inv_var).sum(1, keepdim=True) - 2 * (x * inv_var) @ self.means_.t() \
            + (self.means_ * self.means_ * inv_var).sum(1)[None, :]
        return torch.log(self.prior_)[None, :] - 0.5 * quad

    def predict(self, x) -> Tensor:
        return self.classes_[self.joint_log_likelihood(x).argmax(1)]

    def score(self, x, y) -> float:
        y = torch.as_tensor(y)
        return float((self.predict(x) == y).double().mean())


class LogisticRegressionProbe:
    """Multinomial logistic regression, scikit-learn's objective (module docstring)."""

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4):
        self.C = check_hparam("C", C, low=0.0, low_open=True)
        self.max_iter = check_int("max_iter", max_iter, low=1)
        self.tol = check_hparam("tol", tol, low=0.0)
        self.classes_: Tensor | None = None

    def fit(self, x, y) -> "LogisticRegressionProbe":
        x, y = _xy(x, y)
        classes, inv = torch.unique(y, return_inverse=True)
        k, d = classes.shape[0], x.shape[1]
        self.classes_ = classes
        if k == 1:
            self.coef_ = torch.zeros(1, d, dtype=x.dtype)
            self.intercept_ = torch.zeros(1, dtype=x.dtype)
            return self
        W = torch.zeros(k, d, dtype=x.dtype, requires_grad=True)
        b = torch.zeros(k, dtype=x.dtype, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=self.tol,
                                tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            z = x @ W.t() + b
            loss = self.C * torch.nn.functional.cross_entropy(z, inv, reduction="sum") + 0.5 * (W * W).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.coef_, self.intercept_ = W.detach(), b.detach()
        return self

    def decision_function(self, x) -> Tensor:
        if self.classes_ is None:
            raise RuntimeError("LogisticRegressionProbe: call fit first")
        x = torch.as_tensor(x)
        check_embeddings(x, "x")
        return x.double() @ self.coef_.t() + self.intercept_

    def predict(self, x) -> Tensor:
        return self.classes_[self.decision_function(x).argmax(1)]

    def score(self, x, y) -> float:
        y = torch.as_tensor(y)
        return float((self.predict(x) == y).double().mean())


def _make(kind: str):
    return LogisticRegressionProbe() if kind == "logistic" else GaussianNaiveBayes()


def subsample_per_class(y: Tensor, per_class: int | None, generator: torch.Generator) -> Tensor:
    """Row indices with ``per_class`` rows of every class (all rows for ``None``; a class with
    fewer rows keeps them all)."""
    y = torch.as_tensor(y)
    if per_class is None:
        return torch.arange(y.shape[0])
    out = []
    for c in torch.unique(y).tolist():
        rows = (y == c).nonzero().squeeze(1)
        out.append(rows[torch.randperm(rows.shape[0], generator=generator)[:per_class]])
    return torch.cat(out).sort().values


def linear_probe(train_x, train_y, test_x, test_y, shots: Sequence[int | None] = (1, 5, None),
                 classifiers: Sequence[str] = CLASSIFIERS, repeats: int = 1, seed: int = 0) -> dict[str, float]:
    """Test accuracy of each classifier fitted on ``shot`` training rows per class
    (``None``: all), averaged over ``repeats`` draws: keys ``'logistic@1'``,
    ``'naive-bayes@all'``, ..."""
    for c in classifiers:
        check_choice("classifiers", c, CLASSIFIERS)
    repeats = check_int("repeats", repeats, low=1)
    trx, try_ = _xy(train_x, train_y, "train_x")
    tex, tey = _xy(test_x, test_y, "test_x")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    for shot in shots:
        if shot is not None:
            check_int("shots", shot, low=1)
        key = "all" if shot is None else str(shot)
        accs: dict[str, list[float]] = {c: [] for c in classifiers}
        for _ in range(repeats if shot is not None else 1):
            idx = subsample_per_class(try_, shot, g)
            for c in classifiers:
                accs[c].append(_make(c).fit(trx[idx], try_[idx]).score(tex, tey))
        for c in classifiers:
            out[f"{c}@{key}"] = float(np.mean(accs[c]))
    return out


@dataclass
class SampleCurve:
    """Test error against training rows per class: ``errors[classifier]`` ``[len(shots), repeats]``."""

    shots: list[int]
    errors: dict[str, np.ndarray]

    def mean(self, c: str) -> np.ndarray:
        return self.errors[c].mean(1)

    def std(self, c: str) -> np.ndarray:
        return self.errors[c].std(1)


def sample_curve(train_x, train_y, test_x, test_y, shots: Sequence[int], repeats: int = 5,
                 seed: int = 0) -> SampleCurve:
    """Both classifiers' test errors at each ``shot`` rows per class (``repeats`` draws each, the
    same draw for both classifiers)."""
    repeats = check_int("repeats", repeats, low=1)
    trx, try_ = _xy(train_x, train_y, "train_x")
    tex, tey = _xy(test_x, test_y, "test_x")
    g = torch.Generator().manual_seed(seed)
    errs = {c: np.zeros((len(shots), repeats)) for c in CLASSIFIERS}
    for i, shot in enumerate(shots):
        for r in range(repeats):
            idx = subsample_per_class(try_, int(shot), g)
            for c in CLASSIFIERS:
                errs[c][i, r] = 1.0 - _make(c).fit(trx[idx], try_[idx]).score(tex, tey)
    return SampleCurve([int(s) for s in shots], errs)


def crossover(curve: SampleCurve) -> int | None:
    """The smallest shot from which logistic regression's mean error stays below naive Bayes'
    (``None`` if it never does; the first shot if it is ahead everywhere)."""
    lr, nb = curve.mean("logistic"), curve.mean("naive-bayes")
    ahead = lr < nb
    for i in range(len(ahead)):
        if ahead[i:].all():
            return curve.shots[i]
    return None
