"""Log-barrier FTRL policy optimisation for adversarial linear MDPs (Dai et
al. 2023): the FTRL step against a direct minimisation, the estimator's
exact expectation over every trajectory, values and the best policy against
enumeration, the span check, and a short run."""

import itertools

import numpy as np
import pytest

import losskit
from losskit.recipes.linear_mdp import (LayeredLinearMDP, best_fixed_policy, estimate_q, exp_weights_policy,
                                        log_barrier_policy, policy_value, random_linear_mdp,
                                        run_policy_optimization, switching_losses)


def _ftrl_objective(p, c, eta):
    return float(p @ c - np.log(p).sum() / eta)


@pytest.mark.parametrize("c", [[0.3, -2.0, 5.0, 0.0], [1e4, 1e4 + 1, 1e4 - 3, 1e4], [-50.0, -49.0, -48.5, 10.0]])
@pytest.mark.parametrize("eta", [0.01, 0.5, 3.0])
def test_log_barrier_step_is_the_ftrl_minimiser(c, eta):
    c = np.array(c)
    p = log_barrier_policy(c, eta)
    assert p.sum() == pytest.approx(1.0, abs=1e-12) and np.all(p > 0)
    # KKT: 1/p_a = eta (c_a + nu) for one nu: c_a + nu is the same affine function of 1/p_a
    nu = 1.0 / (eta * p) - c
    assert np.ptp(nu) < 1e-8 * max(1.0, np.abs(nu).max())
    # and no random point of the simplex does better
    rng = np.random.default_rng(0)
    best = _ftrl_objective(p, c, eta)
    for q in rng.dirichlet(np.ones(4), size=2000):
        assert _ftrl_objective(q, c, eta) >= best - 1e-9


def test_exp_weights_is_a_softmax():
    c = np.array([[0.0, 1.0, 2.0], [5.0, 5.0, -1.0]])
    p = exp_weights_policy(c, 0.7)
    ref = np.exp(-0.7 * c) / np.exp(-0.7 * c).sum(-1, keepdims=True)
    np.testing.assert_allclose(p, ref)


def _tiny():
    return random_linear_mdp(horizon=2, states=2, actions=2, dim=2, seed=3)


def _trajectories(mdp, pi):
    """Every (states, actions) path with its probability."""
    for path in itertools.product(range(mdp.S), range(mdp.A), repeat=mdp.H):
        ss, aa = path[0::2], path[1::2]
        prob = mdp.start[ss[0]]
        for h in range(mdp.H):
            prob *= pi[h, ss[h], aa[h]]
            if h < mdp.H - 1:
                prob *= mdp.transitions[h, ss[h], aa[h], ss[h + 1]]
        yield list(zip(ss, aa)), prob


def _exact_q(mdp, pi, losses):
    q = np.zeros_like(losses)
    v = np.zeros(mdp.S)
    for h in reversed(range(mdp.H)):
        q[h] = losses[h] + (mdp.transitions[h] @ v if h < mdp.H - 1 else 0.0)
        v = (pi[h] * q[h]).sum(-1)
    return q


def test_estimator_is_unbiased_over_every_trajectory():
    mdp = _tiny()
    pi = np.random.default_rng(1).dirichlet(np.ones(mdp.A), size=(mdp.H, mdp.S))
    losses = mdp.losses(switching_losses(mdp, 1, seed=2)[0])
    mean = np.zeros_like(losses)
    total = 0.0
    for visited, prob in _trajectories(mdp, pi):
        observed = [losses[h, s, a] for h, (s, a) in enumerate(visited)]
        mean += prob * estimate_q(mdp, pi, visited, observed, gamma=1e-12)[0]
        total += prob
    assert total == pytest.approx(1.0)
    np.testing.assert_allclose(mean, _exact_q(mdp, pi, losses), atol=1e-7)


def test_value_and_best_policy_against_enumeration():
    mdp = _tiny()
    losses = mdp.losses(switching_losses(mdp, 1, seed=4)[0])
    pi = np.random.default_rng(5).dirichlet(np.ones(mdp.A), size=(mdp.H, mdp.S))
    ref = sum(prob * sum(losses[h, s, a] for h, (s, a) in enumerate(v)) for v, prob in _trajectories(mdp, pi))
    assert policy_value(mdp, pi, losses) == pytest.approx(ref)
    values = []
    for choice in itertools.product(range(mdp.A), repeat=mdp.H * mdp.S):
        det = np.zeros((mdp.H, mdp.S, mdp.A))
        for i, a in enumerate(choice):
            det[i // mdp.S, i % mdp.S, a] = 1.0
        values.append(policy_value(mdp, det, losses))
    assert best_fixed_policy(mdp, losses)[1] == pytest.approx(min(values))


def test_a_run_and_its_regret_bookkeeping():
    mdp = random_linear_mdp(seed=0)
    th = switching_losses(mdp, 60, seed=1)
    run = losskit.get("log-barrier-po", eta=0.2)(mdp, th)
    assert run.regret.shape == (60,) and np.all(np.isfinite(run.regret))
    summed = sum(mdp.losses(t) for t in th)
    assert run.final == pytest.approx(run.learner_values.sum() - best_fixed_policy(mdp, summed)[1])
    again = run_policy_optimization(mdp, th, eta=0.2)
    np.testing.assert_array_equal(run.regret, again.regret)  # seeded
    base = run_policy_optimization(mdp, th, regulariser="exp-weights", eta=0.2)
    assert np.all(np.isfinite(base.regret))


def test_bad_input():
    mdp = _tiny()
    # transitions that no linear map of the (here rank-1) features reproduces
    phi = np.ones((2, 2, 2, 1))
    p = np.zeros((1, 2, 2, 2))
    p[0, :, 0, 0] = 1.0
    p[0, :, 1, 1] = 1.0
    with pytest.raises(ValueError, match="do not span the MDP's Q-functions"):
        LayeredLinearMDP(phi, p, np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"transitions must be \[H - 1, S, A, S\]"):
        LayeredLinearMDP(mdp.phi, mdp.transitions[:, :1], mdp.start)
    with pytest.raises(ValueError, match="start must be a distribution"):
        LayeredLinearMDP(mdp.phi, mdp.transitions, np.array([0.7, 0.7]))
    with pytest.raises(ValueError, match="eta"):
        log_barrier_policy(np.zeros(3), 0.0)
    with pytest.raises(ValueError, match=r"thetas must be \[K, H, d\]"):
        run_policy_optimization(mdp, np.zeros((3, 5, 2)))
    with pytest.raises(ValueError, match="regulariser"):
        run_policy_optimization(mdp, switching_losses(mdp, 2), regulariser="tsallis")
