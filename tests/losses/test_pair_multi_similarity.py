import math

import pytest
import torch
import torch.nn.functional as F

import losskit
from losskit.core.context import PairReference
from losskit.functional.multi_similarity import multi_similarity_loss


def log1p_sum_exp(zs):
    # log(1 + sum exp z), shifted by max(0, z) so that huge arguments do not overflow
    m = max([0.0] + zs)
    return m + math.log(math.exp(-m) + sum(math.exp(z - m) for z in zs))


def naive_ms(x, y, alpha, beta, lam, eps, mining=True, official=False):
    """Per-anchor MS loss written from the paper's equations, one pair at a time."""
    xn = F.normalize(x.detach().double(), dim=1)
    B = x.shape[0]
    out = []
    for i in range(B):
        P, N = [], []
        for k in range(B):
            if k == i:
                continue
            s = float(xn[i] @ xn[k])
            if int(y[k]) == int(y[i]):
                if official and s >= 1 - 1e-5:
                    continue
                P.append(s)
            else:
                N.append(s)
        if mining:
            minP = min(P) if P else math.inf
            maxN = max(N) if N else -math.inf
            Pm = [s for s in P if s < maxN + eps]
            Nm = [s for s in N if s > minP - eps]
        else:
            Pm, Nm = P, N
        lp = log1p_sum_exp([-alpha * (s - lam) for s in Pm]) / alpha
        ln = log1p_sum_exp([beta * (s - lam) for s in Nm]) / beta
        out.append(lp + ln)
    return torch.tensor(out, dtype=torch.float64)


def _data(B=24, D=8, C=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return x, y


@pytest.mark.parametrize("lam,mining,official", [(1.0, True, False), (0.5, True, False), (0.5, False, False),
                                                  (0.5, True, True)])
def test_ms_matches_naive_all_reductions(lam, mining, official):
    x, y = _data()
    ref = naive_ms(x, y, 2.0, 50.0, lam, 0.1, mining, official)
    kw = dict(lam=lam, mining=mining, official_positive_filter=official)
    m = losskit.get("multi-similarity", reduction="none", **kw)
    torch.testing.assert_close(m(x, y), ref)
    w = torch.rand(x.shape[0], dtype=torch.float64)
    for red, expect in (("mean", (ref * w).mean()), ("sum", (ref * w).sum()), ("none", ref * w)):
        m = losskit.get("multi-similarity", reduction=red, **kw)
        torch.testing.assert_close(m(x, y, sample_weight=w), expect)


@pytest.mark.parametrize("chunk", [1, 5, None])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ms_matches_pml_loss_and_grad(chunk, reduction):
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    x, y = _data(B=40, D=16, C=6, seed=1, dtype=torch.float32)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    pml = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
    lp = pml(xb, y, miner(xb, y))
    lp.backward()
    m = losskit.get("multi-similarity", lam=0.5, chunk_size=chunk, reduction=reduction)
    out = m(xa, y)
    ours = out.mean() if reduction == "none" else out
    ours.backward()
    torch.testing.assert_close(ours, lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-7)


def test_ms_without_mining_matches_pml_without_miner():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, y = _data(B=30, D=8, C=4, seed=2, dtype=torch.float32)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lp = pml_losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5)(xb, y)
    lo = losskit.get("multi-similarity", beta=40.0, lam=0.5, mining=False)(xa, y)
    lp.backward()
    lo.backward()
    torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ms_gradcheck(reduction):
    x, y = _data(B=10, D=4, C=3, seed=3)
    x.requires_grad_(True)
    w = torch.rand(10, dtype=torch.float64) + 0.5
    # beta 10 keeps the float64 finite differences well conditioned
    m = losskit.get("multi-similarity", beta=10.0, lam=0.5, chunk_size=3, reduction=reduction)
    assert torch.autograd.gradcheck(lambda e: m(e, y, sample_weight=w), (x,))


