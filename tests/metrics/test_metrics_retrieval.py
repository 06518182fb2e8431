import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from losskit.metrics import RetrievalMetrics, knn, map_at_r, precision_at_1, recall_at_k


def clustered(n=300, d=8, c=12, spread=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + spread * torch.randn(c, d, generator=g)[y]
    return x.double(), y


def naive_scores(x, metric):
    """Similarity of every ordered pair, one query row at a time, from the definitions."""
    x = np.asarray(x, dtype=np.float64)
    s = np.empty((len(x), len(x)))
    norms = np.sqrt((x * x).sum(1))
    for i in range(len(x)):
        if metric == "cosine":
            s[i] = (x @ x[i]) / (norms * norms[i])
        elif metric == "dot":
            s[i] = x @ x[i]
        elif metric == "squared-euclidean":
            s[i] = -((x - x[i]) ** 2).sum(1)
        else:
            s[i] = -np.sqrt(((x - x[i]) ** 2).sum(1))
    return s


def naive_ranking(s, i):
    """Others sorted by score descending, ties by lower index (the documented rule)."""
    others = [j for j in range(len(s)) if j != i]
    return sorted(others, key=lambda j: (-s[i, j], j))


def naive_recall(x, y, ks, metric):
    s, y = naive_scores(x, metric), np.asarray(y)
    hits = {k: [] for k in ks}
    for i in range(len(y)):
        if (y == y[i]).sum() < 2:
            continue
        rank = naive_ranking(s, i)
        for k in ks:
            hits[k].append(any(y[j] == y[i] for j in rank[:k]))
    return {k: float(np.mean(v)) for k, v in hits.items()}


def naive_map_at_r(x, y, metric):
    s, y = naive_scores(x, metric), np.asarray(y)
    aps = []
    for i in range(len(y)):
        r = int((y == y[i]).sum()) - 1
        if r == 0:
            continue
        rank = naive_ranking(s, i)[:r]
        hits, ap = 0, 0.0
        for pos, j in enumerate(rank, start=1):
            if y[j] == y[i]:
                hits += 1
                ap += hits / pos
        aps.append(ap / r)
    return float(np.mean(aps))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_matches_sklearn(metric):
    x, _ = clustered(200, 6)
    nn = NearestNeighbors(n_neighbors=6, metric=metric, algorithm="brute").fit(x.numpy())
    d, i = nn.kneighbors(x.numpy())  # includes self at rank 0 (no duplicates here)
    s, idx = knn(x, k=5, metric=metric, chunk_size=37)
    assert torch.equal(idx, torch.from_numpy(i[:, 1:]))
    want = 1 - d[:, 1:] if metric == "cosine" else -d[:, 1:]
    np.testing.assert_allclose(s.numpy(), want, atol=1e-9)
    # separate reference set: no self-exclusion
    q = x[:50] + 0.01
    s2, idx2 = knn(q, x, k=3, metric=metric, chunk_size=16)
    d2, i2 = nn.kneighbors(q.numpy(), n_neighbors=3)
    assert torch.equal(idx2, torch.from_numpy(i2))


def test_knn_chunked_equals_unchunked_with_ties():
    # small integer vectors and the dot metric: every score is an exact integer,
    # so ties are exact whatever the block shape, and many of them occur
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-2, 3, (90, 4), generator=g).float()
    full = knn(x, k=7, metric="dot", chunk_size=100000)
    for cs in (1, 3, 16, 64):
        part = knn(x, k=7, metric="dot", chunk_size=cs)
        assert torch.equal(part[1], full[1]) and torch.equal(part[0], full[0])
    # and against the naive rule on the same data
    s = naive_scores(x, "dot")
    for r in range(x.shape[0]):
        assert full[1][r].tolist() == naive_ranking(s, r)[:7]


def test_knn_chunked_equals_unchunked_float():
    x, _ = clustered(150, 16, seed=2)
    full = knn(x.float(), k=5, chunk_size=100000, backend="torch")
    for cs in (7, 64):
        part = knn(x.float(), k=5, chunk_size=cs, backend="torch")
        assert torch.equal(part[1], full[1])
        # matmul rounding may depend on the block shape: scores agree to float32 precision
        torch.testing.assert_close(part[0], full[0], rtol=0, atol=1e-6)


