"""Learning-curve forecasting (Vilares Ferro et al. 2024): the pattern is
recovered from exact data, forecasts from a prefix, the trust level and the
stopping criterion behave as defined, bad input is refused."""

import math

import numpy as np
import pytest

from losskit.metrics.learning_curves import (LearningCurveForecaster, fit_accuracy_pattern, fit_power_law,
                                             prediction_level, proximity_bound)


def _pattern(x, a=0.6, b=0.7, c=0.93):
    return c - a * np.power(np.asarray(x, dtype=float), -b)


X = np.geomspace(10, 2000, 15)


def test_recovers_an_exact_pattern_and_forecasts_from_a_prefix():
    fit = fit_accuracy_pattern(X, _pattern(X))
    assert fit.a == pytest.approx(0.6, rel=1e-4) and fit.b == pytest.approx(0.7, rel=1e-4)
    assert fit.asymptote == pytest.approx(0.93, abs=1e-5)
    part = fit_accuracy_pattern(X[:5], _pattern(X[:5]))
    assert float(part(X[-1])) == pytest.approx(float(_pattern(X[-1])), abs=1e-4)


def test_fit_is_increasing_concave_and_bounded_on_noisy_data():
    rng = np.random.default_rng(0)
    y = np.clip(_pattern(X) + rng.normal(0, 0.01, X.size), 0, 1)
    fit = fit_accuracy_pattern(X, y)
    xs = np.geomspace(1, 1e6, 50)
    v = fit(xs)
    assert np.all(np.diff(v) > 0) and np.all(np.diff(v, 2) / np.diff(xs)[1:] < 1e-9)
    assert fit.c <= 1.0 and fit.c >= y.max() and np.all(v <= fit.c)


def test_power_law_is_a_line_in_log_log():
    y = 0.3 * X ** 0.2
    p = fit_power_law(X, y)
    assert p.alpha == pytest.approx(0.3) and p.beta == pytest.approx(0.2)
    # and it has no asymptote: its forecast keeps growing where the pattern levels off
    assert float(p(1e9)) > 1.0


def test_prediction_level_and_stopping():
    y = _pattern(X)
    k = prediction_level(X, y, X[-1], tol=1e-3)
    assert k is not None and k >= 3 + 2  # needs `window` fits of >= 3 points
    f = LearningCurveForecaster(target_x=X[-1], epsilon=0.02, tol=1e-3)
    stopped_at = None
    for i, (xi, yi) in enumerate(zip(X, y)):
        f.update(xi, yi)
        if stopped_at is None and f.should_stop:
            stopped_at = i + 1
    assert f.level == k
    # stops only once the true gap to the asymptote (plus the forecasts' spread) is within epsilon
    assert stopped_at is not None
    true_gap = 0.93 - y[stopped_at - 1]
    assert true_gap <= 0.02 + 1e-6
    assert 0.93 - y[stopped_at - 2] > 0.02 - 1e-3 or stopped_at - 1 < k
    assert proximity_bound(X, y) == pytest.approx(f.proximity, abs=1e-9)


def test_noisy_curve_is_not_trusted_early():
    rng = np.random.default_rng(1)
    y = np.clip(_pattern(X) + rng.normal(0, 0.05, X.size), 0, 1)
    f = LearningCurveForecaster(target_x=X[-1], tol=1e-4)
    for xi, yi in zip(X[:6], y[:6]):
        f.update(xi, yi)
    assert not f.trusted and not f.should_stop


def test_bad_input():
    with pytest.raises(ValueError, match="2 points cannot fit the accuracy pattern's 3 parameters"):
        fit_accuracy_pattern([1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="strictly increasing"):
        fit_accuracy_pattern([1, 3, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="same length"):
        fit_accuracy_pattern([1, 2, 3], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        fit_accuracy_pattern([1, 2, 3], [0.1, math.nan, 0.3])
    with pytest.raises(ValueError, match="upper=1"):
        fit_accuracy_pattern([1, 2, 3], [0.1, 0.5, 1.5])
    with pytest.raises(ValueError, match="> 0"):
        fit_power_law([1, 2, 3], [0.0, 0.1, 0.2])
    with pytest.raises(ValueError, match="epsilon"):
        LearningCurveForecaster(target_x=100, epsilon=0)
    f = LearningCurveForecaster(target_x=100)
    f.update(1, 0.1)
    with pytest.raises(ValueError, match="x must increase"):
        f.update(1, 0.2)
    with pytest.raises(ValueError, match="at least 3 levels"):
        f.forecast()
