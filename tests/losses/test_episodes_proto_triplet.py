import math

import pytest
import torch

import losskit
from losskit.functional.episodes import proto_triplet_loss, split_support_query


def naive_split(y):
    """First ceil(n_c / 2) rows of each class (batch order) are support."""
    y = [int(v) for v in y]
    seen, n = {}, {}
    for v in y:
        n[v] = n.get(v, 0) + 1
    support = []
    for v in y:
        r = seen.get(v, 0)
        seen[v] = r + 1
        support.append(v >= 0 and r < (n[v] + 1) // 2)
    return support


def naive_proto_triplet(x, y, support, margin, negatives="hardest", distance="euclidean", normalize=False):
    """One loss per batch row (support rows 0), from the paper's equations.
    ``normalize``: the distance L2-normalises both the query and the prototype."""
    rows = range(len(y))
    protos = {}
    for c in sorted({int(y[i]) for i in rows if support[i]}):
        members = [x[i] for i in rows if support[i] and int(y[i]) == c]
        protos[c] = [sum(float(m[d]) for m in members) / len(members) for d in range(x.shape[1])]

    def dist(a, p):
        # returned as a distance (larger = farther): similarities are negated
        a = [float(v) for v in a]
        if normalize:
            na, n_p = math.sqrt(sum(u * u for u in a)), math.sqrt(sum(v * v for v in p))
            a, p = [u / na for u in a], [v / n_p for v in p]
        if distance in ("cosine", "dot"):
            dot = sum(u * v for u, v in zip(a, p))
            if distance == "cosine":
                dot /= math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in p))
            return -dot
        s = sum((a[d] - p[d]) ** 2 for d in range(len(p)))
        return s if distance == "squared-euclidean" else math.sqrt(s)

    out = []
    for i in rows:
        if support[i]:
            out.append(0.0)
            continue
        c = int(y[i])
        others = [k for k in protos if k != c]
        if c not in protos or not others:
            out.append(0.0)
            continue
        dp = dist(x[i], protos[c])
        if negatives == "all":
            out.append(sum(max(0.0, dp - dist(x[i], protos[k]) + margin) for k in others) / len(others))
        else:
            out.append(max(0.0, dp - min(dist(x[i], protos[k]) for k in others) + margin))
    return torch.tensor(out, dtype=torch.float64)


