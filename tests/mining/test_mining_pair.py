import pytest
import torch
import torch.nn.functional as F

from losskit.core.context import PairReference
from losskit.mining import MultiSimilarityMiner, TripletMiner, all_pairs_indices


def _data(seed=0, B=30, C=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 8, generator=g), torch.randint(0, C, (B,), generator=g)


def _pairs(t):
    return set(zip(*(v.tolist() for v in t)))


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_ms_miner_matches_pml(chunk):
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    x, y = _data()
    a1, p, a2, n = MultiSimilarityMiner(0.1, chunk_size=chunk)(x, y)
    b1, q, b2, m = miners.MultiSimilarityMiner(epsilon=0.1)(x, y)
    assert _pairs((a1, p)) == _pairs((b1, q))
    assert _pairs((a2, n)) == _pairs((b2, m))
    assert len(a1) > 0 and len(a2) > 0


def test_ms_miner_naive_and_reference_set():
    x, y = _data(seed=1)
    S = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    want_p, want_n = set(), set()
    for i in range(len(y)):
        P = [k for k in range(len(y)) if k != i and y[k] == y[i]]
        N = [j for j in range(len(y)) if y[j] != y[i]]
        if not P or not N:
            continue
        mn, mx = min(S[i, P]), max(S[i, N])
        want_p |= {(i, k) for k in P if S[i, k] < mx + 0.1}
        want_n |= {(i, j) for j in N if S[i, j] > mn - 0.1}
    a1, p, a2, n = MultiSimilarityMiner(0.1)(x, y)
    assert _pairs((a1, p)) == want_p and _pairs((a2, n)) == want_n
    # against a separate reference set with the self columns named
    a1, p, a2, n = MultiSimilarityMiner(0.1)(x, y, PairReference(x.clone(), y.clone(), torch.arange(len(y))))
    assert _pairs((a1, p)) == want_p and _pairs((a2, n)) == want_n


def test_ms_miner_edge_cases():
    x = torch.randn(4, 3)
    for y in (torch.arange(4), torch.zeros(4, dtype=torch.long)):
        assert all(t.numel() == 0 for t in MultiSimilarityMiner()(x, y))
    assert all(t.numel() == 0 for t in MultiSimilarityMiner()(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="similarity"):
        MultiSimilarityMiner(distance="euclidean")


def test_all_pairs_indices():
    y = torch.tensor([0, 0, 1])
    a1, p, a2, n = all_pairs_indices(y)
    assert _pairs((a1, p)) == {(0, 1), (1, 0)}
    assert _pairs((a2, n)) == {(0, 2), (1, 2), (2, 0), (2, 1)}


def test_triplet_miner_modes():
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    x, y = _data(seed=2, B=16, C=3)
    a, p, n = TripletMiner("hard", distance="euclidean")(x, y)
    b, q, m = miners.BatchHardMiner()(x, y)
    assert set(zip(a.tolist(), p.tolist(), n.tolist())) == set(zip(b.tolist(), q.tolist(), m.tolist()))
    a, p, n = TripletMiner("all", chunk_size=5)(x, y)
    assert all(y[a] == y[p]) and all(y[a] != y[n]) and all(a != p)
    npos = sum(int(((y == y[i]).sum() - 1) * (y != y[i]).sum()) for i in range(len(y)))
    assert len(a) == npos
    a, p, n = TripletMiner("semi-hard")(x, y)
    xn = F.normalize(x, dim=1)
    d = torch.cdist(xn, xn) ** 2
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        negs = (y != y[i]).nonzero().flatten()
        semi = [int(t) for t in negs if d[i, t] > d[i, j]]
        if semi:
            assert k == min(semi, key=lambda t: d[i, t]) and d[i, k] > d[i, j]
        else:
            assert k == int(negs[d[i, negs].argmax()])
    with pytest.raises(ValueError, match="mining"):
        TripletMiner("easy")
