"""DMM, oracle matching, the baselines and the datamodel regression."""

import math

import pytest
import torch
from torch import nn

import losskit
from losskit.metrics import margins_from_logits
from losskit.recipes.unlearning import (Datamodels, UnlearningData, fit_datamodels, predict_logits,
                                        ridge_datamodels, run_dmm, run_gradient_ascent, run_gradient_difference,
                                        run_oracle_matching, run_retain_finetune, subset_masks, train_classifier)


def toy(n=60, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(c, (n,), generator=g)
    return x, y


def linear(d=5, c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, c)


def naive_ridge(masks, y, lam):
    """Normal equations with an unpenalised bias, written out: [1 X]^T[1 X] + diag(0, lam...) ."""
    m, n = masks.shape
    a = torch.cat([torch.ones(m, 1, dtype=torch.float64), masks.double()], 1)
    reg = torch.eye(n + 1, dtype=torch.float64) * lam
    reg[0, 0] = 0.0
    sol = torch.linalg.solve(a.T @ a + reg, a.T @ y.double())
    return sol[1:], sol[0]


@pytest.mark.parametrize("m", [12, 40])  # dual form (M < n) and primal (M >= n)
def test_ridge_matches_normal_equations(m):
    n, t = 20, 4
    masks = subset_masks(n, m, 0.5, seed=1)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(m, t, 2, generator=g, dtype=torch.float64)
    dm = ridge_datamodels(masks, y, ridge=0.5)
    beta, b = naive_ridge(masks, y.reshape(m, -1), 0.5)
    assert torch.allclose(dm.weights.reshape(n, -1), beta, atol=1e-8)
    assert torch.allclose(dm.bias.reshape(-1), b, atol=1e-8)


def test_regression_recovers_a_linear_ground_truth():
    n, m, t = 30, 300, 5
    g = torch.Generator().manual_seed(0)
    beta = torch.randn(n, t, generator=g, dtype=torch.float64)
    bias = torch.randn(t, generator=g, dtype=torch.float64)
    masks = subset_masks(n, m, 0.5, seed=3)
    y = bias + masks.double() @ beta + 0.01 * torch.randn(m, t, generator=g, dtype=torch.float64)
    dm = ridge_datamodels(masks, y)  # penalty chosen on held-out models
    assert dm.ridge in (0.1, 1.0, 10.0, 100.0) and dm.num_models == m
    assert (dm.weights - beta).abs().max() < 0.1
    f = torch.tensor([2, 5, 7])
    full = bias + beta.sum(0)
    assert torch.allclose(dm.predict_without(full, f), full - beta[f].sum(0), atol=0.3)
    assert torch.allclose(dm.predict(torch.arange(n)), full, atol=0.3)


def test_fit_datamodels_trains_one_model_per_subset():
    x, y = toy(n=16)
    seen = []

    def train_and_predict(idx):
        seen.append(idx.clone())
        model = train_classifier(linear(), x, y, idx, epochs=3, seed=len(seen))
        return predict_logits(model, x)

    dm = fit_datamodels(train_and_predict, 16, num_models=6, fraction=0.5, ridge=1.0)
    assert len(seen) == 6 and all(0 < s.numel() < 16 for s in seen)
    assert dm.weights.shape == (16, 16, 3) and dm.bias.shape == (16, 3)


def test_dmm_targets_are_outputs_minus_the_forget_sets_datamodel_sum():
    x, y = toy()
    data = UnlearningData(x, y, torch.tensor([0, 3, 9]))
    model = train_classifier(linear(), x, y, epochs=20)
    g = torch.Generator().manual_seed(5)
    dm = Datamodels(0.3 * torch.randn(60, 60, 3, generator=g), torch.zeros(60, 3))
    before = predict_logits(model, x)
    target = before - dm.weights[data.forget].sum(0)
    err0 = float(((before - target) ** 2).mean())
    log = run_dmm(model, data, dm, epochs=40, lr=1e-2, batch_size=8)
    after = predict_logits(model, x)
    idx = torch.cat([data.forget])
    assert float(((after[idx] - target[idx]) ** 2).mean()) < 0.5 * float(((before[idx] - target[idx]) ** 2).mean())
    assert log.loss_last < log.loss_first and log.steps == 40 * math.ceil(12 / 8)
    assert err0 > 0 and log.examples == 40 * 12 + 60


def test_dmm_with_margin_datamodels_matches_margins():
    x, y = toy()
    data = UnlearningData(x, y, torch.tensor([1, 2]))
    model = train_classifier(linear(), x, y, epochs=10)
    dm = Datamodels(torch.full((60, 60), 0.5), None, method="trak")
    m0 = margins_from_logits(predict_logits(model, x), y)
    run_dmm(model, data, dm, epochs=60, lr=1e-2)
    m1 = margins_from_logits(predict_logits(model, x), y)
    target = m0 - 1.0  # two forget points, 0.5 each
    assert (m1[data.forget] - target[data.forget]).abs().mean() < (m0[data.forget] - target[data.forget]).abs().mean()


def test_oracle_matching_moves_towards_the_retrained_model():
    x, y = toy()
    data = UnlearningData(x, y, torch.arange(10))
    model = train_classifier(linear(seed=0), x, y, epochs=20)
    oracle = train_classifier(linear(seed=1), x, y, data.retain, epochs=20, seed=1)
    target = predict_logits(oracle, x)
    d0 = float(((predict_logits(model, x) - target) ** 2).mean())
    log = run_oracle_matching(model, data, target, epochs=50, lr=1e-2, batch_size=16)
    assert float(((predict_logits(model, x) - target) ** 2).mean()) < d0 and log.method == "oracle-matching"


def test_baselines_do_what_they_say():
    x, y = toy()
    data = UnlearningData(x, y, torch.arange(8))
    ce = lambda m, idx: float(nn.functional.cross_entropy(predict_logits(m, x[idx]), y[idx]))
    base = train_classifier(linear(), x, y, epochs=20)
    m = linear(); m.load_state_dict(base.state_dict())
    run_gradient_ascent(m, data, epochs=3, lr=0.1)
    assert ce(m, data.forget) > ce(base, data.forget)
    m = linear(); m.load_state_dict(base.state_dict())
    run_retain_finetune(m, data, epochs=5, lr=0.05)
    assert ce(m, data.retain) <= ce(base, data.retain) + 1e-3
    m = linear(); m.load_state_dict(base.state_dict())
    log = run_gradient_difference(m, data, epochs=3, lr=0.1, batch_size=4)
    assert ce(m, data.forget) > ce(base, data.forget) and log.steps == 6 and log.examples == 48


def test_registered_as_recipes_in_the_unlearning_family():
    names = losskit.names(kind="recipe", family="unlearning")
    assert {"dmm", "oracle-matching", "gradient-ascent", "gradient-difference", "retain-finetune"} <= set(names)
    r = losskit.get("gradient-ascent", epochs=1)
    x, y = toy()
    assert r(linear(), UnlearningData(x, y, [0])).steps == 1


def test_bad_input_is_refused_clearly():
    x, y = toy()
    with pytest.raises(ValueError, match="overlap the training set"):
        UnlearningData(x, y, torch.tensor([60, 61]))
    with pytest.raises(ValueError, match="selects no training point"):
        UnlearningData(x, y, torch.zeros(60, dtype=torch.bool))
    with pytest.raises(ValueError, match="selects no training point"):
        UnlearningData(x, y, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="covers all"):
        UnlearningData(x, y, torch.arange(60))
    with pytest.raises(ValueError, match="boolean mask"):
        UnlearningData(x, y, torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="y: expected int64"):
        UnlearningData(x, y[:5], [0])
    data = UnlearningData(x, y, [0])
    with pytest.raises(ValueError, match="fitted for 10 training points"):
        run_dmm(linear(), data, Datamodels(torch.zeros(10, 60, 3)))
    with pytest.raises(ValueError, match="oracle_outputs"):
        run_oracle_matching(linear(), data, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="lr"):
        run_gradient_ascent(linear(), data, lr=0.0)
    with pytest.raises(ValueError, match="at least 2 models"):
        ridge_datamodels(torch.ones(1, 5, dtype=torch.bool), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="fraction"):
        subset_masks(10, 3, 1.0)


def test_trak_datamodels_on_cpu():
    pytest.importorskip("trak")
    from losskit.recipes.unlearning import trak_datamodels
    x, y = toy(n=240)
    ckpts = []
    for s in range(2):
        m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        train_classifier(m, x, y, epochs=5, seed=s)
        ckpts.append({k: v.clone() for k, v in m.state_dict().items()})
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    dm = trak_datamodels(model, ckpts, (x, y), (x[:6], y[:6]), proj_dim=200)
    assert dm.weights.shape == (240, 6) and dm.bias is None and torch.isfinite(dm.weights).all()
    with pytest.raises(ValueError, match="proj_dim"):
        trak_datamodels(model, ckpts, (x, y), (x[:6], y[:6]), proj_dim=64)


def test_trak_refuses_a_singular_gram_matrix():
    pytest.importorskip("trak")
    from losskit.recipes.unlearning import trak_datamodels
    x, y = toy(n=150)
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="expected proj_dim < n_train or lambda_reg > 0"):
        trak_datamodels(m, [m.state_dict()], (x, y), (x[:4], y[:4]), proj_dim=200)
