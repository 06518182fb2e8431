"""With value checks off a pair-loss forward makes no host synchronisation,
and torch.compile(fullgraph=True) traces it without a graph break."""

import contextlib

import pytest
import torch

import losskit
from losskit.core.context import PairReference
from losskit.losses.xbm import CrossBatchMemory

CASES = [("contrastive", {}), ("contrastive", {"distance": "cosine", "pos_margin": 0.9, "neg_margin": 0.3}),
         ("triplet", {"mining": "hard"}), ("triplet", {"mining": "all"}), ("triplet", {"mining": "semi-hard"}),
         ("multi-similarity", {}), ("multi-similarity", {"reduction": "none"}), ("tcm", {})]
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__")


def _data(B=12, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randint(0, 3, (B,), generator=g)


@contextlib.contextmanager
def no_host_sync():
    """Value checks off, and the Tensor methods that synchronise raise."""
    def refuse(self, *a, **k):
        raise AssertionError("host synchronisation during the forward")

    with losskit.tensor_checks(False), pytest.MonkeyPatch.context() as mp:
        for name in SYNCS:
            mp.setattr(torch.Tensor, name, refuse)
        yield


@pytest.mark.parametrize("name,kw", CASES)
def test_forward_without_host_sync(name, kw):
    x, y = _data()
    m = losskit.get(name, **kw)
    r, ry = _data(7, seed=1)
    ref = PairReference(r, ry, self_index=torch.full((12,), -1, dtype=torch.long))
    want, want_ref = m(x, y), m(x, y, reference=ref)
    with no_host_sync():
        out, out_ref = m(x, y), m(x, y, reference=ref)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out_ref, want_ref)


def test_patch_catches_a_sync():
    # the probe can fail: with value checks on, the NaN check synchronises
    with pytest.raises(AssertionError, match="host synchronisation"), no_host_sync(), losskit.tensor_checks(True):
        losskit.get("contrastive")(*_data())


def test_cross_batch_memory_forward_without_host_sync():
    xbm = CrossBatchMemory("contrastive", memory_size=20)
    x, y = _data()
    xbm(x, y)
    with no_host_sync():
        out = xbm(*_data(seed=2))
    assert out.dim() == 0


# Multi-Similarity is not here: its kernel lists the positives with torch.nonzero (a data-dependent
# shape, see docs/pair.md), and so do triplet mining 'all' and 'semi-hard'
@pytest.mark.parametrize("name,kw", [("contrastive", {}), ("triplet", {"mining": "hard"}), ("tcm", {"base": None})])
def test_torch_compile_fullgraph_matches_eager(name, kw):
    x, y = _data()
    m = losskit.get(name, **kw)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = m(xe, y)
    want.backward()
    torch._dynamo.reset()
    try:
        with losskit.tensor_checks(False):
            out = torch.compile(m, backend="aot_eager", fullgraph=True)(xc, y)
        out.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(xc.grad, xe.grad)
