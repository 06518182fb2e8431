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


def naive_proto_triplet(x, y, support, margin, negatives="all", squared=False):
    rows = range(len(y))
    protos = {}
    for c in sorted({int(y[i]) for i in rows if support[i]}):
        members = [x[i] for i in rows if support[i] and int(y[i]) == c]
        protos[c] = [sum(float(m[d]) for m in members) / len(members) for d in range(x.shape[1])]

    def dist(a, p):
        s = sum((float(a[d]) - p[d]) ** 2 for d in range(len(p)))
        return s if squared else math.sqrt(s)

    out = []
    for i in rows:
        if support[i]:
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
@pytest.mark.parametrize("distance", ["euclidean", "squared"])
def test_matches_naive_loop(negatives, distance):
    x, y = batch()
    ref = naive_proto_triplet(x, y, naive_split(y), 0.5, negatives, distance == "squared")
    m = losskit.get("proto-triplet", negatives=negatives, distance=distance, reduction="none")
    torch.testing.assert_close(m(x, y), ref)
    assert (ref > 0).any()  # the reference is not trivially zero


def test_reductions_sample_weight_and_support_mask():
    x, y = batch(P=3, K=4, seed=1)
    support = naive_split(y)
    ref = naive_proto_triplet(x, y, support, 0.7)
    w = torch.rand(len(y), dtype=torch.float64)
    wq = w[~torch.tensor(support)]
    out_sum = proto_triplet_loss(x, y, margin=0.7, reduction="sum", sample_weight=w)
    torch.testing.assert_close(out_sum, (ref * wq).sum())
    torch.testing.assert_close(proto_triplet_loss(x, y, margin=0.7, sample_weight=w), (ref * wq).mean())
    # explicit support mask: one support row per class, the rest are queries
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(3):
        mask[(y == c).nonzero()[0]] = True
    ref2 = naive_proto_triplet(x, y, mask.tolist(), 0.7)
    torch.testing.assert_close(proto_triplet_loss(x, y, 0.7, reduction="none", support_mask=mask), ref2)


def test_gradcheck_float64():
    x, y = batch(P=3, K=4, D=4, seed=2)
    x.requires_grad_(True)
    for neg in ("all", "hardest"):
        assert torch.autograd.gradcheck(lambda e: proto_triplet_loss(e, y, 2.0, negatives=neg), (x,))


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
    assert out.shape == (3,) and out[2] == 0


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
    with pytest.raises(ValueError, match="negatives: expected 'all' or 'hardest', got 'semi'"):
        losskit.get("proto-triplet", negatives="semi")
    with pytest.raises(ValueError, match="margin: expected"):
        proto_triplet_loss(x, y, margin=-1.0)


def test_registry_entry():
    s = losskit.spec("proto-triplet")
    assert (s.family, s.task, s.paper.arxiv) == ("pair", "embedding", "2305.09062")
    assert s.hparams["margin"] == 0.5
