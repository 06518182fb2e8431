import math

import pytest
import torch
import torch.nn.functional as F

import losskit
from losskit.core.context import PairReference
from losskit.functional.pair import contrastive_loss, tcm_regularizer, triplet_loss


def _data(B=20, D=6, C=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=dtype), torch.randint(0, C, (B,), generator=g)


def _d(xn, i, j, squared=False):
    v = sum((float(xn[i, k]) - float(xn[j, k])) ** 2 for k in range(xn.shape[1]))
    return v if squared else math.sqrt(v)


# ---------------------------------------------------------------- naive references
def naive_contrastive(x, y, mp, mn, nonzero=True, squared_hinge=False):
    xn = F.normalize(x.detach().double(), dim=1)
    P, N = [], []
    for i in range(len(y)):
        for k in range(len(y)):
            if i == k:
                continue
            d = _d(xn, i, k)
            if int(y[i]) == int(y[k]):
                v = max(0.0, d - mp)
                P.append(0.5 * v * v if squared_hinge else v)
            else:
                v = max(0.0, mn - d)
                N.append(0.5 * v * v if squared_hinge else v)
    def avg(v):
        keep = [a for a in v if a > 0] if nonzero else v
        return sum(keep) / len(keep) if keep else 0.0
    return avg(P) + avg(N)


def naive_triplet(x, y, margin, mining, squared=True, nonzero=True):
    xn = F.normalize(x.detach().double(), dim=1)
    B = len(y)
    D = [[_d(xn, i, j, squared) for j in range(B)] for i in range(B)]
    trip = []
    for a in range(B):
        P = [p for p in range(B) if p != a and int(y[p]) == int(y[a])]
        N = [n for n in range(B) if int(y[n]) != int(y[a])]
        if not P or not N:
            continue
        if mining == "all":
            trip += [(a, p, n) for p in P for n in N]
        elif mining == "hard":
            trip.append((a, max(P, key=lambda p: D[a][p]), min(N, key=lambda n: D[a][n])))
        else:
            for p in P:
                semi = [n for n in N if D[a][n] > D[a][p]]
                n = min(semi, key=lambda n: D[a][n]) if semi else max(N, key=lambda n: D[a][n])
                trip.append((a, p, n))
    ls = [max(0.0, D[a][p] - D[a][n] + margin) for a, p, n in trip]
    keep = [v for v in ls if v > 0] if nonzero else ls
    return sum(keep) / len(keep) if keep else 0.0


def naive_tcm(x, y, lp, lm, mp, mm):
    xn = F.normalize(x.detach().double(), dim=1)
    sp, sn = [], []
    for i in range(len(y)):
        for k in range(len(y)):
            if i == k:
                continue
            s = float(xn[i] @ xn[k])
            if int(y[i]) == int(y[k]) and s <= mp:
                sp.append(mp - s)
            elif int(y[i]) != int(y[k]) and s >= mm:
                sn.append(s - mm)
    return lp * (sum(sp) / len(sp) if sp else 0.0) + lm * (sum(sn) / len(sn) if sn else 0.0)


# ---------------------------------------------------------------- contrastive
@pytest.mark.parametrize("mp,mn,nonzero,sq", [(0.0, 1.0, True, False), (0.3, 0.9, False, False),
                                               (0.2, 1.2, True, True)])
def test_contrastive_matches_naive(mp, mn, nonzero, sq):
    x, y = _data()
    m = losskit.get("contrastive", pos_margin=mp, neg_margin=mn, squared_hinge=sq,
                    pair_average="nonzero" if nonzero else "all")
    torch.testing.assert_close(m(x, y).item(), naive_contrastive(x, y, mp, mn, nonzero, sq))
    # per-anchor shares average to the batch loss; weights scale the shares
    per = losskit.get("contrastive", pos_margin=mp, neg_margin=mn, squared_hinge=sq, reduction="none",
                      pair_average="nonzero" if nonzero else "all")(x, y)
    torch.testing.assert_close(per.mean(), m(x, y))
    w = torch.rand(len(y), dtype=torch.float64)
    torch.testing.assert_close(m(x, y, sample_weight=w), (per * w).mean())


