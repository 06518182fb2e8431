import pytest
import torch
import torch.nn.functional as F

from losskit.distances import (CosineSimilarity, DotProductSimilarity, EuclideanDistance, SquaredEuclideanDistance,
                               get_distance)


def naive(name, x, y, normalize):
    if normalize or name == "cosine":
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    out = torch.empty(x.shape[0], y.shape[0], dtype=x.dtype)
    for i in range(x.shape[0]):
        for j in range(y.shape[0]):
            if name in ("cosine", "dot"):
                out[i, j] = (x[i] * y[j]).sum()
            else:
                d2 = ((x[i] - y[j]) ** 2).sum()
                out[i, j] = d2 if name == "squared-euclidean" else d2.sqrt()
    return out


@pytest.mark.parametrize("name", ["cosine", "dot", "euclidean", "squared-euclidean"])
@pytest.mark.parametrize("normalize", [False, True])
def test_pairwise_and_chunks_match_naive(name, normalize):
    torch.manual_seed(0)
    x, y = torch.randn(11, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    d = get_distance(name, normalize=normalize)
    ref = naive(name, x, y, normalize)
    torch.testing.assert_close(d.pairwise(x, y), ref)
    torch.testing.assert_close(d(x, y), ref)
    blocks = list(d.chunks(x, y, chunk_size=3))
    assert [b[2].shape[0] for b in blocks] == [3, 3, 3, 2]
    torch.testing.assert_close(torch.cat([b[2] for b in blocks]), ref)
    torch.testing.assert_close(d.paired(x[:7], y), torch.diagonal(ref[:7]))
    assert d.is_similarity == (name in ("cosine", "dot")) == d.is_inverted


def test_default_chunks_bound_block_size():
    x = torch.randn(300, 4)
    for s, e, blk in EuclideanDistance().chunks(x, chunk_size=None):
        assert blk.shape == (e - s, 300)
    from losskit.distances import default_chunk_size
    assert default_chunk_size(8192, 8192) * 8192 <= 1 << 22


def test_margin_and_direction():
    assert CosineSimilarity().margin(0.2, 0.5) == pytest.approx(0.3)  # a similarity: b - a
    assert EuclideanDistance().margin(0.2, 0.5) == pytest.approx(-0.3)


def test_euclidean_zero_distance_has_finite_gradient():
    x = torch.randn(4, 3, dtype=torch.float64)
    x = torch.cat([x, x[:1]]).requires_grad_(True)  # a duplicate and the diagonal: distance 0
    EuclideanDistance().pairwise(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    y = torch.randn(3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: EuclideanDistance().pairwise(a, y), (x,))


def test_bad_input():
    with pytest.raises(ValueError, match="distance"):
        get_distance("manhattan")
    with pytest.raises(ValueError, match="y"):
        DotProductSimilarity().pairwise(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="x"):
        SquaredEuclideanDistance().pairwise(torch.randn(3))
    with pytest.raises(ValueError, match="normalize"):
        CosineSimilarity(normalize=False)
    with pytest.raises(ValueError, match="chunk_size"):
        list(CosineSimilarity().chunks(torch.randn(3, 2), chunk_size=-1))


@pytest.mark.parametrize("name", ["cosine", "dot", "euclidean", "squared-euclidean"])
def test_scores_are_higher_is_closer_and_reuse_norms(name):
    torch.manual_seed(1)
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    d = get_distance(name)
    ref = naive(name, x, y, False)
    want = ref if d.is_similarity else -ref
    xp, yp = d.prepare(x), d.prepare(y)
    torch.testing.assert_close(d.scores(xp, yp), want)
    torch.testing.assert_close(d.scores(xp, yp, d.sq_norms(yp)), want)
    assert (d.sq_norms(yp) is None) == d.is_similarity


def test_one_resolver_one_message():
    from losskit.distances import DISTANCE_NAMES

    assert DISTANCE_NAMES == ("cosine", "dot", "euclidean", "squared-euclidean")
    names = r"\('cosine', 'dot', 'euclidean', 'squared-euclidean'\) or a BaseDistance"
    with pytest.raises(ValueError, match=rf"^distance: expected one of {names}, got 'manhattan'$"):
        get_distance("manhattan")
    with pytest.raises(ValueError, match=rf"^metric: expected one of {names}, got 3$"):
        get_distance(3, name="metric")
    d = EuclideanDistance(normalize=True)
    assert get_distance(d) is d
    assert get_distance("euclidean", normalize=True).normalize and not get_distance("dot").normalize
    with pytest.warns(DeprecationWarning, match="distance='squared' is deprecated; use 'squared-euclidean'"):
        assert type(get_distance("squared")) is SquaredEuclideanDistance
