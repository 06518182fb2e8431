"""Learning-curve forecasting with a trust level and a stopping criterion.

After Vilares Ferro, Darriba Bilbao and Ribadas Pena, "Modeling of learning
curves with applications to POS tagging" (2024, arXiv:2402.02515): observe a
learning curve ``(x_i, A_i)`` (accuracy against training size or epoch) a
level at a time, fit an *accuracy pattern* -- a positive, increasing,
concave, bounded function -- to the levels seen so far, forecast the value
at a later ``x`` (the whole data base) and the asymptote ``A_inf``; trust
the forecasts from a *prediction level* on, and stop when a proximity bound
on ``|A_inf - A_i|`` falls below the user's ``epsilon``.

The pattern here is ``pi(x) = c - a x^(-b)`` with ``a > 0``, ``b > 0`` (so
increasing and concave) and ``c`` the bound (the asymptote, at most
``upper`` -- 1 for accuracies).  How the prediction level and the proximity
bound are decided is our operationalisation (docs/theory.md says what was
read and what was not):

* prediction level: the first level ``k`` at which the forecasts of the
  target from the last ``window`` prefixes ``k - window + 1 .. k`` all lie
  within ``tol`` of each other (the learning trend has settled);
* proximity: ``|A_inf - A_k| <= |c_k - A_k| + spread_k`` where ``c_k`` is the
  asymptote of the fit on the first ``k`` levels and ``spread_k`` the range
  of the last ``window`` asymptote forecasts; stop when it is ``<= epsilon``
  at or past the prediction level.

The plain power law ``A(x) = alpha x^beta`` (a straight line in log-log, no
asymptote) is the baseline the issue compares against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from losskit.core.checks import check_hparam, check_int

__all__ = ["PatternFit", "PowerLawFit", "fit_accuracy_pattern", "fit_power_law", "prediction_level",
           "proximity_bound", "LearningCurveForecaster"]

N_PATTERN_PARAMS = 3


def _curve(x, y, name: str = "curve") -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{name}: sizes and values must have the same length; got {x.size} and {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"{name}: sizes and values must be finite")
    if np.any(x <= 0):
        raise ValueError(f"{name}: sizes must be > 0 (the pattern is a function of x^-b); got min {x.min():g}")
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"{name}: sizes must be strictly increasing")
    return x, y


@dataclass(frozen=True)
class PatternFit:
    """``pi(x) = c - a x^(-b)``: ``c`` is the forecast asymptote ``A_inf``."""

    a: float
    b: float
    c: float

    def __call__(self, x) -> np.ndarray:
        return self.c - self.a * np.power(np.asarray(x, dtype=np.float64), -self.b)

    @property
    def asymptote(self) -> float:
        return self.c


@dataclass(frozen=True)
class PowerLawFit:
    """``A(x) = alpha x^beta`` fitted as a line in log-log (no asymptote)."""

    alpha: float
    beta: float

    def __call__(self, x) -> np.ndarray:
        return self.alpha * np.power(np.asarray(x, dtype=np.float64), self.beta)


def fit_accuracy_pattern(x, y, *, upper: float | None = 1.0) -> PatternFit:
    """Least-squares fit of ``c - a x^(-b)`` (``a, b > 0``; ``max(y) <= c <= upper``).

    Needs at least 3 points (the pattern's parameters); ``upper=None`` leaves
    the bound free (for curves that are not accuracies).
    """
    from scipy.optimize import least_squares

    x, y = _curve(x, y)
    if x.size < N_PATTERN_PARAMS:
        raise ValueError(f"a curve with {x.size} points cannot fit the accuracy pattern's "
                         f"{N_PATTERN_PARAMS} parameters (a, b, c): give at least {N_PATTERN_PARAMS} points")
    if upper is not None:
        upper = check_hparam("upper", upper)
        if y.max() > upper:
            raise ValueError(f"values exceed upper={upper:g} (max {y.max():g}): pass upper=None for curves "
                             "that are not accuracies")
    scale = max(float(np.ptp(y)), 1e-12)
    c_lo = float(y.max())
    c_hi = float(upper) if upper is not None else c_lo + 100 * scale
    c_hi = max(c_hi, c_lo + 1e-12)
    xs = x / x[0]  # fit in units of the first size: a is then the gap at the first level

    def resid(p):
        a, b, c = p
        return (c - a * xs ** (-b) - y) / scale

    best = None
    for b0 in (0.3, 1.0, 2.0):
        c0 = min(c_hi, c_lo + 0.1 * scale)
        a0 = max(c0 - y[0], 1e-6)
        r = least_squares(resid, x0=[a0, b0, c0], bounds=([1e-12, 1e-6, c_lo], [np.inf, 10.0, c_hi]))
        if best is None or r.cost < best.cost:
            best = r
    a, b, c = best.x
    return PatternFit(a=float(a * x[0] ** b), b=float(b), c=float(c))


def fit_power_law(x, y) -> PowerLawFit:
    """The baseline: ``log A = log alpha + beta log x`` by least squares (needs 2 points, values > 0)."""
    x, y = _curve(x, y)
    if x.size < 2:
        raise ValueError(f"a curve with {x.size} points cannot fit a power law's 2 parameters")
    if np.any(y <= 0):
        raise ValueError("the power-law fit needs values > 0 (it is a line in log-log)")
    beta, log_alpha = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLawFit(alpha=float(math.exp(log_alpha)), beta=float(beta))


def prediction_level(x, y, target_x: float, *, tol: float = 0.005, window: int = 3,
                     upper: float | None = 1.0) -> int | None:
    """The first number of levels ``k`` from which forecasts of ``A(target_x)`` are
    trusted: the fits on the last ``window`` prefixes (of ``k - window + 1``
    .. ``k`` levels) agree within ``tol``.  ``None`` if that never happens."""
    x, y = _curve(x, y)
    tol = check_hparam("tol", tol, low=0, low_open=True)
    window = check_int("window", window, low=2)
    forecasts: list[float] = []
    for k in range(N_PATTERN_PARAMS, x.size + 1):
        forecasts.append(float(fit_accuracy_pattern(x[:k], y[:k], upper=upper)(target_x)))
        if len(forecasts) >= window and max(forecasts[-window:]) - min(forecasts[-window:]) <= tol:
            return k
    return None


def proximity_bound(x, y, *, window: int = 3, upper: float | None = 1.0) -> float:
    """``|c_k - A_k| + spread``: how far the last observed value may be from the asymptote."""
    x, y = _curve(x, y)
    window = check_int("window", window, low=1)
    if x.size < N_PATTERN_PARAMS:
        raise ValueError(f"a curve with {x.size} points cannot fit the accuracy pattern's "
                         f"{N_PATTERN_PARAMS} parameters")
    cs = [fit_accuracy_pattern(x[:k], y[:k], upper=upper).c
          for k in range(max(N_PATTERN_PARAMS, x.size - window + 1), x.size + 1)]
    return abs(cs[-1] - y[-1]) + (max(cs) - min(cs))


@dataclass
class LearningCurveForecaster:
    """Accumulator: ``update(x, accuracy)`` a level at a time; ``forecast(x)``,
    ``asymptote``, ``trusted`` (past the prediction level) and ``should_stop``
    (proximity bound <= ``epsilon`` once trusted).

    ``target_x`` is the size whose value is forecast for the trust level (the
    whole data base, or the last epoch of the budget).
    """

    target_x: float
    epsilon: float = 0.01
    tol: float = 0.005
    window: int = 3
    upper: float | None = 1.0
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)
    _forecasts: list[float] = field(default_factory=list, repr=False)
    _asymptotes: list[float] = field(default_factory=list, repr=False)
    level: int | None = None

    def __post_init__(self):
        self.target_x = check_hparam("target_x", self.target_x, low=0, low_open=True)
        self.epsilon = check_hparam("epsilon", self.epsilon, low=0, low_open=True)
        self.tol = check_hparam("tol", self.tol, low=0, low_open=True)
        self.window = check_int("window", self.window, low=2)

    def update(self, x: float, value: float) -> None:
        if not (math.isfinite(float(x)) and math.isfinite(float(value))):
            raise ValueError(f"update: x and value must be finite; got {x!r}, {value!r}")
        if self.xs and float(x) <= self.xs[-1]:
            raise ValueError(f"update: x must increase; got {x!r} after {self.xs[-1]!r}")
        self.xs.append(float(x))
        self.ys.append(float(value))
        if len(self.xs) >= N_PATTERN_PARAMS:
            fit = fit_accuracy_pattern(self.xs, self.ys, upper=self.upper)
            self._forecasts.append(float(fit(self.target_x)))
            self._asymptotes.append(fit.c)
            last = self._forecasts[-self.window:]
            if self.level is None and len(last) == self.window and max(last) - min(last) <= self.tol:
                self.level = len(self.xs)

    @property
    def trusted(self) -> bool:
        return self.level is not None

    def forecast(self, x: float | None = None) -> float:
        if len(self.xs) < N_PATTERN_PARAMS:
            raise ValueError(f"a forecast needs at least {N_PATTERN_PARAMS} levels; have {len(self.xs)}")
        return float(fit_accuracy_pattern(self.xs, self.ys, upper=self.upper)(self.target_x if x is None else x))

    @property
    def asymptote(self) -> float:
        if not self._asymptotes:
            raise ValueError(f"the asymptote needs at least {N_PATTERN_PARAMS} levels; have {len(self.xs)}")
        return self._asymptotes[-1]

    @property
    def proximity(self) -> float:
        if not self._asymptotes:
            return math.inf
        last = self._asymptotes[-self.window:]
        return abs(last[-1] - self.ys[-1]) + (max(last) - min(last))

    @property
    def should_stop(self) -> bool:
        return self.trusted and self.proximity <= self.epsilon
