"""IGNITE: the finite-difference gradient of the sharpness term against the
exact Hessian-vector product, the dual update (clamped or not), and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import losskit
from losskit.recipes.ignite import IGNITE, run_ignite


class Quadratic(nn.Module):
    """f(x) = (x . w)^2 + x . v: G = mean f is quadratic in (w, v), so the
    finite difference is the Hessian-vector product exactly."""

    def __init__(self, d=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, x):
        return (x @ self.w) ** 2 + x @ self.v


def _xy(n=16, d=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, torch.randn(n, generator=g, dtype=torch.float64)


def _reference_grad(model, x, y, lam, rho, r, exact):
    """grad L + (lam rho / r)(grad G(beta + r g/||g||) - grad G(beta)) written
    out, or with ``exact``: grad L + lam rho H g / ||g|| = grad of
    L + lam rho ||grad G|| (double backward)."""
    ps = list(model.parameters())
    L = ((model(x) - y) ** 2).mean()
    gL = torch.autograd.grad(L, ps)
    G = model(x).mean()
    g = torch.autograd.grad(G, ps, create_graph=exact)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    if exact:
        reg = torch.autograd.grad(lam * rho * norm, ps, allow_unused=True, materialize_grads=True)
        return [a + b for a, b in zip(gL, reg)], float(norm)
    with torch.no_grad():
        saved = [p.clone() for p in ps]
        for p, gi in zip(ps, g):
            p.add_(r * gi / norm)
    gh = torch.autograd.grad(model(x).mean(), ps)
    with torch.no_grad():
        for p, s in zip(ps, saved):
            p.copy_(s)
    return [a + lam * rho / r * (b - c) for a, b, c in zip(gL, gh, g)], float(norm)


def _ignite_grad(model, x, y, **kw):
    """The gradient IGNITE hands to the optimizer (SGD lr 1: the step is -grad)."""
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ig = IGNITE(model, opt, **kw)
    log = ig.step(lambda: ((model(x) - y) ** 2).mean(), x)
    grads = [b - p.detach() for b, p in zip(before, model.parameters())]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    return grads, log


def test_quadratic_surrogate_finite_difference_is_the_exact_hvp():
    x, y = _xy()
    kw = dict(rho=0.05, r=0.05, lambda_init=2.0, eps=0.1, dual_lr=1e-3)
    got, log = _ignite_grad(Quadratic(), x, y, **kw)
    exact, norm = _reference_grad(Quadratic(), x, y, 2.0, 0.05, 0.05, exact=True)
    for a, b in zip(got, exact):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert log.grad_norm == pytest.approx(norm, rel=1e-12)
    assert log.lam == pytest.approx(2.0 + 1e-3 * (0.05 * norm - 0.1), rel=1e-12)


def test_nonlinear_surrogate_matches_the_written_out_step_and_converges_to_the_hvp():
    x, y = _xy(d=4)

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1), nn.Flatten(0)).double()

    got, _ = _ignite_grad(net(), x, y, rho=0.05, r=0.05, lambda_init=3.0)
    ref, _ = _reference_grad(net(), x, y, 3.0, 0.05, 0.05, exact=False)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    exact, _ = _reference_grad(net(), x, y, 3.0, 0.05, None, exact=True)
    errs = []
    for r in (1e-1, 1e-2, 1e-3):
        g, _ = _ignite_grad(net(), x, y, rho=0.05, r=r, lambda_init=3.0)
        errs.append(math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(g, exact))))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-2 * errs[0] * 10, errs


def test_lambda_zero_is_plain_training_and_parameters_are_restored():
    x, y = _xy()
    m1, m2 = Quadratic(), Quadratic()
    o1 = torch.optim.Adam(m1.parameters(), lr=1e-2)
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    ig = IGNITE(m1, o1, lambda_init=0.0, dual_lr=0.0)
    for _ in range(3):
        ig.step(lambda: ((m1(x) - y) ** 2).mean(), x)
        o2.zero_grad()
        ((m2(x) - y) ** 2).mean().backward()
        o2.step()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    # lr 0: the perturbation beta + r g/||g|| is undone exactly
    m3 = Quadratic()
    before = [p.detach().clone() for p in m3.parameters()]
    IGNITE(m3, torch.optim.SGD(m3.parameters(), lr=0.0), lambda_init=1.0).step(
        lambda: ((m3(x) - y) ** 2).mean(), x)
    assert all(torch.equal(a, b) for a, b in zip(before, m3.parameters()))


def test_dual_update_is_clamped_at_zero_by_default():
    """A slack constraint (eps large) drives lambda down: clamped at 0 by
    default, negative with clamp_lambda=False (the official code)."""
    x, y = _xy()
    lams = {}
    for clamp in (True, False):
        m = Quadratic()
        ig = IGNITE(m, torch.optim.SGD(m.parameters(), lr=1e-3), eps=1e3, dual_lr=1e-3, lambda_init=0.5,
                    clamp_lambda=clamp)
        for _ in range(3):
            log = ig.step(lambda: ((m(x) - y) ** 2).mean(), x)
        lams[clamp] = log.lam
        assert log.constraint < 0
    assert lams[True] == 0.0 and lams[False] < 0
    sd = ig.state_dict()
    ig2 = IGNITE(m, torch.optim.SGD(m.parameters(), lr=1e-3), clamp_lambda=False)
    ig2.load_state_dict(sd)
    assert ig2.lam == lams[False] and ig2.steps == 3


def test_bad_input_is_a_clear_error():
    m = Quadratic()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="r:"):
        IGNITE(m, opt, r=0.0)
    with pytest.raises(ValueError, match="rho"):
        IGNITE(m, opt, rho=-1.0)
    with pytest.raises(ValueError, match="lambda_init"):
        IGNITE(m, opt, lambda_init=-1.0)
    with pytest.raises(TypeError, match="optimizer"):
        IGNITE(m, None)
    x, y = _xy()
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="inputs"):
        IGNITE(m, opt).step(lambda: ((m(x) - y) ** 2).mean(), x)
    with pytest.raises(ValueError, match="data\\[1\\]"):
        run_ignite(m, (torch.randn(4, 5, dtype=torch.float64), torch.randn(3)))


def test_recipe_trains_with_and_without_the_regulariser():
    x, y = _xy(n=64)
    r = losskit.get("ignite", epochs=3, batch_size=16, lr=1e-2)
    logs = r(Quadratic(), (x, y))
    assert len(logs) == 12 and all(math.isfinite(lg.loss) for lg in logs)
    base = losskit.get("ignite", epochs=3, batch_size=16, lr=1e-2, regularise=False)(Quadratic(), (x, y))
    assert len(base) == 12 and all(math.isnan(lg.grad_norm) for lg in base)


def test_bfloat16_surrogate_stays_finite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1), nn.Flatten(0)).bfloat16()
    x, y = _xy(n=32)
    x, y = x.bfloat16(), y.bfloat16()
    ig = IGNITE(model, torch.optim.Adam(model.parameters(), lr=1e-2), lambda_init=1.0)
    logs = [ig.step(lambda: ((model(x) - y) ** 2).mean(), x) for _ in range(5)]
    assert all(math.isfinite(lg.loss) and math.isfinite(lg.grad_norm) for lg in logs)
    assert all(torch.isfinite(p).all() for p in model.parameters())
