"""Comp-sum losses against a reference written from Mao, Mohri & Zhong (2023):
l_tau = Phi_tau(u), u = sum_{y' != y} exp(h_y' - h_y); the smooth
adversarial comp-sum and PGD."""

import math

import pytest
import torch

import losskit
from losskit.functional import adversarial_comp_sum_loss, comp_sum_loss, pgd_perturb
from losskit.heads import ArcMargin, MarginHead, NoMargin

TAUS = [0.0, 0.5, 1.0 - 1e-9, 1.0, 1.0 + 1e-6, 1.3, 1.7, 2.0, 3.0]


def naive(logits, labels, tau):
    """Loops over rows and classes, Phi_tau exactly as in the paper."""
    out = []
    for i in range(logits.shape[0]):
        h = [float(v) for v in logits[i]]
        y = int(labels[i])
        u = sum(math.exp(h[j] - h[y]) for j in range(len(h)) if j != y)
        if tau == 1.0:
            out.append(math.log1p(u))
        else:
            out.append(((1 + u) ** (1 - tau) - 1) / (1 - tau))
    return torch.tensor(out, dtype=torch.float64)


def _data(b=7, c=5, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, dtype=torch.float64) * scale, torch.randint(0, c, (b,), generator=g)


@pytest.mark.parametrize("tau", TAUS)
def test_comp_sum_matches_the_paper_formula(tau):
    z, y = _data()
    got = comp_sum_loss(z, y, tau, reduction="none")
    ref = naive(z, y, tau)
    if abs(tau - 1) < 1e-8:   # at 1 +- 1e-9 the closed form is 0/0 in float64: its series c + (1 - tau) c^2 / 2
        c = naive(z, y, 1.0)
        ref = c + (1 - tau) * c * c / 2
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_presets_are_comp_sum_at_their_tau():
    z, y = _data()
    p = torch.softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    u = 1 / p - 1
    cases = {"sum-exponential": (0.0, u), "cross-entropy": (1.0, -torch.log(p)), "gce": (1.7, (1 - p ** 0.7) / 0.7),
             "mae": (2.0, 1 - p)}
    for name, (tau, want) in cases.items():
        got = losskit.get(name, reduction="none")(z, y)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=name)
        torch.testing.assert_close(got, losskit.get("comp-sum", tau=tau, reduction="none")(z, y), msg=name)
    g = losskit.get("gce", q=0.3, reduction="none")
    torch.testing.assert_close(g(z, y), (1 - p ** 0.3) / 0.3)


def test_continuous_in_tau_through_one():
    z, y = _data()
    ce = comp_sum_loss(z, y, 1.0, reduction="none")
    for eps in (1e-4, 1e-6, 1e-9, 1e-12):
        for t in (1 - eps, 1 + eps):
            d = (comp_sum_loss(z, y, t, reduction="none") - ce).abs().max().item()
            assert d < 10 * eps * (1 + ce.max().item() ** 2), (t, d)


@pytest.mark.parametrize("tau", [0.0, 1.0, 1.5, 2.0])
def test_large_logits_stay_finite(tau):
    z, y = _data(scale=1.0)
    ref = comp_sum_loss(z, y, tau, reduction="none")
    got = comp_sum_loss(z + 1e4, y, tau, reduction="none")     # the same differences, huge values
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    zb = (z.float() + 1e4).bfloat16().requires_grad_(True)
    out = comp_sum_loss(zb, y, tau)
    out.backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out) and torch.isfinite(zb.grad).all()


@pytest.mark.parametrize("tau", [1.0, 1.5, 2.0])
def test_bounded_taus_are_finite_for_any_logits(tau):
    z, y = _data(scale=1e4)
    z = z.float().requires_grad_(True)
    out = comp_sum_loss(z, y, tau)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()
    if tau > 1:
        assert float(out) <= 1 / (tau - 1) + 1e-6


