"""Contrastive, triplet (every mining mode) and TCM over row blocks
(losskit.kernels.pair_blocks): equal to the dense path and to the loop
references in value and gradient, never a B x M temporary."""

import importlib.util
from pathlib import Path

import pytest
import torch

import losskit
import losskit.functional.pair as fp
from losskit.kernels import pair_blocks
from losskit.core.context import PairReference
from losskit.functional.pair import contrastive_loss, tcm_regularizer, triplet_loss



def _sibling(name):
    """A sibling test module's helpers (the suite runs with --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(f"_chunked_{name}", Path(__file__).with_name(name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_ref = _sibling("test_pair_contrastive_triplet_tcm")
naive_contrastive, naive_tcm, naive_triplet = _ref.naive_contrastive, _ref.naive_tcm, _ref.naive_triplet
LargestTensor = _sibling("test_pair_ms_memory").LargestTensor
no_host_sync = _sibling("test_pair_no_sync").no_host_sync


def _data(B=23, D=5, C=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=dtype), torch.randint(0, C, (B,), generator=g)


CASES = [
    (contrastive_loss, {}),
    (contrastive_loss, {"pair_average": "all", "squared_hinge": True, "pos_margin": 0.2}),
    (contrastive_loss, {"distance": "cosine", "pos_margin": 0.8, "neg_margin": 0.2}),
    (contrastive_loss, {"distance": "dot", "normalize": False, "pos_margin": 1.0, "neg_margin": 0.0}),
    (tcm_regularizer, {}),
    (tcm_regularizer, {"margin_plus": 0.3, "margin_minus": -0.2, "lambda_minus": 0.5}),
] + [
    (triplet_loss, {"mining": m, "smooth": s, "pair_average": pa, "distance": d, "margin": 0.3})
    for m in ("hard", "semi-hard", "all") for s in (False, True) for pa in ("nonzero", "all")
    for d in ("squared-euclidean", "cosine")
] + [(triplet_loss, {"mining": m, "distance": "euclidean", "normalize": False, "margin": 1.0})
     for m in ("hard", "semi-hard", "all")]


def _ids(case):
    f, kw = case
    return f.__name__ + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.fixture
def dense_all_mining(monkeypatch):
    """Triplet all / semi-hard always walk blocks; this gives back their dense form (``chunk_size=None``)."""
    monkeypatch.setattr(fp, "ALWAYS_BLOCKS", ())


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_equals_dense_value_and_gradient(case, reduction, dense_all_mining):
    f, kw = case
    x, y = _data()
    w = torch.rand(x.shape[0], dtype=x.dtype)
    x = x.requires_grad_(True)
    dense = f(x, y, reduction=reduction, sample_weight=w, **kw)
    g_dense, = torch.autograd.grad((dense * torch.arange(1.0, dense.numel() + 1, dtype=x.dtype)).sum(), x)
    for chunk in (1, 5, 23):
        out = f(x, y, reduction=reduction, sample_weight=w, chunk_size=chunk, **kw)
        g, = torch.autograd.grad((out * torch.arange(1.0, out.numel() + 1, dtype=x.dtype)).sum(), x)
        torch.testing.assert_close(out, dense)
        torch.testing.assert_close(g, g_dense)


@pytest.mark.parametrize("mining", ["all", "hard", "semi-hard"])
def test_chunked_matches_the_loop_references(mining):
    for seed in range(3):
        x, y = _data(B=14, seed=seed)
        torch.testing.assert_close(triplet_loss(x, y, 0.2, mining, chunk_size=3).item(),
                                   naive_triplet(x, y, 0.2, mining))
    x, y = _data(B=14, seed=5)
    torch.testing.assert_close(contrastive_loss(x, y, 0.1, 0.9, chunk_size=4).item(), naive_contrastive(x, y, 0.1, 0.9))
    torch.testing.assert_close(tcm_regularizer(x, y, chunk_size=4).item(), naive_tcm(x, y, 1.0, 1.0, 0.9, 0.5))


@pytest.mark.parametrize("case", [CASES[0], CASES[4], (triplet_loss, {"mining": "hard"}),
                                  (triplet_loss, {"mining": "semi-hard"}), (triplet_loss, {"mining": "all"}),
                                  (contrastive_loss, {"squared_hinge": True, "distance": "dot"}),
                                  (triplet_loss, {"mining": "hard", "distance": "euclidean", "smooth": True})],
                         ids=lambda c: _ids(c))
def test_chunked_against_a_reference_set(case, dense_all_mining):
    f, kw = case
    x, y = _data(B=9)
    r, ry = _data(B=17, seed=3)
    self_index = torch.tensor([2, -1, 5, -1, -1, 11, -1, -1, 0])
    w = torch.rand(9, dtype=x.dtype)
    x, r = x.requires_grad_(True), r.requires_grad_(True)
    ref = PairReference(r, ry, self_index=self_index, batch_size=20, count_reduce=lambda n: 3 * n)
    for reduction in ("none", "mean", "sum"):
        dense = f(x, y, reduction=reduction, sample_weight=w, reference=ref, **kw)
        gd = torch.autograd.grad(dense.sum(), (x, r))
        out = f(x, y, reduction=reduction, sample_weight=w, reference=ref, chunk_size=2, **kw)
        g = torch.autograd.grad(out.sum(), (x, r))
        torch.testing.assert_close(out, dense)
        torch.testing.assert_close(g[0], gd[0])
        torch.testing.assert_close(g[1], gd[1])
        assert g[1].abs().sum() > 0


@pytest.mark.parametrize("case", [(contrastive_loss, {"pos_margin": 0.3}), (tcm_regularizer, {}),
                                  (contrastive_loss, {"squared_hinge": True, "pair_average": "all"}),
                                  (triplet_loss, {"mining": "hard", "smooth": True}),
                                  (triplet_loss, {"mining": "semi-hard"}), (triplet_loss, {"mining": "all"})],
                         ids=lambda c: _ids(c))
def test_chunked_gradcheck(case):
    f, kw = case
    x, y = _data(B=10, D=3, C=3, seed=7)
    r, ry = _data(B=6, D=3, C=3, seed=8)
    x, r = x.requires_grad_(True), r.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: f(e, y, chunk_size=3, reduction="none", **kw), (x,))
    assert torch.autograd.gradcheck(
        lambda e, m: f(e, y, chunk_size=4, reference=PairReference(m, ry), **kw), (x, r))


@pytest.mark.parametrize("case", [(contrastive_loss, {}), (tcm_regularizer, {}), (triplet_loss, {"mining": "hard"}),
                                  (triplet_loss, {"mining": "semi-hard"}), (triplet_loss, {"mining": "all"})],
                         ids=lambda c: _ids(c))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_blocks_bound_the_largest_temporary(case, reduction, dense_all_mining):
    f, kw = case
    B, D, chunk = 192, 8, 16
    x = torch.randn(B, D, requires_grad=True)
    y = torch.arange(B) % 24
    with LargestTensor() as mode:
        out = f(x, y, reduction=reduction, chunk_size=chunk, **kw)
        (out.sum() if reduction == "none" else out).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert mode.largest <= chunk * B, mode.largest
    with LargestTensor() as probe:  # the probe can fail: the dense path holds B x B
        f(x, y, reduction=reduction, **kw)
    assert probe.largest >= B * B


def test_large_batches_walk_blocks_by_default(monkeypatch):
    x, y = _data(B=40)
    assert fp.ALWAYS_BLOCKS == ("all", "semi-hard")
    with LargestTensor() as mode:  # all and semi-hard walk blocks at any size
        triplet_loss(x, y, mining="all")
        triplet_loss(x, y, mining="semi-hard")
    assert mode.largest < 40 * 40 * 40
    monkeypatch.setattr(fp, "ALWAYS_BLOCKS", ())
    want = [contrastive_loss(x, y), triplet_loss(x, y), tcm_regularizer(x, y)]
    monkeypatch.setattr(fp, "DENSE_MAX_PAIRS", 100)  # 40 x 40 pairs is now "large"
    monkeypatch.setattr(pair_blocks, "PAIR_BLOCK_ELEMENTS", 400)  # default blocks: 10 rows of 40
    with LargestTensor() as mode:
        got = [contrastive_loss(x, y), triplet_loss(x, y), tcm_regularizer(x, y)]
    assert mode.largest <= 400 * 4  # semi-hard asks for a quarter of the rows: at most 400 (+ int64 views)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # the modules take the same path (their forward signature is unchanged)
    torch.testing.assert_close(losskit.get("triplet", mining="hard")(x, y), triplet_loss(x, y, mining="hard"))


def test_bf16_and_empty_and_single_class(dense_all_mining):
    x, y = _data(B=30, dtype=torch.float32)
    xb = x.bfloat16().requires_grad_(True)
    for f, kw in [(contrastive_loss, {}), (tcm_regularizer, {}), (triplet_loss, {"mining": "semi-hard"})]:
        out = f(xb, y, chunk_size=7, **kw)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float())
        out.backward()
        assert torch.isfinite(xb.grad.float()).all()
        xb.grad = None
        torch.testing.assert_close(out.float(), f(xb.float(), y, **kw), rtol=2e-2, atol=2e-2)
        one = torch.randn(6, 4, requires_grad=True)
        for yy in (torch.zeros(6, dtype=torch.long), torch.arange(6)):  # one class; one sample per class
            z = f(one, yy, chunk_size=2, **kw)
            gz, = torch.autograd.grad(z, one)
            zd = f(one, yy, **kw)
            gd, = torch.autograd.grad(zd, one)
            torch.testing.assert_close(z, zd)
            torch.testing.assert_close(gz, gd)
        e = f(torch.randn(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long), chunk_size=2, **kw)
        assert e.item() == 0.0


@pytest.mark.parametrize("case", [(contrastive_loss, {}), (tcm_regularizer, {}), (triplet_loss, {"mining": "hard"}),
                                  (triplet_loss, {"mining": "semi-hard"}), (triplet_loss, {"mining": "all"})],
                         ids=lambda c: _ids(c))
def test_chunked_forward_without_host_sync(case):
    f, kw = case
    x, y = _data(B=16, dtype=torch.float32)
    want = f(x, y, chunk_size=5, **kw)
    with no_host_sync():
        out = f(x, y, chunk_size=5, **kw)
    torch.testing.assert_close(out, want)


def test_chunk_size_is_checked():
    x, y = _data(B=4)
    for f in (contrastive_loss, triplet_loss, tcm_regularizer):
        with pytest.raises(ValueError, match="chunk_size: expected an integer >= 1, got 0"):
            f(x, y, chunk_size=0)


LISTED = [(contrastive_loss, {}), (contrastive_loss, {"squared_hinge": True, "pair_average": "all", "pos_margin": 0.2}),
          (contrastive_loss, {"distance": "squared-euclidean", "neg_margin": 1.5}),
          (contrastive_loss, {"distance": "squared-euclidean", "squared_hinge": True}),
          (contrastive_loss, {"distance": "cosine", "pos_margin": 0.8, "neg_margin": 0.2}),
          (contrastive_loss, {"distance": "dot", "normalize": False, "squared_hinge": True, "neg_margin": 0.5}),
          (contrastive_loss, {"neg_margin": -0.1, "pair_average": "all"}),
          (tcm_regularizer, {}), (tcm_regularizer, {"margin_plus": 0.3, "margin_minus": -0.2}),
          (triplet_loss, {"mining": "hard"}), (triplet_loss, {"mining": "hard", "distance": "cosine", "smooth": True}),
          (triplet_loss, {"mining": "hard", "distance": "euclidean", "normalize": False, "margin": 1.0}),
          (triplet_loss, {"mining": "semi-hard"}), (triplet_loss, {"mining": "semi-hard", "distance": "cosine"}),
          (triplet_loss, {"mining": "semi-hard", "distance": "euclidean", "normalize": False, "margin": 1.0,
                          "pair_average": "all"}),
          (triplet_loss, {"mining": "all"}), (triplet_loss, {"mining": "all", "pair_average": "all"}),
          (triplet_loss, {"mining": "all", "distance": "cosine", "smooth": True}),
          (triplet_loss, {"mining": "all", "distance": "cosine", "pair_average": "all", "margin": 0.3}),
          (triplet_loss, {"mining": "all", "distance": "dot", "normalize": False, "smooth": True,
                          "pair_average": "all"}),
          (triplet_loss, {"mining": "all", "distance": "euclidean", "normalize": False, "margin": 1.0}),
          (triplet_loss, {"mining": "all", "distance": "euclidean", "normalize": False, "margin": 1.0,
                          "smooth": True, "pair_average": "all"}),
          (triplet_loss, {"mining": "all", "reduction": "sum", "margin": 0.3})]


@pytest.mark.parametrize("case", LISTED, ids=[_ids(c) for c in LISTED])
def test_listed_pairs_path_equals_the_mask_path(case, monkeypatch):
    """The scalar reductions list the same-label pairs when they are few (no B x M masks); the
    result is the mask path's, with the batch or a reference set (own columns, pair counts summed
    by count_reduce), and with exact duplicates across classes (distance 0: zero gradient)."""
    f, kw = case
    x, y = _data(B=40, D=6, C=10, seed=11)
    x[7] = x[3]  # a duplicate in another class (labels differ for this seed)
    assert y[7] != y[3]
    r, ry = _data(B=30, D=6, C=10, seed=12)
    self_index = torch.full((40,), -1, dtype=torch.long)
    self_index[:5] = torch.tensor([4, 0, 9, 2, 17])
    w = torch.rand(40, dtype=x.dtype)
    taken = []
    orig = pair_blocks.listed_totals
    monkeypatch.setattr(pair_blocks, "listed_totals", lambda *a: taken.append(orig(*a)) or taken[-1])
    for ref in (None, "set"):
        xx, rr = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
        reference = None if ref is None else PairReference(rr, ry, self_index=self_index, batch_size=50,
                                                           count_reduce=lambda n: 2 * n)
        leaves = (xx,) if ref is None else (xx, rr)
        n = len(taken)
        out = f(xx, y, sample_weight=w, reference=reference, chunk_size=16, **kw)
        g = torch.autograd.grad(out, leaves)
        assert len(taken) == n + 1 and taken[-1] is not None  # the listed path ran (no fallback)
        with monkeypatch.context() as mp:
            mp.setattr(pair_blocks, "listed_capable", lambda rule: False)
            want = f(xx, y, sample_weight=w, reference=reference, chunk_size=16, **kw)
            gw = torch.autograd.grad(want, leaves)
        torch.testing.assert_close(out, want)
        for a, b in zip(g, gw):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b)


def test_listed_pairs_give_way_to_masks_when_positives_are_many(monkeypatch):
    x, y = _data(B=30, C=2)
    calls = []
    orig = pair_blocks.listed_totals
    monkeypatch.setattr(pair_blocks, "listed_totals", lambda *a: calls.append(orig(*a)) or calls[-1])
    torch.testing.assert_close(contrastive_loss(x, y, chunk_size=4), contrastive_loss(x, y))
    assert calls == [None]  # about 15 positives per row > 4 rows per block: the mask path
