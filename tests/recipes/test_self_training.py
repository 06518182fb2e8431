"""Self-training (issue 12, item 3): margins, threshold policies, the
transductive bound against a loop over its definition, scikit-learn equality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import losskit
from losskit.functional.self_training import (_bounds_vectorised, prediction_margins, select_pseudo_labels,
                                              transductive_bound, transductive_thresholds)
from losskit.recipes.self_training import TorchClassifier, run_self_training

sklearn = pytest.importorskip("sklearn")


def _proba(n=40, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 2, 1)


def test_margins_from_the_definition():
    p = _proba()
    mx = prediction_margins(p, "max")
    t2 = prediction_margins(p, "top2")
    for i in range(p.shape[0]):
        s = sorted(p[i].tolist(), reverse=True)
        assert mx[i].item() == pytest.approx(s[0])
        assert t2[i].item() == pytest.approx(s[0] - s[1])


def _naive_bound(p, k, theta, grid):
    """The definition, one point at a time (Feofanov et al. 2019, with the authors' gamma grid)."""
    p = p.tolist()
    u, C = len(p), len(p[0])
    pred = [max(range(C), key=lambda c: row[c]) for row in p]
    joint = 0.0
    for i in range(C):
        if i == k:
            continue
        li = sum(row[i] for row in p)
        K = sum(row[i] * row[k] for row, pr in zip(p, pred) if pr == k) / li
        Mt = sum(row[i] * row[k] for row in p if row[k] < theta) / li
        best = min(
            sum(row[i] for row in p if theta <= row[k] < g) / li
            + max(K + Mt - sum(row[i] * row[k] for row in p if row[k] < g) / li, 0.0) / g
            for g in (theta + (1 - theta) * n / grid for n in range(1, grid + 1)))
        joint += li * best
    pi = max(sum(1 for row, pr in zip(p, pred) if pr == k and row[k] >= theta) / u, 1e-15)
    return joint / u / pi


@pytest.mark.parametrize("k", [0, 2])
def test_transductive_bound_matches_its_definition(k):
    p = _proba(30, 3, seed=k)
    thetas = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)
    vec = _bounds_vectorised(p, k, thetas, 10)
    for j, th in enumerate(thetas.tolist()):
        ref = _naive_bound(p, k, th, 10)
        assert transductive_bound(p, k, th, 10) == pytest.approx(ref, rel=1e-9)
        assert vec[j].item() == pytest.approx(ref, rel=1e-9)


def test_transductive_thresholds_minimise_the_bound_on_the_grid():
    p = _proba(40, 3, seed=3)
    th = transductive_thresholds(p, grid=12)
    for k in range(3):
        lo, hi = p[:, k].min().item(), p[:, k].max().item()
        cand = [lo + n * (hi - lo) / 12 for n in range(12)]
        vals = [_naive_bound(p, k, c, 12) for c in cand]
        assert _naive_bound(p, k, th[k].item(), 12) == pytest.approx(min(vals), rel=1e-9)


def test_policies():
    p = _proba(50, 3, seed=1)
    m = prediction_margins(p)
    sel, lab, th = select_pseudo_labels(p, "fixed", threshold=0.6)
    assert torch.equal(sel, m > 0.6) and torch.equal(lab, p.argmax(1))
    sel, _, th = select_pseudo_labels(p, "fixed", threshold=[0.9, 0.5, 0.7])
    assert torch.equal(sel, m > torch.tensor([0.9, 0.5, 0.7], dtype=p.dtype)[p.argmax(1)])
    sel, _, _ = select_pseudo_labels(p, "mean")
    assert torch.equal(sel, m > m.mean())
    for t in range(5):
        sel, _, _ = select_pseudo_labels(p, "curriculum", round_index=t, delta=0.2)
        assert abs(sel.float().mean().item() - min(1.0, 0.2 * (t + 1))) <= 1 / 50 + 1e-9
    sel, _, _ = select_pseudo_labels(p, "top-k", k_best=7)
    assert sel.sum() == 7 and m[sel].min() >= m[~sel].max()
    sel, lab, th = select_pseudo_labels(p, "auto", grid=10)
    assert torch.equal(sel, m >= th[lab])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_threshold_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="threshold"):
        select_pseudo_labels(_proba(), "fixed", threshold=bad)
    from sklearn.linear_model import LogisticRegression
    with pytest.raises(ValueError, match="threshold"):
        run_self_training(LogisticRegression(), np.zeros((2, 2)), np.array([0, 1]), np.zeros((3, 2)), threshold=bad)
    with pytest.raises(ValueError, match="threshold"):
        run_self_training(LogisticRegression(), np.zeros((2, 2)), np.array([0, 1]), np.zeros((3, 2)),
                          threshold=[0.5, 1.2])


