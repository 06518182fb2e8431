"""With ``losskit.tensor_checks(False)`` a margin loss forward on the dense
head makes no host synchronisation: torch.compile(fullgraph=True) of it
runs and matches eager (CPU).  Which heads compile: ``head='dense'`` with
ArcFace, CosFace, combined margin and NormFace.  Not (a data-dependent
shape or a Python float from a tensor, by design): the chunked, fused and
sampled heads (per-chunk target grouping), CFCD (the adaptive scale is a
Python float), ElasticFace (draws for the valid rows only) and UNPG (the
whisker-filtered negatives)."""

import contextlib

import pytest
import torch
from torch import Tensor

import losskit

C, D = 20, 8
SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@contextlib.contextmanager
def _no_host_sync():
    """Every Python-level way to read a tensor on the host raises inside."""
    saved = {n: getattr(Tensor, n) for n in SYNCING}

    def boom(n):
        def f(self, *a, **k):
            raise AssertionError(f"host synchronisation: Tensor.{n}")
        return f

    try:
        for n in SYNCING:
            setattr(Tensor, n, boom(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(Tensor, n, f)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, D, generator=g)
    y = torch.randint(0, C, (6,), generator=g)
    y[1] = -1
    return x, y


def test_the_probe_catches_a_sync():
    with _no_host_sync(), pytest.raises(AssertionError, match="Tensor.item"):
        torch.ones(1).item()
    # with value checks on, the forward does read values on the host (finite check)
    m = losskit.get("arcface", num_classes=C, embedding_dim=D, head="dense")
    with _no_host_sync(), pytest.raises(AssertionError, match="host synchronisation"):
        m(*_data())


@pytest.mark.parametrize("name,kw", [("arcface", {}), ("cosface", {}), ("combined-margin", {"m1": 1.2}),
                                     ("normalized-softmax", {})])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dense_forward_and_backward_make_no_python_host_sync(name, kw, reduction):
    m = losskit.get(name, num_classes=C, embedding_dim=D, head="dense", reduction=reduction, **kw)
    x, y = _data()
    x.requires_grad_(True)
    w = torch.rand(6)
    with losskit.tensor_checks(False), _no_host_sync():
        out = m(x, y, sample_weight=w)
        out.sum().backward()
    assert out.shape == (() if reduction == "mean" else (6,))


@pytest.mark.parametrize("name,kw", [("arcface", {}), ("cosface", {"margin": 0.2})])
def test_torch_compile_fullgraph_matches_eager(name, kw):
    m = losskit.get(name, num_classes=C, embedding_dim=D, head="dense", **kw)
    x, y = _data()
    xc = x.clone().requires_grad_(True)
    xe = x.clone().requires_grad_(True)
    with losskit.tensor_checks(False):
        f = torch.compile(m, fullgraph=True, backend="aot_eager")
        out = f(xc, y)
        out.backward()
    gw = m.weight.grad.clone()
    m.weight.grad = None
    ref = m(xe, y)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(gw, m.weight.grad)