def test_unbounded_tau_overflow_is_a_clear_error():
    z, y = _data(scale=1e4)
    with pytest.raises(ValueError, match="tau"):
        comp_sum_loss(z.float(), y, 0.0)
    with pytest.raises(ValueError, match="tau"):          # float16 overflows at 65504
        comp_sum_loss((torch.tensor([[0.0, 12.0]])).half(), torch.tensor([0]), 0.0)


@pytest.mark.parametrize("tau", [0.0, 0.7, 1.0 - 1e-9, 1.0, 1.4, 2.0])
def test_gradcheck(tau):
    z, y = _data(5, 4)
    w = torch.rand(5, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda t: comp_sum_loss(t, y, tau, "sum", w), (z.requires_grad_(True),))


def test_bad_input():
    z, y = _data()
    with pytest.raises(ValueError, match="tau"):
        losskit.get("comp-sum", tau=-0.1)
    with pytest.raises(ValueError, match="q"):
        losskit.get("gce", q=1.0)
    with pytest.raises(ValueError, match="labels"):
        comp_sum_loss(z, torch.full_like(y, 5), 1.5)
    bad = z.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="logits"):
        comp_sum_loss(bad, y, 1.5)
    with pytest.raises(ValueError, match="sample_weight"):
        comp_sum_loss(z, y, 1.5, sample_weight=torch.ones(3))
    with pytest.raises(ValueError, match="logits"):
        comp_sum_loss(z[0], y, 1.5)


# ----------------------------------------------------------------------------- through the margin heads

@pytest.mark.parametrize("policy", [NoMargin(16.0), ArcMargin(16.0, 0.3)], ids=["normface", "arcface"])
@pytest.mark.parametrize("tau", [0.5, 1.0, 1.5, 2.0])
def test_heads_compute_comp_sum_with_every_backend(tau, policy):
    torch.manual_seed(0)
    C, D, Bn = 23, 6, 9
    x = torch.randn(Bn, D, dtype=torch.float64)
    y = torch.randint(0, C, (Bn,))
    sw = torch.rand(Bn, dtype=torch.float64) + 0.5
    ref_head = MarginHead(C, D, policy, head="dense").double()
    # reference: the dense margin logits, then the comp-sum formula
    with torch.no_grad():
        W = ref_head.weight.detach().clone()
    xr = x.clone().requires_grad_(True)
    Wr = W.clone().requires_grad_(True)
    cos = torch.nn.functional.normalize(xr, dim=1) @ torch.nn.functional.normalize(Wr, dim=1).t()
    cy = cos.gather(1, y[:, None]).squeeze(1)
    psi = policy.target(cy, policy.prepare(cy.detach()))
    logits = (cos * policy.scale).scatter(1, y[:, None], (psi * policy.scale)[:, None])
    want = comp_sum_loss(logits, y, tau, "mean", sw)
    want.backward()
    for head in ("dense", "chunked", "fused"):
        m = MarginHead(C, D, policy, head=head, tau=tau, chunk_size=5).double()
        with torch.no_grad():
            m.weight.copy_(W)
        xi = x.clone().requires_grad_(True)
        got = m(xi, y, sw)
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=head)
        torch.testing.assert_close(xi.grad, xr.grad, rtol=1e-7, atol=1e-10, msg=head)
        torch.testing.assert_close(m.weight.grad, Wr.grad, rtol=1e-7, atol=1e-10, msg=head)
        per = m(x, y, reduction="none")
        torch.testing.assert_close(per, comp_sum_loss(logits.detach(), y, tau, "none"), msg=head)


def test_head_tau_is_checked():
    with pytest.raises(ValueError, match="tau"):
        MarginHead(5, 3, NoMargin(), tau=-1.0)


# ----------------------------------------------------------------------------- adversarial comp-sum, PGD

