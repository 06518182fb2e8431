"""Normalized LR+GD (Tyurin 2024): the paper's worst-case table, a reference
written from the update rule, stability where every weight underflows, bad input."""

import math

import numpy as np
import pytest
import torch

import losskit
from losskit.optim import NormalizedLRGD
from losskit.optim.normalized_lrgd import (check_linearly_separable, iterations_to_separate, normalized_weights,
                                           worst_case_dataset)


def _reference_iterations(a, y, gamma, normalized, max_iter=100_000):
    """The paper's update in plain numpy loops over samples (eq. for LR+GD and Normalized LR+GD)."""
    a = np.asarray(a, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = a.shape
    theta = np.zeros(d)
    for t in range(max_iter):
        m = [y[i] * float(a[i] @ theta) for i in range(n)]
        if all(mi > 0 for mi in m):
            return t
        w = [1.0 / (1.0 + math.exp(mi)) for mi in m]  # sigma(-m_i); margins here stay moderate
        step = np.zeros(d)
        for i in range(n):
            step += w[i] * y[i] * a[i]
        theta = theta + gamma * (step / sum(w) if normalized else step / n)
    return None


@pytest.mark.parametrize("gamma,expected", [(100, 2), (10, 2), (1, 16), (0.1, 157)])
def test_the_paper_s_worst_case_table_normalized(gamma, expected):
    a, y = worst_case_dataset(1000)
    assert iterations_to_separate(a, y, gamma, normalized=True) == expected


def test_the_paper_s_worst_case_table_plain_lrgd_at_gamma_100():
    a, y = worst_case_dataset(1000)
    assert iterations_to_separate(a, y, 100, normalized=False) == 308


@pytest.mark.parametrize("normalized", [True, False])
def test_matches_a_loop_reference_on_random_separable_data(normalized):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 3, generator=g, dtype=torch.float64)
    w_true = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = torch.sign(a @ w_true)
    ours = iterations_to_separate(a, y, 0.5, normalized=normalized)
    assert ours == _reference_iterations(a, y, 0.5, normalized)


def test_one_step_equals_the_update_rule():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y = torch.where(torch.rand(20, generator=g) > 0.5, 1.0, -1.0).double()
    theta0 = torch.randn(4, generator=g, dtype=torch.float64)
    for normalized in (True, False):
        theta = theta0.clone().requires_grad_(True)
        opt = NormalizedLRGD([theta], lr=0.7, normalized=normalized)
        loss = opt.step(lambda: y * (a @ theta))
        m = y * (a @ theta0)
        w = torch.sigmoid(-m)
        direction = (w[:, None] * y[:, None] * a).sum(0)
        expected = theta0 + 0.7 * (direction / w.sum() if normalized else direction / 20)
        torch.testing.assert_close(theta.detach(), expected)
        torch.testing.assert_close(loss, torch.nn.functional.softplus(-m).mean())
        assert theta.grad is None  # .grad is left alone


def test_normalized_weights_survive_underflow_of_every_weight():
    m = torch.tensor([800.0, 801.0, 805.0], dtype=torch.float64)  # sigma(-m) underflows to 0 in float64
    assert float(torch.sigmoid(-m).sum()) == 0.0
    p = normalized_weights(m)
    ref = torch.tensor([1.0, math.exp(-1), math.exp(-5)], dtype=torch.float64)
    torch.testing.assert_close(p, ref / ref.sum())
    theta = torch.tensor([1000.0, 0.0], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([[0.8, 0.1], [0.801, -0.2], [0.805, 0.3]], dtype=torch.float64)
    NormalizedLRGD([theta], lr=1.0).step(lambda: a @ theta)
    assert torch.isfinite(theta).all() and float(theta[0]) > 1000.0


def test_bf16_margins_give_a_finite_step():
    theta = torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)
    a, y = worst_case_dataset(50, dtype=torch.bfloat16)
    opt = NormalizedLRGD([theta], lr=10.0)
    for _ in range(3):
        loss = opt.step(lambda: y * (a @ theta))
    assert torch.isfinite(theta).all() and torch.isfinite(loss) and loss.dtype == torch.bfloat16


def test_registered_and_built_by_get():
    theta = torch.zeros(2, requires_grad=True)
    opt = losskit.get("normalized-lr-gd", [theta], lr=1.0)
    assert isinstance(opt, NormalizedLRGD) and opt.hparams == {"lr": 1.0, "normalized": True}
    assert losskit.spec("normalized-lr-gd").paper.arxiv == "2412.08424"


def test_bad_input():
    theta = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        NormalizedLRGD([theta], lr=0.0)
    with pytest.raises(ValueError, match="lr"):
        NormalizedLRGD([theta], lr=-1.0)
    opt = NormalizedLRGD([theta], lr=1.0)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match=r"1-D tensor \[n\]; got \[2, 2\]"):
        opt.step(lambda: theta.expand(2, 2))
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(lambda: theta * float("nan"))
    with pytest.raises(ValueError, match="requires_grad"):
        opt.step(lambda: torch.ones(3))
    # non-separable data: the separation count is undefined
    a = torch.tensor([[1.0], [1.0]])
    y = torch.tensor([1.0, -1.0])
    with pytest.raises(ValueError, match="not linearly separable"):
        iterations_to_separate(a, y, 1.0)
    with pytest.raises(ValueError, match="labels must be in"):
        check_linearly_separable(a, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="lr"):
        iterations_to_separate(*worst_case_dataset(10), 0.0)