def test_bad_inputs_are_refused():
    from sklearn.linear_model import LogisticRegression
    xl, yl = np.random.default_rng(0).normal(size=(6, 2)), np.array([0, 1] * 3)
    with pytest.raises(ValueError, match="x_unlabelled.*non-empty"):
        run_self_training(LogisticRegression(), xl, yl, np.zeros((0, 2)))
    with pytest.raises(TypeError, match="classifier"):
        run_self_training(object(), xl, yl, xl)
    with pytest.raises(ValueError, match="policy"):
        run_self_training(LogisticRegression(), xl, yl, xl, policy="median")
    with pytest.raises(ValueError, match="proba.*sum"):
        prediction_margins(torch.ones(3, 2))


def _digits_split(frac=0.1, seed=0, n_unlabelled=400):
    from sklearn.datasets import load_digits
    d = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(d.target))
    n_l = int(frac * len(idx))
    u = idx[n_l:n_l + n_unlabelled]
    return d.data[idx[:n_l]] / 16, d.target[idx[:n_l]], d.data[u] / 16, d.target[u]


def test_first_round_equals_sklearn_self_training_classifier():
    from sklearn.linear_model import LogisticRegression
    from sklearn.semi_supervised import SelfTrainingClassifier
    xl, yl, xu, yu = _digits_split(0.1)
    base = LogisticRegression(max_iter=300)
    ref = SelfTrainingClassifier(base, threshold=0.8, max_iter=1).fit(
        np.concatenate([xl, xu]), np.concatenate([yl, np.full(len(xu), -1)]))
    ours = run_self_training(sklearn.base.clone(base), xl, yl, xu, policy="fixed", threshold=0.8, max_rounds=1)
    ref_u = ref.transduction_[len(xl):]
    assert (ref.labeled_iter_[len(xl):] == 1).sum() == ours.rounds[0].added > 0
    np.testing.assert_array_equal(ours.pseudo_labels, np.where(ref_u == -1, -1, ref_u))
    # the k-best criterion too
    ref = SelfTrainingClassifier(base, criterion="k_best", k_best=25, max_iter=1).fit(
        np.concatenate([xl, xu]), np.concatenate([yl, np.full(len(xu), -1)]))
    ours = run_self_training(sklearn.base.clone(base), xl, yl, xu, policy="top-k", k_best=25, max_rounds=1)
    np.testing.assert_array_equal(ours.pseudo_labels, ref.transduction_[len(xl):])


def test_recipe_logs_error_rates_and_weights(monkeypatch):
    from sklearn.linear_model import LogisticRegression
    xl, yl, xu, yu = _digits_split(0.1, seed=1)
    seen = []
    orig = LogisticRegression.fit

    def spy(self, X, y, sample_weight=None):
        seen.append(None if sample_weight is None else np.asarray(sample_weight))
        return orig(self, X, y, sample_weight=sample_weight)

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    res = losskit.get("self-training", policy="fixed", threshold=0.9, max_rounds=2, pseudo_weight=0.25)(
        LogisticRegression(max_iter=200), xl, yl, xu, y_unlabelled_true=yu)
    r = res.rounds[0]
    sel = res.labelled_round == 1
    assert r.added == sel.sum() > 0
    assert r.error_added == pytest.approx(np.mean(res.pseudo_labels[sel] != yu[sel]))
    assert seen[0] is None and seen[1] is not None
    assert np.all(seen[1][:len(yl)] == 1) and np.all(seen[1][len(yl):] == 0.25)
    res = run_self_training(LogisticRegression(max_iter=100), xl, yl, xu[:300], policy="auto",
                            pseudo_weight="balanced", max_rounds=1, grid=20, y_unlabelled_true=yu[:300])
    w = seen[-1]
    assert np.all(w[:len(yl)] == 1) and w[len(yl):].sum() == pytest.approx(len(yl))
    assert all(0 <= r.error_total <= 1 for r in res.rounds if r.error_total is not None)


def test_torch_module_classifier():
    torch.manual_seed(0)
    xl, yl, xu, yu = _digits_split(0.1)
    net = torch.nn.Sequential(torch.nn.Linear(64, 10))
    res = run_self_training(net, xl.astype(np.float32), yl, xu.astype(np.float32), policy="curriculum",
                            max_rounds=1, y_unlabelled_true=yu)
    assert isinstance(res.classifier, TorchClassifier)
    assert res.rounds[0].added == pytest.approx(0.2 * len(xu), abs=2)
    acc = np.mean(res.classifier.predict(xu.astype(np.float32)) == yu)
    assert acc > 0.8