def test_adversarial_comp_sum_formula_and_gradcheck():
    z, y = _data(6, 4)
    g = torch.Generator().manual_seed(1)
    za = z + 0.3 * torch.randn(z.shape, generator=g, dtype=torch.float64)
    got = adversarial_comp_sum_loss(z, y, za, 1.5, 0.7, "none")
    want = naive(z, y, 1.5) + 0.7 * torch.tensor([math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(r, s)))
                                                  for r, s in zip(za, z)], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda a, b: adversarial_comp_sum_loss(a, y, b, 1.5, 0.7),
                                    (z.requires_grad_(True), za.requires_grad_(True)))
    # equal logits: the distance's subgradient is 0, not NaN
    zz = z.detach().clone().requires_grad_(True)
    adversarial_comp_sum_loss(zz, y, zz.detach().clone(), 1.0, 1.0).backward()
    assert torch.isfinite(zz.grad).all()
    with pytest.raises(ValueError, match="adv_logits"):
        adversarial_comp_sum_loss(z, y, za[:, :3], 1.0, 1.0)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_stays_in_the_ball_and_finds_the_linear_maximum(norm):
    torch.manual_seed(0)
    lin = torch.nn.Linear(10, 4, bias=True).double()
    x = torch.rand(8, 10, dtype=torch.float64)
    r = 0.1
    obj = losskit.get("adversarial-comp-sum", radius=r, steps=60, step_size=r / 8, norm=norm, clip=None)
    xa = obj.perturb(lin, x, generator=torch.Generator().manual_seed(0))
    d = xa - x
    n = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (n <= r + 1e-9).all()
    found = (lin(xa) - lin(x)).norm(dim=1)
    if norm == "l2":   # max ||W d|| over ||d|| <= r is r * sigma_max(W)
        best = r * torch.linalg.matrix_norm(lin.weight, ord=2)
        assert (found >= 0.99 * best).all() and (found <= best + 1e-9).all()
    else:              # PGD must beat the random start by far
        start = pgd_perturb(lambda t: (lin(t) - lin(x)).norm(dim=1), x, r, 0, r / 8, norm,
                            generator=torch.Generator().manual_seed(0))
        assert (found > 1.5 * (lin(start) - lin(x)).norm(dim=1)).all()
    assert lin.weight.grad is None, "the attack must not accumulate parameter gradients"


def test_from_model_trains_through_both_passes_and_clips():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3).double()
    x = torch.rand(5, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    obj = losskit.get("adversarial-comp-sum", tau=1.5, nu=2.0, radius=0.5, steps=3, step_size=0.2)
    xa = obj.perturb(lin, x, generator=torch.Generator().manual_seed(0))
    assert xa.min() >= 0 and xa.max() <= 1
    out = obj.from_model(lin, x, y, generator=torch.Generator().manual_seed(0))
    out.backward()
    want = adversarial_comp_sum_loss(lin(x), y, lin(xa), 1.5, 2.0)
    torch.testing.assert_close(out, want)
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    with pytest.raises(ValueError, match="norm"):
        losskit.get("adversarial-comp-sum", norm="l1")


def test_masked_classes_are_accepted_and_non_finite_logits_refused():
    z, y = _data()
    zm = z.clone()
    zm[torch.arange(7), (y + 1) % 5] = -math.inf          # one masked (probability 0) class per row
    zg = zm.clone().requires_grad_(True)
    out = comp_sum_loss(zg, y, 1.5, "none")
    torch.testing.assert_close(out, naive(zm, y, 1.5))     # exp(-inf) = 0 in the reference too
    out.sum().backward()
    assert torch.isfinite(zg.grad).all()
    for bad, where in ((math.nan, (0, 1)), (math.inf, (2, 0)), (-math.inf, (3, int(y[3])))):
        zb = z.clone()
        zb[where] = bad
        with pytest.raises(ValueError, match="logits: expected finite values"):
            comp_sum_loss(zb, y, 1.5)
        with pytest.raises(ValueError, match="logits"):
            losskit.get("cross-entropy")(zb, y)


@pytest.mark.parametrize("head", ["dense", "chunked", "fused"])
def test_heads_with_tau_run_in_bfloat16(head):
    torch.manual_seed(0)
    m = MarginHead(50, 8, ArcMargin(64.0, 0.5), head=head, tau=1.5, chunk_size=16)
    x = torch.randn(12, 8).bfloat16().requires_grad_(True)
    out = m(x, torch.randint(0, 50, (12,)))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad.float()).all() and torch.isfinite(m.weight.grad).all()