def batch(P=4, K=5, D=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(P).repeat(K)[torch.randperm(P * K, generator=g)]
    return torch.randn(P * K, D, generator=g, dtype=dtype), y


def test_split_is_first_half_of_each_class_in_batch_order():
    y = torch.tensor([2, 0, 2, 1, 0, 2, 0, 0, 5, -1, 2])
    assert split_support_query(y).tolist() == naive_split(y)
    # K = 1: the single row is support, no query
    assert split_support_query(torch.tensor([0, 1, 2])).all()


@pytest.mark.parametrize("negatives", ["all", "hardest"])
@pytest.mark.parametrize("distance", ["euclidean", "squared-euclidean", "cosine", "dot"])
def test_matches_naive_loop(negatives, distance):
    x, y = batch()
    margin = 0.1 if distance == "cosine" else 0.5
    ref = naive_proto_triplet(x, y, naive_split(y), margin, negatives, distance)
    m = losskit.get("proto-triplet", margin=margin, negatives=negatives, distance=distance, reduction="none")
    out = m(x, y)
    assert out.shape == (len(y),)  # aligned with the input rows; support rows hold 0
    torch.testing.assert_close(out, ref)
    assert (ref > 0).any()  # the reference is not trivially zero
    assert (out[torch.tensor(naive_split(y))] == 0).all()


def test_distance_vocabulary_is_the_losses_one():
    from losskit.distances import DISTANCE_NAMES, EuclideanDistance

    x, y = batch(seed=4)
    with pytest.raises(ValueError, match=r"distance: expected one of \('cosine', 'dot', 'euclidean', "
                                         r"'squared-euclidean'\) or a BaseDistance, got 'l2'"):
        losskit.get("proto-triplet", distance="l2")
    with pytest.raises(ValueError, match=r"distance: expected one of \('cosine', 'dot'"):
        proto_triplet_loss(x, y, distance="squared_euclidean")
    assert DISTANCE_NAMES == ("cosine", "dot", "euclidean", "squared-euclidean")
    # an object is accepted where a name is: Euclidean between normalised queries and prototypes
    torch.testing.assert_close(proto_triplet_loss(x, y, distance=EuclideanDistance(normalize=True), reduction="none"),
                               naive_proto_triplet(x, y, naive_split(y), 0.5, normalize=True))
    # the old spelling still works, with a warning
    with pytest.warns(DeprecationWarning, match="'squared' is deprecated; use 'squared-euclidean'"):
        old = losskit.get("proto-triplet", distance="squared")
    torch.testing.assert_close(old(x, y), proto_triplet_loss(x, y, distance="squared-euclidean"))


def test_reductions_sample_weight_and_support_mask():
    x, y = batch(P=3, K=4, seed=1)
    support = naive_split(y)
    ref = naive_proto_triplet(x, y, support, 0.7)
    n_query = len(y) - sum(support)
    w = torch.rand(len(y), dtype=torch.float64)
    out_sum = proto_triplet_loss(x, y, margin=0.7, reduction="sum", sample_weight=w)
    torch.testing.assert_close(out_sum, (ref * w).sum())
    # the mean's denominator is the number of query rows, not B
    torch.testing.assert_close(proto_triplet_loss(x, y, margin=0.7, sample_weight=w), (ref * w).sum() / n_query)
    torch.testing.assert_close(proto_triplet_loss(x, y, margin=0.7, reduction="none", sample_weight=w), ref * w)
    # explicit support mask: one support row per class, the rest are queries
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(3):
        mask[(y == c).nonzero()[0]] = True
    ref2 = naive_proto_triplet(x, y, mask.tolist(), 0.7)
    torch.testing.assert_close(proto_triplet_loss(x, y, 0.7, reduction="none", support_mask=mask), ref2)
    torch.testing.assert_close(proto_triplet_loss(x, y, 0.7, support_mask=mask), ref2.sum() / (len(y) - 3))


def test_gradcheck_float64():
    x, y = batch(P=3, K=4, D=4, seed=2)
    x.requires_grad_(True)
    for neg in ("all", "hardest"):
        for dist, margin in (("euclidean", 2.0), ("cosine", 0.5)):
            assert torch.autograd.gradcheck(lambda e: proto_triplet_loss(e, y, margin, neg, dist), (x,))


def test_no_valid_query_is_zero_with_graph():
    cases = [
        (torch.randn(6, 3, requires_grad=True), torch.zeros(6, dtype=torch.long)),  # one class
        (torch.randn(4, 3, requires_grad=True), torch.arange(4)),  # one sample per class: no query
        (torch.randn(0, 3, requires_grad=True), torch.zeros(0, dtype=torch.long)),  # empty
    ]
    for x, y in cases:
        out = losskit.get("proto-triplet")(x, y)
        assert out.item() == 0.0
        out.backward()
        assert x.grad is not None and torch.all(x.grad == 0)


def test_class_without_prototype_gets_zero():
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 2])
    mask = torch.tensor([True, True, False, False, False])  # class 2 has no support row
    out = proto_triplet_loss(x, y, reduction="none", support_mask=mask)
    assert out.shape == (5,) and out[4] == 0 and (out[:2] == 0).all()


