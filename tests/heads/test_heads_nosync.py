"""With ``losskit.tensor_checks(False)`` a margin loss forward and backward on
the dense and chunked heads (and ``head='auto'``, which then never picks
fused) make no host synchronisation: torch.compile(fullgraph=True) of them
runs and matches eager (CPU).  Which compile: ``head='dense'``,
``'chunked'`` and ``'auto'`` with ArcFace, CosFace, combined margin and
NormFace.  Not (a data-dependent shape or a Python float from a tensor, by
design; the exemption table of tests/contracts/contract_cases.py): the fused
head (grouped class tiles, underflow recomputation), the sampled head (Partial
FC's class set), CFCD (the adaptive scale is a Python float), ElasticFace
(draws for the valid rows only) and UNPG (the whisker-filtered negatives)."""

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


NOSYNC_CHUNKED = [("arcface", {}), ("cosface", {}), ("combined-margin", {"m1": 1.2}), ("normalized-softmax", {}),
                  ("elastic-arcface", {"plus": True}), ("elastic-cosface", {})]


@pytest.mark.parametrize("name,kw", NOSYNC_CHUNKED)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("head", ["dense", "chunked", "auto"])
def test_forward_and_backward_make_no_python_host_sync(name, kw, reduction, head):
    # chunk_size 3 (chunked/auto): several chunks, a partial last one, chunks with and without targets
    m = losskit.get(name, num_classes=C, embedding_dim=D, head=head, chunk_size=3, reduction=reduction, **kw)
    x, y = _data()
    x.requires_grad_(True)
    w = torch.rand(6)
    with losskit.tensor_checks(False), _no_host_sync():
        out = m(x, y, sample_weight=w)
        out.sum().backward()
    assert out.shape == (() if reduction == "mean" else (6,))
    assert torch.isfinite(m.weight.grad).all() and torch.isfinite(x.grad).all()


def test_auto_never_picks_fused_with_checks_off_or_while_compiling(monkeypatch):
    from losskit.heads.backends import BACKENDS
    auto = BACKENDS["auto"]
    picked = []
    for b in (auto.dense, auto.chunked, auto.fused):
        monkeypatch.setattr(b, "loss", lambda *a, _b=b, _o=b.loss, **k: (picked.append(_b.name), _o(*a, **k))[1])
    m = losskit.get("arcface", num_classes=C, embedding_dim=D)
    x, y = _data()
    x.requires_grad_(True)
    m(x, y)
    with losskit.tensor_checks(False):
        m(x, y)
        monkeypatch.setattr("losskit.heads.backends.auto.AUTO_DENSE_MAX", 8)
        m(x, y)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    m(x, y)
    assert picked == ["fused", "dense", "chunked", "chunked"]


def _compile_matches_eager(m, x, y):
    """``torch.compile(m, fullgraph=True)`` under ``tensor_checks(False)``
    against eager (also checks off) in value, grad x and grad W."""
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
    return out


@pytest.mark.parametrize("name,kw", [("arcface", {}), ("cosface", {"margin": 0.2})])
def test_torch_compile_fullgraph_matches_eager(name, kw):
    m = losskit.get(name, num_classes=C, embedding_dim=D, head="dense", **kw)
    _compile_matches_eager(m, *_data())


def test_torch_compile_fullgraph_chunked_matches_eager_and_dense():
    torch._dynamo.reset()
    m = losskit.get("arcface", num_classes=C, embedding_dim=D, head="chunked", chunk_size=8)   # 3 chunks
    x, y = _data()
    out = _compile_matches_eager(m, x, y)
    dense = losskit.get("arcface", num_classes=C, embedding_dim=D, head="dense")
    dense.weight.data.copy_(m.weight.data)
    torch.testing.assert_close(out, dense(x, y), rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_auto_picks_chunked_and_matches_eager(monkeypatch):
    # B * C = 6 * 2**20 > 2**22: auto runs chunked (2 chunks of 2**19 classes)
    from losskit.heads.backends import BACKENDS
    torch._dynamo.reset()
    n = 2 ** 20
    m = losskit.get("arcface", num_classes=n, embedding_dim=D, head="auto", chunk_size=2 ** 19)
    picked = []
    ch = BACKENDS["auto"].chunked
    monkeypatch.setattr(ch, "per_row", lambda *a, _o=ch.per_row: (picked.append(1), _o(*a))[1])
    x, y = _data()
    y = torch.where(y >= 0, y * 50000, y)      # targets in both chunks
    _compile_matches_eager(m, x, y)
    assert picked
