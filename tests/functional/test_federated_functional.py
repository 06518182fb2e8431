"""FedLD / FedLEx / FedProx math against naive references written from the papers' equations."""

import math

import pytest
import torch

import losskit.functional as LF
from losskit.functional.federated import (guidance_matrix, margin_control_loss, principal_gradient_aggregate,
                                          proximal_term, weighted_mean)


# ----------------------------------------------------------------------------- margin control

def naive_margin_control(z, y, lam, w=None):
    """Loops: CE_i = logsumexp(z_i) - z_i[y_i]; R = log(1 + sum_i w_i sum_c p_ic^2); mean of w_i (CE_i + lam R)."""
    b, c = z.shape
    w = [1.0] * b if w is None else [float(v) for v in w]
    sq = 0.0
    ces = []
    for i in range(b):
        m = max(float(v) for v in z[i])
        lse = m + math.log(sum(math.exp(float(z[i, j]) - m) for j in range(c)))
        ces.append(lse - float(z[i, y[i]]))
        p = [math.exp(float(z[i, j]) - lse) for j in range(c)]
        sq += w[i] * sum(pj * pj for pj in p)
    r = math.log(1 + sq)
    return sum(w[i] * (ces[i] + lam * r) for i in range(b)) / b


def test_margin_control_matches_naive_and_official_form():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=g)
    assert float(margin_control_loss(z, y, 0.03)) == pytest.approx(naive_margin_control(z, y, 0.03), rel=1e-12)
    # the official MarginalLogLoss: CE mean + lam * log(1 + torch.norm(softmax(Z), p=2) ** 2)
    official = torch.nn.functional.cross_entropy(z, y) + 0.03 * torch.log(1 + torch.norm(torch.softmax(z, 1)) ** 2)
    assert float(margin_control_loss(z, y, 0.03)) == pytest.approx(float(official), rel=1e-12)
    w = torch.rand(7, generator=g, dtype=torch.float64)
    assert float(margin_control_loss(z, y, 0.5, sample_weight=w)) == pytest.approx(
        naive_margin_control(z, y, 0.5, w), rel=1e-12)
    none = margin_control_loss(z, y, 0.5, reduction="none", sample_weight=w)
    assert float(none.sum()) == pytest.approx(float(margin_control_loss(z, y, 0.5, reduction="sum", sample_weight=w)))
    assert LF.margin_control_loss is margin_control_loss


def test_margin_control_gradcheck_zero_weight_and_bf16():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (5,), generator=g)
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: margin_control_loss(t, y, 0.3, sample_weight=w), (z,))
    margin_control_loss(z, y, 0.3, sample_weight=w).backward()
    assert torch.all(z.grad[1] == 0)  # a zero-weight row has no influence (it is not in the batch term)
    zb = torch.randn(64, 10, generator=g).bfloat16().requires_grad_(True)
    out = margin_control_loss(zb, torch.randint(0, 10, (64,), generator=g))
    out.backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out) and torch.isfinite(zb.grad).all()
    empty = margin_control_loss(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert float(empty) == 0.0 and empty.requires_grad


def test_margin_control_bad_input():
    with pytest.raises(ValueError, match="logits"):
        margin_control_loss(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        margin_control_loss(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="lam"):
        margin_control_loss(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), lam=-1.0)
    with pytest.raises(ValueError, match="finite"):
        margin_control_loss(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, dtype=torch.long))


# ----------------------------------------------------------------------------- principal gradients

def naive_pga(G, k_prop=0.8, eps=1e-12):
    """svd_tools.pcgrad_svd's loops, with the eps guards the official code lacks."""
    m = G.shape[0]
    H = G @ G.T / m
    _, s, e = torch.svd(H)
    v = (G.T @ e).T
    k = max(1, int(m * k_prop))
    w = [v[j].clone() for j in range(k)]
    for j in range(k):
        pos = sum(1 for i in range(m) if float(G[i] @ w[j]) >= 0)
        if pos < m - pos:
            w[j] = -w[j]
    out = torch.zeros(G.shape[1], dtype=G.dtype)
    for i in range(m):
        gi = G[i]
        acc = torch.zeros_like(gi)
        for j in range(k):
            proj = float(gi @ w[j]) / max(float(w[j] @ w[j]), eps) * w[j]
            acc += proj * float(s[j] / s.sum()) * float(gi.norm()) / max(float(proj.norm()), eps)
        out += acc
    return out / m