def test_knn_tie_rule_explicit():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    _, i = knn(x, k=3, metric="dot", chunk_size=2)
    assert i[0].tolist() == [1, 2, 4] and i[4].tolist() == [0, 1, 2] and i[3].tolist() == [0, 1, 2]


def test_knn_errors_and_numpy():
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    s, i = knn(x, k=4)
    assert i.shape == (5, 4)
    with pytest.raises(ValueError, match="k: expected at most 4"):
        knn(x, k=5)
    with pytest.raises(ValueError, match="metric"):
        knn(x, metric="manhattan")
    with pytest.raises(ValueError, match="finite"):
        knn(torch.tensor([[float("nan"), 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="shape \\[N, D\\]"):
        knn(torch.zeros(3))
    with pytest.raises(ValueError, match="backend"):
        knn(x, backend="gpu")


HAS_FAISS = __import__("importlib").util.find_spec("faiss") is not None


@pytest.mark.skipif(HAS_FAISS, reason="faiss is installed")
def test_knn_faiss_missing_is_clear():
    with pytest.raises(ImportError, match="faiss"):
        knn(torch.randn(5, 3), backend="faiss")


def assert_faiss_agrees_with_torch(x, k, metric, chunk_size):
    st, it = knn(x, k=k, metric=metric, backend="torch", chunk_size=chunk_size)
    sf, i_f = knn(x, k=k, metric=metric, backend="faiss")
    assert torch.equal(it, i_f)
    torch.testing.assert_close(sf, st, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared-euclidean"])
def test_knn_faiss_matches_torch(metric):
    x, _ = clustered(300, 12, seed=4)
    x = x.float()
    assert_faiss_agrees_with_torch(x, 6, metric, 50)
    q = torch.randn(20, 12)
    assert torch.equal(knn(q, x, k=3, metric=metric, backend="torch")[1], knn(q, x, k=3, metric=metric, backend="faiss")[1])
    # duplicates: the query itself is still removed
    d = torch.cat([x[:5], x[:5]])
    _, i2 = knn(d, k=3, backend="faiss")
    assert not bool((i2 == torch.arange(10)[:, None]).any())


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared-euclidean"])
def test_recall_and_map_match_naive(metric):
    x, y = clustered(120, 5, c=15, spread=1.2, seed=3)
    ks = (1, 2, 4, 8)
    got = recall_at_k(x, y, ks, metric=metric, chunk_size=17)
    want = naive_recall(x, y, ks, metric)
    for k in ks:
        assert got[k] == pytest.approx(want[k], abs=1e-12)
    assert precision_at_1(x, y, metric=metric) == pytest.approx(want[1], abs=1e-12)
    assert map_at_r(x, y, metric=metric, chunk_size=9) == pytest.approx(naive_map_at_r(x, y, metric), abs=1e-12)


class _FakeFlat:
    """faiss's flat indexes, in numpy: inner products or squared L2, best first."""

    def __init__(self, d, l2):
        self.l2, self.r = l2, None

    def add(self, r):
        self.r = r

    def search(self, q, k):
        if self.l2:
            d = ((q[:, None, :] - self.r[None, :, :]) ** 2).sum(-1)
            order = np.argsort(d, axis=1, kind="stable")[:, :k]
        else:
            d = q @ self.r.T
            order = np.argsort(-d, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(d, order, 1).astype(np.float32), order.astype(np.int64)


class _FakeFaiss:
    @staticmethod
    def IndexFlatIP(d):
        return _FakeFlat(d, l2=False)

    @staticmethod
    def IndexFlatL2(d):
        return _FakeFlat(d, l2=True)


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared-euclidean"])
def test_knn_faiss_path_converts_every_distance(monkeypatch, metric):
    import importlib

    knn_mod = importlib.import_module("losskit.metrics.knn")
    monkeypatch.setattr(knn_mod, "_faiss", lambda: _FakeFaiss)
    x, _ = clustered(80, 6, seed=6)
    assert_faiss_agrees_with_torch(x.float(), 4, metric, 16)
    from losskit.distances import BaseDistance

    class Manhattan(BaseDistance):  # a distance faiss's flat indexes do not compute
        def _matrix(self, a, b):
            return torch.cdist(a, b, p=1)

    x = x.float()
    with pytest.raises(ValueError, match=r"metric: backend='faiss' supports .*got Manhattan"):
        knn(x, k=2, metric=Manhattan(), backend="faiss")
    s_auto, i_auto = knn(x, k=2, metric=Manhattan())  # 'auto' falls back to the torch backend
    d = torch.cdist(x, x, p=1).fill_diagonal_(float("inf"))
    torch.testing.assert_close(-s_auto, d.topk(2, largest=False).values)


def test_ties_in_retrieval_follow_rule():
    # every point duplicated across two classes: the tie is broken toward the lower index
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 0, 1])
    # query 0: nearest = 1 (tie-free, score 1) -> class 1, miss; query 1: nearest 0 -> miss
    assert recall_at_k(x, y, (1,))[1] == 0.0
    assert recall_at_k(x, y, (2,))[2] == pytest.approx(naive_recall(x, y, (2,), "cosine")[2])
    assert map_at_r(x, y) == pytest.approx(naive_map_at_r(x, y, "cosine"))


def test_lone_queries_excluded_and_edge_cases():
    x, y = clustered(60, 4, c=6, seed=5)
    y2 = torch.cat([y, torch.tensor([100, 101])])  # two singleton classes
    x2 = torch.cat([x, torch.randn(2, 4, dtype=torch.float64)])
    r = recall_at_k(x2, y2, (1, 4))
    assert r[1] == pytest.approx(naive_recall(x2, y2, (1,), "cosine")[1])
    assert map_at_r(x2, y2) == pytest.approx(naive_map_at_r(x2, y2, "cosine"))
    # single class: every neighbour is relevant
    assert recall_at_k(x, torch.zeros(60, dtype=torch.long), (1,))[1] == 1.0
    assert map_at_r(x, torch.zeros(60, dtype=torch.long)) == 1.0
    # no positive pair at all: nan with a warning
    with pytest.warns(RuntimeWarning, match="no query"):
        assert math.isnan(recall_at_k(x[:5], torch.arange(5), (1,))[1])
    with pytest.warns(RuntimeWarning):
        assert math.isnan(map_at_r(x[:5], torch.arange(5)))
    # K beyond N-1 uses every other sample
    assert recall_at_k(x[:4], torch.tensor([0, 0, 1, 1]), (100,))[100] == 1.0
    with pytest.raises(ValueError, match="labels"):
        recall_at_k(x, y[:-1])
    with pytest.raises(TypeError, match="integer"):
        recall_at_k(x, y.double())
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(x, y, (0,))


def test_retrieval_accumulator_equals_function():
    x, y = clustered(150, 6, c=10, seed=7)
    acc = RetrievalMetrics(ks=(1, 4), metric="cosine", chunk_size=32)
    for a in range(0, 150, 40):
        acc.update(x[a:a + 40], y[a:a + 40].numpy())
    out = acc.compute()
    r = recall_at_k(x, y, (1, 4))
    assert out["recall@1"] == r[1] and out["recall@4"] == r[4]
    assert out["precision@1"] == precision_at_1(x, y) and out["map@r"] == pytest.approx(map_at_r(x, y), abs=1e-12)
    acc.reset()
    with pytest.raises(RuntimeError, match="no data"):
        acc.compute()


def test_no_block_larger_than_chunk_squared(monkeypatch):
    from losskit.distances import CosineSimilarity
    from losskit.metrics import evaluate_embeddings

    sizes = []
    scores = CosineSimilarity.scores

    def spy(self, q, r, r_sqnorm=None):
        sizes.append(q.shape[0] * r.shape[0])
        return scores(self, q, r, r_sqnorm)

    monkeypatch.setattr(CosineSimilarity, "scores", spy)  # every block of every metric goes through it
    x, y = clustered(200, 6, c=3, seed=8)  # big classes: MAP@R needs k of about 70
    evaluate_embeddings(x, y, chunk_size=16)
    assert sizes and max(sizes) <= 16 * 16
