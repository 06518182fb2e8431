"""Naive Bayes linear evaluation (Zheng et al., ICML 2023) against a loop
reference from the paper's equation and against scikit-learn (GaussianNB,
which keeps one variance per class; LogisticRegression, C = 1)."""

import math

import numpy as np
import pytest
import torch

from losskit.metrics.linear_probe import (GaussianNaiveBayes, LogisticRegressionProbe, crossover, linear_probe,
                                          sample_curve)


def _blobs(n_per=30, k=4, d=5, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(k, d, generator=g, dtype=torch.float64) * 2
    y = torch.arange(k).repeat_interleave(n_per)
    x = mu[y] + spread * torch.randn(k * n_per, d, generator=g, dtype=torch.float64)
    return x, y


def naive_nb_scores(xtr, ytr, xte, eps=1e-9):
    """Loops: class means, per-class population variances + eps, prior-weighted sum, log joint."""
    n, d = xtr.shape
    classes = sorted(set(ytr.tolist()))
    mus, vars_, priors = {}, {}, {}
    for c in classes:
        rows = [xtr[i] for i in range(n) if int(ytr[i]) == c]
        priors[c] = len(rows) / n
        mus[c] = [sum(float(r[j]) for r in rows) / len(rows) for j in range(d)]
        vars_[c] = [sum((float(r[j]) - mus[c][j]) ** 2 for r in rows) / len(rows) + eps for j in range(d)]
    sig = [sum(priors[c] * vars_[c][j] for c in classes) for j in range(d)]
    out = []
    for x in xte:
        out.append([math.log(priors[c]) - 0.5 * sum((float(x[j]) - mus[c][j]) ** 2 / sig[j] for j in range(d))
                    for c in classes])
    return torch.tensor(out, dtype=torch.float64)


def test_naive_bayes_matches_the_paper_formula():
    x, y = _blobs(n_per=7)
    y = y.clone()
    y[:3] = 3                                    # unequal class sizes: the priors matter
    nb = GaussianNaiveBayes().fit(x, y)
    xt, _ = _blobs(n_per=3, seed=1)
    torch.testing.assert_close(nb.joint_log_likelihood(xt), naive_nb_scores(x, y, xt), rtol=1e-10, atol=1e-8)


def test_naive_bayes_equals_sklearn_when_class_variances_are_equal_and_differs_otherwise():
    sk = pytest.importorskip("sklearn.naive_bayes")
    g = torch.Generator().manual_seed(0)
    k, per, d = 3, 20, 4
    resid = torch.randn(per, d, generator=g, dtype=torch.float64)
    resid -= resid.mean(0)
    mu = torch.randn(k, d, generator=g, dtype=torch.float64) * 1.5
    x = torch.cat([mu[c] + resid for c in range(k)])          # every class: the same residuals
    y = torch.arange(k).repeat_interleave(per)
    xt = torch.randn(200, d, generator=g, dtype=torch.float64) * 2
    ours = GaussianNaiveBayes().fit(x, y)
    ref = sk.GaussianNB(var_smoothing=1e-12).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(ours.class_var_.numpy(), ref.var_, rtol=1e-9)
    assert (ours.predict(xt).numpy() == ref.predict(xt.numpy())).all()
    jll = ours.joint_log_likelihood(xt).numpy()
    rjll = ref.predict_joint_log_proba(xt.numpy())
    np.testing.assert_allclose(jll - jll.mean(1, keepdims=True), rjll - rjll.mean(1, keepdims=True), atol=1e-6)
    # per-class variances (class 0 ten times wider): sklearn's quadratic boundary differs from the shared one
    x2 = torch.cat([mu[0] + 10 * resid, mu[1] + resid, mu[2] + resid])
    ours2 = GaussianNaiveBayes().fit(x2, y)
    ref2 = sk.GaussianNB().fit(x2.numpy(), y.numpy())
    assert (ours2.predict(xt).numpy() != ref2.predict(xt.numpy())).mean() > 0.05
    # ... and equal again once sklearn is given the pooled variance
    ref2.var_ = np.tile(ours2.var_.numpy(), (k, 1))
    assert (ours2.predict(xt).numpy() == ref2.predict(xt.numpy())).all()


def test_logistic_regression_matches_sklearn():
    lm = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(n_per=25, spread=2.0)
    ours = LogisticRegressionProbe(C=1.0, tol=1e-9).fit(x, y)
    ref = lm.LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(ours.coef_.numpy(), ref.coef_, atol=2e-4)
    np.testing.assert_allclose(ours.intercept_.numpy(), ref.intercept_, atol=2e-4)
    xt, _ = _blobs(n_per=10, seed=5, spread=2.0)
    assert (ours.predict(xt).numpy() == ref.predict(xt.numpy())).mean() > 0.99


def test_linear_probe_keys_and_bad_input():
    xa, ya = _blobs(n_per=60)
    x, y, xt, yt = xa[::2], ya[::2], xa[1::2], ya[1::2]
    out = linear_probe(x, y, xt, yt, shots=(1, 5, None), repeats=2)
    assert set(out) == {f"{c}@{s}" for c in ("logistic", "naive-bayes") for s in ("1", "5", "all")}
    assert all(0 <= v <= 1 for v in out.values()) and out["naive-bayes@all"] > 0.8
    with pytest.raises(ValueError, match="classifiers"):
        linear_probe(x, y, xt, yt, classifiers=("svm",))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="train_x"):
        linear_probe(bad, y, xt, yt)
    with pytest.raises(ValueError, match="labels"):
        GaussianNaiveBayes().fit(x, y[:3])
    with pytest.raises(ValueError, match="x"):
        GaussianNaiveBayes().fit(x, y).predict(xt[:, :2])


def test_the_crossover_on_a_problem_where_naive_bayes_is_misspecified():
    # 40 independent Gaussian features plus three noisy copies of half of them: naive Bayes counts the
    # copied evidence four times (misspecified), logistic regression learns to discount it but needs more
    # samples; the paper's prediction is naive Bayes ahead with few samples, logistic regression with many
    g = torch.Generator().manual_seed(0)
    d, dup, k = 40, 20, 2
    mu = torch.randn(k, d, generator=g, dtype=torch.float64) * 0.3

    def draw(n):
        y = torch.randint(0, k, (n,), generator=g)
        x = mu[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
        copies = [x[:, :dup] + 0.1 * torch.randn(n, dup, generator=g, dtype=torch.float64) for _ in range(3)]
        return torch.cat([x, *copies], 1), y

    xtr, ytr = draw(4000)
    xte, yte = draw(2000)
    curve = sample_curve(xtr, ytr, xte, yte, shots=[10, 30, 2000], repeats=4)
    nb, lr = curve.mean("naive-bayes"), curve.mean("logistic")
    assert nb[0] < lr[0] and nb[1] < lr[1], (nb, lr)     # few samples: naive Bayes ahead
    assert lr[-1] < nb[-1], (nb, lr)                     # many: logistic regression ahead
    assert crossover(curve) == 2000
