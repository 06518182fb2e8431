"""Policy optimisation with log-barrier FTRL for adversarial linear MDPs, with a simulator.

Dai, Luo, Wei and Zimmert, "Refined Regret for Adversarial MDPs with Linear
Function Approximation" (ICML 2023, arXiv:2301.12942; no official code).  An
episodic layered MDP (layers ``h = 0..H-1``, ``S`` states per layer, ``A``
actions) whose losses change arbitrarily between the ``K`` episodes (an
oblivious adversary) and whose Q-functions are linear in known features
``phi(s, a)``.  The learner sees only the losses along its own trajectory
(bandit feedback); the simulator gives it the covariance of the features
under its own policy.  Each episode ``k``:

1. play ``pi_k``; observe ``l_h = l_{k,h}(s_h, a_h)`` and the losses-to-go
   ``L_h = sum_{h' >= h} l_{h'}``;
2. estimate ``theta_h = (gamma I + Sigma_h)^-1 phi(s_h, a_h) L_h`` with
   ``Sigma_h = E_{pi_k}[phi phi^T]`` at layer ``h`` (exact from the simulator
   here; the paper estimates it with simulator rollouts), so that
   ``Q_hat_h(s, a) = phi(s, a)^T theta_h`` -- an estimator that can be
   arbitrarily negative;
3. the dilated bonus ``B_h(s, a) = b_h(s, a) + (1 + 1/H) E_{s', a' ~ pi_k} B_{h+1}(s', a')``
   with ``b_h(s, a) = beta ||phi(s, a)||^2_{(gamma I + Sigma_h)^-1}``;
4. per state, FTRL with the log-barrier ``-(1/eta) sum_a log p_a`` on the
   cumulative ``Q_hat - B``: ``p_a = 1 / (eta (C_a + nu))``, the normaliser
   ``nu`` found by Newton's method (:func:`log_barrier_policy`).

The baseline is the same loop with exponential weights (negative entropy):
``p ~ exp(-eta C)``.  Regret is measured exactly with the simulator:
``sum_k V_k^{pi_k} - min_pi sum_k V_k^pi`` (the best fixed policy in
hindsight is a dynamic programme on the summed losses).

Learning rates default to the scales of the analysis, ``eta = 1 / (H sqrt(A K))``,
``gamma = 1 / sqrt(K)``, ``beta = eta``; their constants are ours (docs/theory.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from losskit.core.checks import check_choice, check_hparam, check_int
from losskit.core.registry import Paper, register

__all__ = ["LayeredLinearMDP", "random_linear_mdp", "switching_losses", "log_barrier_policy", "exp_weights_policy",
           "policy_value", "best_fixed_policy", "estimate_q", "run_policy_optimization", "RegretRun", "DAI_PAPER"]

DAI_PAPER = Paper("Refined Regret for Adversarial MDPs with Linear Function Approximation", 2023, "2301.12942")


class LayeredLinearMDP:
    """``phi [H, S, A, d]``, ``transitions [H - 1, S, A, S]`` (layer h to h + 1), ``start [S]``.

    Refuses an MDP whose features do not span its transitions: then the
    Q-function of some policy is not linear in ``phi`` and the estimator
    is not unbiased (``P_h(. | s, a) = phi(s, a)^T M_h`` must hold).
    """

    def __init__(self, phi: np.ndarray, transitions: np.ndarray, start: np.ndarray, *, tol: float = 1e-8):
        phi = np.asarray(phi, dtype=np.float64)
        p = np.asarray(transitions, dtype=np.float64)
        start = np.asarray(start, dtype=np.float64)
        if phi.ndim != 4:
            raise ValueError(f"phi must be [H, S, A, d]; got shape {list(phi.shape)}")
        h, s, a, _ = phi.shape
        if p.shape != (h - 1, s, a, s):
            raise ValueError(f"transitions must be [H - 1, S, A, S] = {[h - 1, s, a, s]}; got {list(p.shape)}")
        if start.shape != (s,) or np.any(start < 0) or not np.isclose(start.sum(), 1.0):
            raise ValueError(f"start must be a distribution over the {s} first-layer states")
        if np.any(p < -tol) or not np.allclose(p.sum(-1), 1.0):
            raise ValueError("transitions must be distributions over the next layer's states (rows >= 0, sum 1)")
        for layer in range(h - 1):
            f = phi[layer].reshape(s * a, -1)
            target = p[layer].reshape(s * a, s)
            m, *_ = np.linalg.lstsq(f, target, rcond=None)
            resid = float(np.abs(f @ m - target).max())
            if resid > 1e-6:
                raise ValueError(f"the features do not span the MDP's Q-functions: layer {layer}'s transitions are "
                                 f"not linear in phi (least-squares residual {resid:.3g}); a linear-Q method's "
                                 "estimates would be biased")
        self.phi, self.transitions, self.start = phi, p, start
        self.H, self.S, self.A, self.d = phi.shape

    def losses(self, theta: np.ndarray) -> np.ndarray:
        """``[H, S, A]`` losses ``phi(s, a)^T theta_h`` for ``theta [H, d]``."""
        return np.einsum("hsad,hd->hsa", self.phi, theta)

    def occupancy(self, policy: np.ndarray) -> np.ndarray:
        """``[H, S, A]``: probability of visiting ``(s, a)`` at layer ``h`` under ``policy [H, S, A]``."""
        q = np.zeros((self.H, self.S, self.A))
        state = self.start.copy()
        for h in range(self.H):
            q[h] = state[:, None] * policy[h]
            if h < self.H - 1:
                state = np.einsum("sa,sat->t", q[h], self.transitions[h])
        return q


def random_linear_mdp(horizon: int = 3, states: int = 4, actions: int = 4, dim: int = 6,
                      seed: int = 0) -> LayeredLinearMDP:
    """A latent-variable linear MDP: ``phi(s, a)`` on the simplex of ``dim`` latent
    states, ``P(s' | s, a) = sum_i phi_i(s, a) mu_i(s')``; losses ``phi^T theta``
    with ``theta in [0, 1]^dim`` lie in [0, 1]."""
    horizon = check_int("horizon", horizon, low=1)
    rng = np.random.default_rng(seed)
    phi = rng.dirichlet(np.full(dim, 0.3), size=(horizon, states, actions))
    mu = rng.dirichlet(np.full(states, 0.5), size=(max(horizon - 1, 0), dim))
    p = np.einsum("hsad,hdt->hsat", phi[:-1], mu) if horizon > 1 else np.zeros((0, states, actions, states))
    return LayeredLinearMDP(phi, p, np.full(states, 1.0 / states))


def switching_losses(mdp: LayeredLinearMDP, episodes: int, seed: int = 0, noise: float = 0.1) -> np.ndarray:
    """``[K, H, d]`` loss parameters in [0, 1]: two loss vectors that swap on
    phases of doubling length (which defeats follow-the-leader), plus uniform noise."""
    episodes = check_int("episodes", episodes, low=1)
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.8, size=(2, mdp.H, mdp.d))
    out = np.empty((episodes, mdp.H, mdp.d))
    phase, length, k = 0, 1, 0
    while k < episodes:
        n = min(length, episodes - k)
        out[k:k + n] = base[phase]
        k += n
        phase, length = 1 - phase, length * 2
    return np.clip(out + rng.uniform(-noise, noise, size=out.shape), 0.0, 1.0)


def log_barrier_policy(cum: np.ndarray, eta: float, *, tol: float = 1e-12, max_iter: int = 100) -> np.ndarray:
    """``argmin_p <p, C> - (1/eta) sum_a log p_a`` over the simplex, per row of ``C [..., A]``.

    ``p_a = 1 / (eta (C_a + nu))`` with ``nu > -min C`` solving ``sum p = 1``;
    ``f(nu) = sum_a 1 / (eta (C_a + nu)) - 1`` is convex and decreasing, and
    Newton's method from ``nu_0 = 1/eta - min C`` (where ``f >= 0``) climbs to the
    root without overshooting.
    """
    eta = check_hparam("eta", eta, low=0, low_open=True)
    c = np.asarray(cum, dtype=np.float64)
    c = c - c.min(-1, keepdims=True)  # the solution is shift-invariant; keeps nu in [1/eta - .., 1/eta]
    nu = np.full(c.shape[:-1] + (1,), 1.0 / eta)
    for _ in range(max_iter):
        z = eta * (c + nu)
        f = (1.0 / z).sum(-1, keepdims=True) - 1.0
        if np.all(np.abs(f) < tol):
            break
        fp = -(eta / z ** 2).sum(-1, keepdims=True)
        nu = nu - f / fp
    p = 1.0 / (eta * (c + nu))
    return p / p.sum(-1, keepdims=True)


def exp_weights_policy(cum: np.ndarray, eta: float) -> np.ndarray:
    """``p ~ exp(-eta C)`` per row (negative-entropy FTRL)."""
    eta = check_hparam("eta", eta, low=0, low_open=True)
    z = -eta * np.asarray(cum, dtype=np.float64)
    z -= z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def policy_value(mdp: LayeredLinearMDP, policy: np.ndarray, losses: np.ndarray) -> float:
    """Expected total loss of ``policy [H, S, A]`` under ``losses [H, S, A]``."""
    return float((mdp.occupancy(policy) * losses).sum())


def best_fixed_policy(mdp: LayeredLinearMDP, losses: np.ndarray) -> tuple[np.ndarray, float]:
    """The deterministic policy minimising the expected total of ``losses [H, S, A]`` (backward DP)."""
    v_next = np.zeros(mdp.S)
    policy = np.zeros((mdp.H, mdp.S, mdp.A))
    for h in reversed(range(mdp.H)):
        q = losses[h] + (mdp.transitions[h] @ v_next if h < mdp.H - 1 else 0.0)
        best = q.argmin(-1)
        policy[h, np.arange(mdp.S), best] = 1.0
        v_next = q.min(-1)
    return policy, float(mdp.start @ v_next)


def estimate_q(mdp: LayeredLinearMDP, policy: np.ndarray, visited: list[tuple[int, int]], observed: list[float],
               gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """The linear-Q estimate from one trajectory and the bonus features.

    ``Q_hat_h(s, a) = phi(s, a)^T (gamma I + Sigma_h)^-1 phi(s_h, a_h) L_h`` with
    ``L_h`` the observed loss-to-go and ``Sigma_h = E_{policy}[phi phi^T]`` at
    layer ``h`` (from the simulator); returns ``(Q_hat, w)`` with
    ``w_h(s, a) = ||phi(s, a)||^2_{(gamma I + Sigma_h)^-1}`` (``[H, S, A]`` each).
    Unbiased for ``Q^policy`` as ``gamma -> 0`` when ``Sigma_h`` is invertible.
    """
    to_go = np.cumsum(np.asarray(observed, dtype=np.float64)[::-1])[::-1]
    occ = mdp.occupancy(policy)
    q_hat = np.empty((mdp.H, mdp.S, mdp.A))
    w = np.empty((mdp.H, mdp.S, mdp.A))
    eye = np.eye(mdp.d)
    for h in range(mdp.H):
        sigma = np.einsum("sa,sad,sae->de", occ[h], mdp.phi[h], mdp.phi[h])
        inv = np.linalg.inv(gamma * eye + sigma)
        sh, ah = visited[h]
        q_hat[h] = mdp.phi[h] @ (inv @ mdp.phi[h, sh, ah] * to_go[h])
        w[h] = np.einsum("sad,de,sae->sa", mdp.phi[h], inv, mdp.phi[h])
    return q_hat, w


@dataclass
class RegretRun:
    regret: np.ndarray          # [K]: cumulative pseudo-regret after each episode (against the final best policy)
    learner_values: np.ndarray  # [K]: V_k^{pi_k}
    best_value: float           # min_pi sum_k V_k^pi

    @property
    def final(self) -> float:
        return float(self.regret[-1])


@register("log-barrier-po", family="theory", kind="recipe", paper=DAI_PAPER)
def run_policy_optimization(mdp: LayeredLinearMDP, thetas: np.ndarray, *, regulariser: str = "log-barrier",
                            eta: float | None = None, gamma: float | None = None, beta: float | None = None,
                            bonus: bool = True, seed: int = 0) -> RegretRun:
    """Run ``K = len(thetas)`` episodes against the loss parameters ``thetas [K, H, d]``."""
    if not isinstance(mdp, LayeredLinearMDP):
        raise TypeError(f"mdp must be a LayeredLinearMDP; got {type(mdp).__name__}")
    regulariser = check_choice("regulariser", regulariser, ("log-barrier", "exp-weights"))
    thetas = np.asarray(thetas, dtype=np.float64)
    if thetas.ndim != 3 or thetas.shape[1:] != (mdp.H, mdp.d) or thetas.shape[0] < 1:
        raise ValueError(f"thetas must be [K, H, d] = [K, {mdp.H}, {mdp.d}]; got {list(thetas.shape)}")
    k_total = thetas.shape[0]
    h_, s_, a_ = mdp.H, mdp.S, mdp.A
    if eta is None:
        eta = (1.0 / (h_ * math.sqrt(a_ * k_total)) if regulariser == "log-barrier"
               else math.sqrt(math.log(a_) / k_total) / h_)
    eta = check_hparam("eta", eta, low=0, low_open=True)
    gamma = check_hparam("gamma", 1.0 / math.sqrt(k_total) if gamma is None else gamma, low=0, low_open=True)
    beta = check_hparam("beta", eta if beta is None else beta, low=0)
    rng = np.random.default_rng(seed)
    policy_fn = log_barrier_policy if regulariser == "log-barrier" else exp_weights_policy
    cum = np.zeros((h_, s_, a_))
    summed = np.zeros((h_, s_, a_))
    values = np.empty(k_total)
    regret = np.empty(k_total)  # after k episodes, against the best fixed policy of those k episodes
    total = 0.0
    for k in range(k_total):
        pi = policy_fn(cum, eta)
        losses = mdp.losses(thetas[k])
        summed += losses
        values[k] = policy_value(mdp, pi, losses)
        total += values[k]
        best = best_fixed_policy(mdp, summed)[1]
        regret[k] = total - best
        # one trajectory with bandit feedback
        s = rng.choice(s_, p=mdp.start)
        visited, observed = [], []
        for h in range(h_):
            a = rng.choice(a_, p=pi[h, s])
            visited.append((s, a))
            observed.append(losses[h, s, a])
            if h < h_ - 1:
                s = rng.choice(s_, p=mdp.transitions[h, s, a])
        q_hat, b = estimate_q(mdp, pi, visited, observed, gamma)
        b = beta * b
        if bonus:
            big_b = np.zeros((h_, s_, a_))
            for h in reversed(range(h_)):
                nxt = 0.0
                if h < h_ - 1:
                    v_next = (pi[h + 1] * big_b[h + 1]).sum(-1)
                    nxt = (1.0 + 1.0 / h_) * (mdp.transitions[h] @ v_next)
                big_b[h] = b[h] + nxt
            cum += q_hat - big_b
        else:
            cum += q_hat
    return RegretRun(regret=regret, learner_values=values, best_value=best)
