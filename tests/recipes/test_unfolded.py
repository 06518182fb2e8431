"""Deep-unfolded ISTA/IHT: layers equal the algorithms written element by
element from their equations; gradients are right (float64 gradcheck);
training lowers the loss it trains; bad input is refused."""

import math

import pytest
import torch

import losskit
from losskit.functional.sparse import hard_threshold, l0_objective, l1_objective, soft_threshold
from losskit.recipes.unfolded import (SparseProblem, UnfoldedIHT, UnfoldedISTA, supervised_loss, train_unfolded,
                                      unsupervised_loss)


def _ref_iterations(a, y, steps, lam, hard):
    """ISTA / IHT for one signal, loops over coordinates (the papers' update rules)."""
    m, n = len(a), len(a[0])
    x = [0.0] * n
    for step in steps:
        r = [y[i] - sum(a[i][j] * x[j] for j in range(n)) for i in range(m)]
        v = [x[j] + step * sum(a[i][j] * r[i] for i in range(m)) for j in range(n)]
        if hard:
            t = math.sqrt(2 * lam * step)
            x = [vj if abs(vj) > t else 0.0 for vj in v]
        else:
            t = step * lam
            x = [math.copysign(max(abs(vj) - t, 0.0), vj) for vj in v]
    return x


@pytest.mark.parametrize("cls,hard", [(UnfoldedISTA, False), (UnfoldedIHT, True)])
def test_layers_equal_the_algorithm_from_its_equations(cls, hard):
    pb = SparseProblem(n=12, m=6, p=0.3, seed=3, dtype=torch.float64)
    y, _ = pb.sample(2)
    model = cls(pb.a, lam=0.05, layers=5)
    with torch.no_grad():
        model.steps.copy_(torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64))
        out = model(y)
    for b in range(2):
        ref = _ref_iterations(pb.a.tolist(), y[b].tolist(), model.steps.tolist(), 0.05, hard)
        torch.testing.assert_close(out[b], torch.tensor(ref, dtype=torch.float64))


def test_thresholds_and_objectives_from_their_definitions():
    v = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5])
    torch.testing.assert_close(soft_threshold(v, 0.5), torch.tensor([-1.5, 0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(hard_threshold(v, 0.5), torch.tensor([-2.0, 0.0, 0.0, 0.0, 1.5]))
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    x = torch.tensor([[1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0]])
    # residual (-1, 1): 1/2 * 2 = 1; ||x||_1 = 1, ||x||_0 = 1
    torch.testing.assert_close(l1_objective(x, y, a, 0.5), torch.tensor([1.5]))
    torch.testing.assert_close(l0_objective(x, y, a, 0.5), torch.tensor([1.5]))


@pytest.mark.parametrize("cls", [UnfoldedISTA, UnfoldedIHT])
@pytest.mark.parametrize("loss", ["supervised", "unsupervised"])
def test_gradcheck_of_the_losses_in_the_step_sizes(cls, loss):
    pb = SparseProblem(n=8, m=5, p=0.4, seed=1, dtype=torch.float64)
    y, x_true = pb.sample(3)
    model = cls(pb.a, lam=0.05, layers=3)

    def f(steps):
        with torch.no_grad():
            model.steps.copy_(steps)
        xs = x_true
        x = torch.zeros(3, 8, dtype=torch.float64)
        for t in range(3):
            x = model._step_fn(x, y, model.a, steps[t], model.lam)
        return supervised_loss(x, xs) if loss == "supervised" else model.objective_value(x, y).mean()

    steps = torch.tensor([0.11, 0.23, 0.17], dtype=torch.float64, requires_grad=True)
    # away from the thresholds' kinks the losses are smooth in the steps
    assert torch.autograd.gradcheck(f, (steps,), eps=1e-7, atol=1e-5)


@pytest.mark.parametrize("loss", ["supervised", "unsupervised"])
def test_training_lowers_the_trained_loss(loss):
    torch.manual_seed(0)
    pb = SparseProblem(n=32, m=16, p=0.1, seed=0)
    model = UnfoldedISTA(pb.a, lam=0.02, layers=4)
    before = model.steps.detach().clone()
    y, x = pb.with_conditions(seed=7).sample(256)
    with torch.no_grad():
        v0 = supervised_loss(model(y), x) if loss == "supervised" else unsupervised_loss(model, model(y), y)
    log = losskit.get("deep-unfolding", loss=loss, iterations=60, lr=1e-2)(model, pb)
    with torch.no_grad():
        v1 = supervised_loss(model(y), x) if loss == "supervised" else unsupervised_loss(model, model(y), y)
    assert not torch.equal(before, model.steps.detach())
    assert float(v1) < float(v0) and math.isfinite(log.test_nmse_db)


def test_bf16_forward_has_no_nan():
    pb = SparseProblem(n=32, m=16, seed=0, dtype=torch.bfloat16)
    y, _ = pb.sample(8)
    for cls in (UnfoldedISTA, UnfoldedIHT):
        out = cls(pb.a, lam=0.02, layers=4)(y)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_snr_of_the_generated_measurements():
    pb = SparseProblem(n=256, m=128, p=0.1, snr_db=20.0, seed=0, dtype=torch.float64)
    y, x = pb.sample(2000)
    clean = x @ pb.a.T
    snr = 10 * math.log10(float((clean ** 2).sum() / ((y - clean) ** 2).sum()))
    assert snr == pytest.approx(20.0, abs=0.3)


def test_bad_input():
    pb = SparseProblem(n=8, m=4)
    model = UnfoldedISTA(pb.a, lam=0.1, layers=2)
    with pytest.raises(ValueError, match=r"y must be \[B, M\] with M = 4"):
        model(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="lam"):
        UnfoldedISTA(pb.a, lam=0.0)
    with pytest.raises(ValueError, match="step"):
        UnfoldedIHT(pb.a, lam=0.1, step=-1.0)
    with pytest.raises(ValueError, match="layers"):
        UnfoldedIHT(pb.a, lam=0.1, layers=0)
    with pytest.raises(ValueError, match="loss"):
        train_unfolded(model, pb, loss="mse")
    with pytest.raises(ValueError, match="lr"):
        train_unfolded(model, pb, lr=0.0)
    with pytest.raises(ValueError, match="problem's A"):
        train_unfolded(model, SparseProblem(n=9, m=4))
    with pytest.raises(ValueError, match=r"p: expected a value in \(0, 1\]"):
        SparseProblem(p=0.0)