@pytest.mark.parametrize("m,d", [(5, 7), (10, 30), (3, 2), (1, 4)])
def test_pga_matches_naive(m, d):
    G = torch.randn(m, d, generator=torch.Generator().manual_seed(m * 31 + d), dtype=torch.float64)
    torch.testing.assert_close(principal_gradient_aggregate(G), naive_pga(G), rtol=1e-9, atol=1e-12)


def test_pga_identical_updates_is_fedavg_and_no_nan():
    g = torch.randn(50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for m in (1, 2, 10):
        G = g.expand(m, -1).clone()
        out = principal_gradient_aggregate(G)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, G.mean(0), rtol=1e-9, atol=1e-12)
    assert torch.equal(principal_gradient_aggregate(torch.zeros(4, 6)), torch.zeros(6))
    # float32 in, float32 out, finite
    out32 = principal_gradient_aggregate(g.float().expand(4, -1).clone())
    assert out32.dtype == torch.float32 and torch.isfinite(out32).all()


def test_pga_norm_and_bad_input():
    G = torch.randn(6, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = principal_gradient_aggregate(G, k_proportion=1.0)
    # each g^_i has norm <= ||g_i|| (a convex combination of unit directions scaled by ||g_i||)
    assert float(out.norm()) <= float(G.norm(dim=1).max()) + 1e-9
    with pytest.raises(ValueError, match="deltas"):
        principal_gradient_aggregate(torch.zeros(5))
    with pytest.raises(ValueError, match="k_proportion"):
        principal_gradient_aggregate(G, k_proportion=0.0)
    with pytest.raises(ValueError, match="finite"):
        principal_gradient_aggregate(torch.tensor([[1.0, float("inf")]]))


# ----------------------------------------------------------------------------- guidance, prox, mean

def test_guidance_matrix_matches_naive():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(3, 4, generator=g, dtype=torch.float64)
    scouts = base + torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    ls = [[sum((float(scouts[k, i, j]) - float(base[i, j])) ** 2 for k in range(5)) / 5 for j in range(4)]
          for i in range(3)]
    lo, hi = min(min(r) for r in ls), max(max(r) for r in ls)
    ref = torch.tensor([[(v - lo) / (hi - lo) for v in r] for r in ls], dtype=torch.float64)
    M = guidance_matrix(base, scouts)
    torch.testing.assert_close(M, ref)
    assert float(M.min()) == 0.0 and float(M.max()) == 1.0
    # constant spread (a one-element bias, an untouched tensor): ones, not 0/0
    b = torch.zeros(1)
    assert torch.equal(guidance_matrix(b, torch.ones(3, 1)), torch.ones(1))
    assert torch.equal(guidance_matrix(base, base.expand(2, -1, -1).clone()), torch.ones_like(base))
    with pytest.raises(ValueError, match="scouts"):
        guidance_matrix(base, torch.zeros(2, 4, 3, dtype=torch.float64))


def test_proximal_term_and_weighted_mean():
    p = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)]
    q = [torch.tensor([0.0, 0.0]), torch.tensor([1.0])]
    t = proximal_term(p, q, 0.5)
    assert float(t) == pytest.approx(0.25 * (1 + 4 + 4))
    t.backward()
    torch.testing.assert_close(p[0].grad, 0.5 * torch.tensor([1.0, 2.0]))
    x = torch.tensor([[1.0], [3.0]])
    assert float(weighted_mean(x, [1, 3])[0]) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="weights"):
        weighted_mean(x, [1, -1])
    with pytest.raises(ValueError, match="mu"):
        proximal_term(p, q, -1.0)