def test_contrastive_matches_pml():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    x, y = _data(B=32, D=8, C=5, seed=1, dtype=torch.float32)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lo = losskit.get("contrastive", pos_margin=0.1, neg_margin=0.8)(xa, y)
    lp = pml.ContrastiveLoss(pos_margin=0.1, neg_margin=0.8)(xb, y)
    lo.backward()
    lp.backward()
    torch.testing.assert_close(lo, lp)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- triplet
@pytest.mark.parametrize("mining", ["all", "hard", "semi-hard"])
@pytest.mark.parametrize("nonzero", [True, False])
def test_triplet_matches_naive(mining, nonzero):
    x, y = _data(B=16, seed=2)
    m = losskit.get("triplet", mining=mining, pair_average="nonzero" if nonzero else "all")
    torch.testing.assert_close(m(x, y).item(), naive_triplet(x, y, 0.2, mining, True, nonzero))
    per = losskit.get("triplet", mining=mining, reduction="none",
                      pair_average="nonzero" if nonzero else "all")(x, y)
    torch.testing.assert_close(per.mean(), m(x, y))


@pytest.mark.parametrize("mining", ["all", "hard"])
def test_triplet_matches_pml(mining):
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses, miners

    x, y = _data(B=24, D=8, C=4, seed=3, dtype=torch.float32)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lo = losskit.get("triplet", margin=0.05, mining=mining, distance="euclidean")(xa, y)
    ref = losses.TripletMarginLoss(margin=0.05)
    lp = ref(xb, y) if mining == "all" else ref(xb, y, miners.BatchHardMiner()(xb, y))
    lo.backward()
    lp.backward()
    torch.testing.assert_close(lo, lp)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- tcm
def test_tcm_matches_naive_and_pml():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    x, y = _data(B=32, D=4, C=5, seed=4)
    reg = losskit.get("tcm", base=None)
    torch.testing.assert_close(reg(x, y).item(), naive_tcm(x, y, 1.0, 1.0, 0.9, 0.5))
    torch.testing.assert_close(tcm_regularizer(x, y, 0.7, 1.3, 0.6, 0.2).item(), naive_tcm(x, y, 0.7, 1.3, 0.6, 0.2))
    # base + TCM against PML's MultiSimilarity (+ miner) plus its ThresholdConsistentMarginLoss
    x32 = x.float()
    xa, xb = x32.clone().requires_grad_(True), x32.clone().requires_grad_(True)
    lo = losskit.get("tcm", base_kwargs={"lam": 0.5})(xa, y)
    ms = pml.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
    lp = ms(xb, y, miners.MultiSimilarityMiner(0.1)(xb, y)) + pml.ThresholdConsistentMarginLoss()(xb, y)
    lo.backward()
    lp.backward()
    torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)


def test_tcm_wraps_any_base():
    x, y = _data(seed=5)
    for base in ("contrastive", "triplet", "multi-similarity"):
        full = losskit.get("tcm", base=base)(x, y)
        torch.testing.assert_close(full, losskit.get(base)(x, y) + losskit.get("tcm", base=None)(x, y))
    mod = losskit.get("contrastive")
    torch.testing.assert_close(losskit.get("tcm", base=mod)(x, y), mod(x, y) + tcm_regularizer(x, y))
    per = losskit.get("tcm", reduction="none")(x, y)
    torch.testing.assert_close(per.mean(), losskit.get("tcm")(x, y))
    with pytest.raises(ValueError, match="base"):
        losskit.get("tcm", base="tcm")
    with pytest.raises(KeyError):
        losskit.get("tcm", base="no-such-loss")
    with pytest.raises(ValueError, match="margin_plus"):
        losskit.get("tcm", margin_plus=2.0)