def test_ms_gradcheck_against_reference_set():
    x, y = _data(B=6, D=4, C=2, seed=4)
    r, ry = _data(B=9, D=4, C=2, seed=5)
    x.requires_grad_(True)
    r.requires_grad_(True)
    f = lambda a, b: multi_similarity_loss(a, y, beta=10.0, lam=0.5, reference=PairReference(b, ry),
                                           chunk_size=4)
    assert torch.autograd.gradcheck(f, (x, r))
    f2 = lambda a, b: multi_similarity_loss(a, y, beta=10.0, lam=0.5, reference=PairReference(b, ry),
                                            reduction="none")
    assert torch.autograd.gradcheck(f2, (x, r))


def test_ms_self_reference_equals_plain():
    x, y = _data(B=20, D=6, C=4, seed=6)
    plain = multi_similarity_loss(x, y, reduction="none")
    via_ref = multi_similarity_loss(x, y, reduction="none",
                                    reference=PairReference(x.clone(), y.clone(), self_index=torch.arange(20)))
    torch.testing.assert_close(plain, via_ref)


def test_ms_edge_cases_keep_graph():
    m = losskit.get("multi-similarity")
    # one sample per class: no positive pair, hence nothing mined at all
    x = torch.randn(5, 4, requires_grad=True)
    out = m(x, torch.arange(5))
    assert out.item() == 0.0
    out.backward()
    assert x.grad is not None and torch.all(x.grad == 0)
    # single class: no negative pair
    x = torch.randn(5, 4, requires_grad=True)
    out = m(x, torch.zeros(5, dtype=torch.long))
    assert out.item() == 0.0 and out.requires_grad
    # empty batch
    x = torch.randn(0, 4, requires_grad=True)
    out = m(x, torch.zeros(0, dtype=torch.long))
    out.backward()
    assert out.item() == 0.0
    assert losskit.get("multi-similarity", reduction="none")(x, torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_ms_ties_and_duplicates():
    # duplicated embeddings: S = 1 between distinct samples
    base = torch.randn(4, 6, dtype=torch.float64)
    x = torch.cat([base, base])
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for official in (False, True):
        ref = naive_ms(x, y, 2.0, 50.0, 0.5, 0.1, True, official)
        got = multi_similarity_loss(x, y, lam=0.5, reduction="none", official_positive_filter=official)
        torch.testing.assert_close(got, ref)
    # exact ties at the mining threshold: epsilon 0 and equal similarities keep nothing (strict inequalities)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    got = multi_similarity_loss(x, torch.tensor([0, 0, 1]), epsilon=0.0, reduction="none")
    torch.testing.assert_close(got, naive_ms(x, torch.tensor([0, 0, 1]), 2.0, 50.0, 1.0, 0.0))


def test_ms_huge_beta_and_bf16_finite():
    x, y = _data(B=32, D=8, C=4, seed=7, dtype=torch.float32)
    x.requires_grad_(True)
    out = multi_similarity_loss(x, y, alpha=200.0, beta=1e4, lam=-0.5)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    ref = naive_ms(x, y, 200.0, 1e4, -0.5, 0.1).mean()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    xb = (x.detach() * 100).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ob = losskit.get("multi-similarity")(xb, y)
    ob.backward()
    assert ob.dtype == torch.bfloat16
    assert torch.isfinite(ob.float()) and torch.isfinite(xb.grad.float()).all()


def test_ms_bad_input():
    m = losskit.get("multi-similarity")
    with pytest.raises(ValueError, match="labels"):
        m(torch.randn(4, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        m(torch.randn(4), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(TypeError, match="labels"):
        m(torch.randn(4, 3), torch.tensor([0.0, 1, 0, 1]))
    with pytest.raises(ValueError, match="alpha"):
        losskit.get("multi-similarity", alpha=0.0)
    with pytest.raises(ValueError, match="distance"):
        losskit.get("multi-similarity", distance="euclidean")
    with pytest.raises(ValueError, match="sample_weight"):
        m(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), sample_weight=torch.tensor([1.0, -1, 1, 1]))
    with pytest.raises(ValueError, match="chunk_size"):
        multi_similarity_loss(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), chunk_size=0)


def test_ms_dot_similarity_on_normalised_inputs_equals_cosine():
    x, y = _data(seed=9)
    xn = F.normalize(x, dim=1)
    torch.testing.assert_close(multi_similarity_loss(xn, y, distance="dot", reduction="none"),
                               naive_ms(x, y, 2.0, 50.0, 1.0, 0.1))