def test_huge_distances_and_bf16():
    x, y = batch(P=4, K=4, D=8, seed=3, dtype=torch.float32)
    big = proto_triplet_loss(x * 1e6, y, margin=0.0, reduction="none")
    small = proto_triplet_loss(x, y, margin=0.0, reduction="none")
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, small * 1e6, rtol=1e-3, atol=1e-3)
    xb = (x * 30).bfloat16().requires_grad_(True)
    out = losskit.get("proto-triplet")(xb, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float())
    out.backward()
    assert torch.isfinite(xb.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = losskit.get("proto-triplet")(x.requires_grad_(True), y)
    assert torch.isfinite(out.float())


def test_bad_input_errors():
    m = losskit.get("proto-triplet")
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"labels: expected shape \[4\]"):
        m(x, y[:3])
    with pytest.raises(ValueError, match=r"labels: expected class ids >= 0, got -1"):
        m(x, torch.tensor([0, 0, 1, -1]))
    with pytest.raises(ValueError, match=r"embeddings: expected shape \[B, D\]"):
        m(x[None], y)
    with pytest.raises(ValueError, match="embeddings: expected finite"):
        m(torch.full((4, 3), float("nan")), y)
    with pytest.raises(ValueError, match=r"support_mask: expected shape \[4\].*got \[3\]"):
        m(x, y, support_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="support_mask: expected dtype torch.bool"):
        m(x, y, support_mask=torch.ones(4))
    with pytest.raises(ValueError, match=r"sample_weight: expected shape \[4\]"):
        m(x, y, sample_weight=torch.ones(2))
    with pytest.raises(ValueError, match=r"embeddings: expected finite values, got inf at index \(1, 2\)"):
        m(x.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(float("inf"))), y)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(negatives="semi"), ValueError, r"negatives: expected one of \('all', 'hardest'\), got 'semi'"),
    (dict(margin=-1.0), ValueError, r"margin: expected a value >= 0.0, got -1.0"),
    (dict(margin=float("nan")), ValueError, r"margin: expected a finite number >= 0.0, got nan"),
    (dict(margin=float("inf")), ValueError, r"margin: expected a finite number >= 0.0, got inf"),
    (dict(margin="0.5"), TypeError, r"margin: expected a real number >= 0.0, got str '0.5'"),
    (dict(reduction="avg"), ValueError, r"reduction: expected one of \('mean', 'sum', 'none'\), got 'avg'"),
])
def test_hyperparameters_checked_at_construction_and_by_the_function(kw, err, msg):
    with pytest.raises(err, match=msg):
        losskit.get("proto-triplet", **kw)
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(err, match=msg):
        proto_triplet_loss(x, y, **kw)


def test_hparams_captured_and_value_checks_switch():
    m = losskit.get("proto-triplet", margin=0.3, distance="cosine")
    assert m.hparams == {"margin": 0.3, "negatives": "hardest", "distance": "cosine", "reduction": "mean"}
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, -1])
    with losskit.tensor_checks(False):  # the label range is a value check: skipped
        assert torch.isfinite(m(x, y))


def test_registry_entry():
    s = losskit.spec("proto-triplet")
    assert s.kind == "objective"
    assert (s.family, s.task, s.paper.arxiv) == ("pair", "embedding", "2305.09062")
    assert s.hparams["margin"] == 0.5


def code_proto_triplet(queries, y_q, protos, y_p, margin=0.5):
    """The authors' ``proto_triplet_loss`` (maumruiz/FSL-Loss, algorithms/icnn_loss.py) as loops:
    distance sqrt(||q - c||^2 + 1e-6), hardest other prototype, mean over queries."""
    vals = []
    for q, c in zip(queries, y_q):
        d = {int(k): math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(q, p)) + 1e-6)
             for p, k in zip(protos, y_p)}
        pos = d[int(c)]
        neg = min(v for k, v in d.items() if k != int(c))
        vals.append(max(0.0, pos - neg + margin))
    return sum(vals) / len(vals)


def test_default_is_the_authors_code():
    g = torch.Generator().manual_seed(3)
    way, shot, query = 5, 3, 4
    support = torch.randn(way * shot, 6, generator=g, dtype=torch.float64)
    queries = torch.randn(way * query, 6, generator=g, dtype=torch.float64)
    ys, yq = torch.arange(way).repeat_interleave(shot), torch.arange(way).repeat_interleave(query)
    protos = torch.stack([support[ys == c].mean(0) for c in range(way)])
    x, y = torch.cat([support, queries]), torch.cat([ys, yq])
    mask = torch.arange(len(y)) < len(ys)
    ref = code_proto_triplet(queries, yq, protos, torch.arange(way))
    # the only difference is the code's 1e-6 under the square root
    torch.testing.assert_close(losskit.get("proto-triplet")(x, y, support_mask=mask).item(), ref, rtol=0, atol=1e-5)