# ---------------------------------------------------------------- shared properties
NAMES = [("contrastive", {}), ("triplet", {"mining": "all"}), ("triplet", {"mining": "hard"}),
         ("triplet", {"mining": "semi-hard"}), ("tcm", {"base": None}), ("tcm", {}),
         ("multi-similarity", {})]


@pytest.mark.parametrize("name,kw", NAMES)
def test_gradcheck(name, kw):
    x, y = _data(B=9, D=4, C=3, seed=6)
    x.requires_grad_(True)
    w = torch.rand(9, dtype=torch.float64) + 0.5
    kw = dict(kw)
    if name == "multi-similarity":
        kw["beta"] = 10.0
    for red in ("mean", "none"):
        m = losskit.get(name, reduction=red, **kw)
        assert torch.autograd.gradcheck(lambda e: m(e, y, sample_weight=w), (x,))


@pytest.mark.parametrize("name,kw", NAMES)
def test_edge_cases_zero_with_graph(name, kw):
    m = losskit.get(name, **kw)
    for labels in (torch.arange(6), torch.zeros(6, dtype=torch.long)):  # one per class; a single class
        x = torch.randn(6, 5, requires_grad=True)
        out = m(x, labels)
        out.backward()
        assert torch.isfinite(out)
        assert x.grad is not None and torch.isfinite(x.grad).all()
    x = torch.randn(0, 5, requires_grad=True)
    out = m(x, torch.zeros(0, dtype=torch.long))
    out.backward()
    assert out.item() == 0.0
    # nothing qualifies -> exactly zero loss and gradient, graph still alive
    x = torch.randn(4, 5, requires_grad=True)
    out = losskit.get(name, **kw)(x, torch.arange(4))
    if name in ("triplet", "multi-similarity"):
        assert out.item() == 0.0 and out.requires_grad


@pytest.mark.parametrize("name,kw", NAMES)
def test_bf16_no_nan(name, kw):
    x, y = _data(B=32, D=16, C=4, seed=7, dtype=torch.float32)
    xb = (x * 50).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = losskit.get(name, **kw)(xb, y)
    out.backward()
    assert torch.isfinite(out.float()) and torch.isfinite(xb.grad.float()).all()


@pytest.mark.parametrize("name,kw", NAMES)
def test_bad_input(name, kw):
    m = losskit.get(name, **kw)
    with pytest.raises(ValueError, match="labels"):
        m(torch.randn(4, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="embeddings"):
        m(torch.randn(4), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(TypeError, match="labels"):
        m(torch.randn(4, 3), torch.tensor([0.0, 1, 0, 1]))
    with pytest.raises(ValueError, match="sample_weight"):
        m(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), sample_weight=torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        losskit.get(name, reduction="avg", **kw)


def test_bad_hparams():
    with pytest.raises(ValueError, match="mining"):
        losskit.get("triplet", mining="hardest")
    with pytest.raises(ValueError, match="pair_average"):
        losskit.get("contrastive", pair_average="median")
    with pytest.raises(ValueError, match="distance"):
        contrastive_loss(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), distance="manhattan")
    with pytest.raises(ValueError, match="labels given without embeddings|embeddings given without labels"):
        triplet_loss(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), reference=PairReference(torch.randn(5, 3)))
    with pytest.raises(TypeError, match="reference"):
        triplet_loss(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), reference=(torch.randn(5, 3), None))


def test_contrastive_with_a_similarity_matches_pml():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses

    x, y = _data(B=24, D=8, C=4, seed=8, dtype=torch.float32)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lo = losskit.get("contrastive", pos_margin=0.9, neg_margin=0.3, distance="cosine")(xa, y)
    lp = losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.3, distance=distances.CosineSimilarity())(xb, y)
    lo.backward()
    lp.backward()
    torch.testing.assert_close(lo, lp)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
