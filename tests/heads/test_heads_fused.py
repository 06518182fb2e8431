"""head="fused" (gradients computed during forward, row blocks spanning all
classes): equal to the dense head in loss and gradients for every margin,
'mean' and 'sum', sample weights, label -1 rows, any grad_output and a
second backward; falls back to the chunked head where it does not apply;
never builds B x C; 3 GEMMs."""

import pytest
import torch

import losskit
from losskit.kernels import fused_margin_ce as fused_mod
from losskit.kernels.fused_margin_ce import auto_row_chunk, fused_margin_ce


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


B, C, D, ROWS = 7, 1003, 32, 3

NAMES = [("arcface", {}), ("arcface", {"straight_through": True}), ("cosface", {}), ("normalized-softmax", {}),
         ("combined-margin", {}), ("elastic-arcface", {"plus": True}), ("elastic-cosface", {"plus": True}),
         ("elastic-arcface", {}), ("cfcd", {"alpha": 0.1}), ("cfcd", {"alpha": 0.1, "bbar": "mean"}),
         ("unpg", {"whisker": 1.0}), ("unpg", {"base": "cosface", "whisker": 0.5}),
         ("normalized-softmax", {"scale": 100.0})]   # scale > 80: row-maximum reference throughout


@pytest.fixture
def count_fused(monkeypatch):
    calls = []
    orig = fused_mod.FusedMarginCE.apply

    def apply(*a):
        calls.append(1)
        return orig(*a)

    monkeypatch.setattr(fused_mod.FusedMarginCE, "apply", apply)
    return calls


def _pair(name, kw, reduction, head="fused"):
    dense = losskit.get(name, num_classes=C, embedding_dim=D, head="dense", reduction=reduction, **kw)
    other = losskit.get(name, num_classes=C, embedding_dim=D, head=head, reduction=reduction, **kw)
    other.row_chunk_size = ROWS
    other.chunk_size = 128
    torch.nn.init.normal_(dense.weight, generator=torch.Generator().manual_seed(0))
    other.weight.data.copy_(dense.weight.data)
    return dense, other


def _data(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    y[0] = y[4]          # a repeated class
    y[2] = -1            # an ignored row
    return x, y, torch.rand(B, generator=g)


def _run(m, x, y, w, grads=(1.0,), seed=7):
    x = x.clone().requires_grad_(True)
    m.weight.grad = None
    torch.manual_seed(seed)
    out = m(x, y, sample_weight=w)
    for i, g in enumerate(grads):
        out.backward(torch.tensor(g), retain_graph=i + 1 < len(grads))
    return out.detach(), x.grad, m.weight.grad.clone()


def _close(a, b, what):
    scale = max(float(b.abs().max()), 1e-6)
    assert float((a - b).abs().max()) <= 1e-5 * scale + 1e-7, f"{what}: {float((a - b).abs().max())} vs {scale}"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name,kw", NAMES)
def test_fused_equals_dense(name, kw, reduction, count_fused):
    x, y, w = _data()
    dense, fused = _pair(name, kw, reduction)
    for weights in (None, w):
        for grads in ((1.0,), (1.7,), (2.0, -0.5), (1.0, 1.0)):     # grad_output != 1, a second backward
            a = _run(dense, x, y, weights, grads)
            b = _run(fused, x, y, weights, grads)
            for u, v, what in zip(b, a, ("loss", "grad x", "grad W")):
                _close(u, v, f"{name} {kw} {reduction} w={weights is not None} g={grads} {what}")
    assert len(count_fused) == 8         # the fused kernel did run


def test_fused_falls_back_where_it_does_not_apply(count_fused):
    x, y, w = _data()
    dense, fused = _pair("arcface", {}, "none")
    # reduction='none': a vector output, per-row grad_output unknown at forward
    xx = x.clone().requires_grad_(True)
    out = fused(xx, y)
    gout = torch.randn(B, generator=torch.Generator().manual_seed(1))
    out.backward(gout)
    xd = x.clone().requires_grad_(True)
    dense.weight.grad = None
    ref = dense(xd, y)
    ref.backward(gout)
    _close(out.detach(), ref.detach(), "none loss")
    _close(xx.grad, xd.grad, "none grad x")
    _close(fused.weight.grad, dense.weight.grad, "none grad W")
    assert not count_fused
    # a sample weight that needs its gradient
    dense.reduction = fused.reduction = "mean"
    ws = [w.clone().requires_grad_(True) for _ in range(2)]
    fused(x, y, sample_weight=ws[0]).backward()
    dense(x, y, sample_weight=ws[1]).backward()
    _close(ws[0].grad, ws[1].grad, "grad sample_weight")
    assert not count_fused
    # no gradient needed: just the loss
    with torch.no_grad():
        _close(fused(x, y), dense(x, y), "no_grad loss")
    assert not count_fused


def test_auto_picks_fused_for_scalar_losses(count_fused):
    m = losskit.get("arcface", num_classes=70_000, embedding_dim=4, head="auto")   # B * C > 2**22
    x = torch.randn(64, 4, requires_grad=True)
    y = torch.randint(0, 70_000, (64,))
    m(x, y).backward()
    assert len(count_fused) == 1
    m(x, y, reduction="none").sum().backward()
    assert len(count_fused) == 1          # 'none' -> chunked
    small = losskit.get("arcface", num_classes=50, embedding_dim=4, head="auto")
    small(x, y % 50).backward()
    assert len(count_fused) == 2          # small scalar losses too
    small(x, y % 50, reduction="none").sum().backward()
    with torch.no_grad():
        small(x, y % 50)
    assert len(count_fused) == 2          # 'none' and no_grad -> dense


def _kernel_args(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=dtype), dim=1)
    W = torch.randn(11, 4, generator=g, dtype=dtype)
    y = torch.tensor([0, 3, -1, 10, 3])
    coef = torch.rand(5, generator=g, dtype=dtype)
    return x, W, y, coef


@pytest.mark.parametrize("scale", [3.0, 90.0])
def test_fused_kernel_gradcheck_float64(scale):
    x, W, y, coef = _kernel_args(0)
    s = scale

    def target(c):                       # an ArcFace-like target with a non-trivial derivative
        return s * torch.cos(torch.acos(c.clamp(-0.999, 0.999)) + 0.3)

    def extra(xn):                       # a UNPG-like scalar depending on the embeddings
        return torch.logsumexp((xn @ xn.t()).flatten() * 0.5 * s / 3, 0)

    for ex in (None, extra):
        f = lambda a, b: fused_margin_ce(a, b, y, coef, s, target, ex, 2)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True), W.clone().requires_grad_(True)))


def test_auto_row_chunk():
    assert auto_row_chunk(1024, 100_000, 512) == 128
    assert auto_row_chunk(1024, 1000, 512) == 1024
    assert auto_row_chunk(7, 100_000, 512) == 7
    assert auto_row_chunk(4096, 10_000, 512) == 419
    with pytest.raises(ValueError, match="row_chunk"):
        fused_margin_ce(*_kernel_args(0)[:3], _kernel_args(0)[3], 3.0, lambda c: c, None, 0)
    with pytest.raises(ValueError, match="row_chunk_size"):
        losskit.heads.MarginHead(5, 3, losskit.heads.ArcMargin(), row_chunk_size=0)


def test_fused_bf16_autocast_scale64_no_nan():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 16, generator=g) * 30).requires_grad_(True)
    y = torch.randint(0, 300, (8,), generator=g)
    for name, kw in NAMES:
        m = losskit.get(name, num_classes=300, embedding_dim=16, head="fused", **kw)
        m.row_chunk_size = 3
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, y)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all() and torch.isfinite(m.weight.grad).all(), name
        if name == "arcface" and not kw:
            ref = m(x.detach(), y)
            assert abs(float(out.detach()) - float(ref.detach())) < 0.05 * float(ref.detach())
    xh = x.detach().to(torch.bfloat16).requires_grad_(True)
    m = losskit.get("arcface", num_classes=300, embedding_dim=16, head="fused")
    out = m(xh, y)
    out.backward()
    assert torch.isfinite(out) and xh.grad.dtype == torch.bfloat16 and torch.isfinite(xh.grad.float()).all()


def _fused_matches_dense_on(name, W, x, y, rows, **kw):
    """Loss, grad x and grad W of the fused head equal the dense head's for weights W."""
    res = []
    for h in ("dense", "fused"):
        m = losskit.get(name, num_classes=W.shape[0], embedding_dim=W.shape[1], head=h, **kw)
        m.row_chunk_size = rows
        m.weight.data.copy_(W)
        xx = x.clone().requires_grad_(True)
        out = m(xx, y)
        out.backward()
        res.append((out.detach(), xx.grad, m.weight.grad))
    for u, v in zip(*res):
        assert torch.isfinite(u).all()
        _close(u, v, name)


def test_fused_underflow_rows_and_huge_logits():
    # every non-target cosine near -1: exp(64 cos - 64) underflows -> row-maximum reference
    W = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.05], [-1.0, -0.05]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    for name in ("cosface", "cfcd", "arcface"):
        _fused_matches_dense_on(name, W, x, y, rows=2)
    m = losskit.get("cosface", num_classes=50, embedding_dim=50, scale=64.0, margin=0.0, head="fused")
    with torch.no_grad():
        m.weight.copy_(torch.eye(50) * 1e3)
    xx = (torch.eye(50)[:10] * 1e4).requires_grad_(True)
    out = m(xx, torch.arange(10))
    out.backward()
    assert torch.isfinite(out) and float(out.detach()) < 1e-20 and torch.isfinite(xx.grad).all()


def test_fused_empty_one_class_all_ignored():
    m = losskit.get("arcface", num_classes=5, embedding_dim=3, head="fused")
    x = torch.randn(0, 3, requires_grad=True)
    out = m(x, torch.zeros(0, dtype=torch.long))
    out.backward()
    assert out.item() == 0.0
    one = losskit.get("cfcd", num_classes=1, embedding_dim=3, head="fused")
    x1 = torch.randn(4, 3, requires_grad=True)
    out = one(x1, torch.zeros(4, dtype=torch.long))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(x1.grad).all()
    for name in ("arcface", "unpg", "cfcd"):
        mm = losskit.get(name, num_classes=5, embedding_dim=3, head="fused")
        x2 = torch.randn(3, 3, requires_grad=True)
        out = mm(x2, torch.full((3,), -1))
        out.backward()
        assert out.item() == 0.0 and torch.isfinite(x2.grad).all() and float(x2.grad.abs().max()) == 0.0


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.biggest, self.gemm_flops = (0, ""), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.biggest[0]:
                self.biggest = (t.numel(), str(func))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.out,
                    torch.ops.aten.addmm_.default):
            a, b = (args[0], args[1]) if "addmm" not in str(func) else (args[1], args[2])
            self.gemm_flops += a.shape[0] * a.shape[1] * b.shape[1]
        return out


def test_fused_never_materialises_batch_by_class_and_does_three_gemms():
    Bq, Cq, Dq = 16, 1001, 4          # C x (D + 1) = 5005 < B x C / 2 = 8008
    for name, kw in NAMES:
        # chunk_size: class chunks of CFCD's no-grad statistics pass (the chunked kernel)
        m = losskit.get(name, num_classes=Cq, embedding_dim=Dq, head="fused", chunk_size=100, **kw)
        m.row_chunk_size = 2
        x = torch.randn(Bq, Dq, requires_grad=True)
        y = torch.randint(0, Cq, (Bq,))
        with _Recorder() as rec:
            m(x, y).backward()
        assert rec.biggest[0] < Bq * Cq // 2, (name, rec.biggest)
    # GEMM work in multiples of B*C*D (D + 1 for the forward's extra column)
    Bq, Cq, Dq = 64, 4000, 64
    x = torch.randn(Bq, Dq, requires_grad=True)
    y = torch.randint(0, Cq, (Bq,))
    ratios = {}
    for head in ("fused", "chunked", "dense"):
        m = losskit.get("arcface", num_classes=Cq, embedding_dim=Dq, head=head, chunk_size=1000)
        m.row_chunk_size = 16
        with _Recorder() as rec:
            m(x, y).backward()
        ratios[head] = rec.gemm_flops / (Bq * Cq * Dq)
    assert 2.9 < ratios["fused"] < 3.1, ratios
    assert 3.9 < ratios["chunked"] < 4.1, ratios       # the check does see the recomputation
    assert rec.biggest[0] >= Bq * Cq                    # and a B x C tensor when one exists (dense)


def test_weight_grad_takes_the_stored_gradient_without_copy(monkeypatch):
    ptrs = []
    orig = fused_mod.FusedMarginCE.backward

    def backward(ctx, g):
        out = orig(ctx, g)
        ptrs.append(out[1].data_ptr())
        return out

    monkeypatch.setattr(fused_mod.FusedMarginCE, "backward", staticmethod(backward))
    m = losskit.get("arcface", num_classes=300, embedding_dim=16, head="fused")
    x = torch.randn(8, 16, requires_grad=True)
    y = torch.randint(0, 300, (8,))
    m(x, y).backward()
    assert m.weight.grad.data_ptr() == ptrs[-1]          # stolen, not copied
    m.weight.grad = None
    out = m(x, y)
    out.backward(retain_graph=True)
    assert m.weight.grad.data_ptr() != ptrs[-1]          # copied: the graph still holds it
    g1 = m.weight.grad.clone()
    out.backward()
    torch.testing.assert_close(m.weight.grad, 2 * g1)


def test_fused_frozen_weight_or_fixed_embeddings(count_fused):
    x, y, w = _data()
    dense, fused = _pair("cosface", {}, "sum")
    for m in (dense, fused):
        m.weight.requires_grad_(False)
    gx = []
    for m in (dense, fused):
        xx = x.clone().requires_grad_(True)
        m(xx, y, sample_weight=w).backward()
        gx.append(xx.grad)
    _close(gx[1], gx[0], "grad x, frozen weight")
    gw = []
    for m in (dense, fused):
        m.weight.requires_grad_(True)
        m.weight.grad = None
        m(x, y).backward()
        gw.append(m.weight.grad)
    _close(gw[1], gw[0], "grad W, fixed embeddings")
    assert len(count_fused) == 2


@pytest.mark.parametrize("tile", [1, 4, 97])
def test_fused_class_tiles_equal_dense(tile, monkeypatch, count_fused):
    """The fixed-reference path works in class tiles: many small tiles, a last partial tile,
    targets in different tiles, repeated classes and ignored rows give the dense numbers."""
    monkeypatch.setattr(fused_mod, "_TILE", tile)
    x, y, w = _data(seed=5)
    for name, kw in [("arcface", {}), ("cosface", {}), ("unpg", {"whisker": 1.0}), ("elastic-arcface", {"plus": True})]:
        dense, fused = _pair(name, kw, "mean")
        for weights in (None, w):
            a = _run(dense, x, y, weights)
            b = _run(fused, x, y, weights)
            for u, v, what in zip(b, a, ("loss", "grad x", "grad W")):
                _close(u, v, f"tile {tile} {name} w={weights is not None} {what}")
    assert len(count_fused) == 8


def test_fused_uses_the_threaded_tile_with_several_threads(monkeypatch):
    """With more than one torch thread the tiles are ``_TILE_THREADED`` classes (fewer parallel
    regions); shrunk here so that several tiles are used, the numbers are still dense's."""
    monkeypatch.setattr(fused_mod, "_TILE", 10 ** 6)          # the one-thread tile would be one tile
    monkeypatch.setattr(fused_mod, "_TILE_THREADED", 3)
    seen = []
    orig = fused_mod._tiled_block

    def spy(*a, **k):
        seen.append(a[8])                                       # T
        return orig(*a, **k)

    monkeypatch.setattr(fused_mod, "_tiled_block", spy)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, y, w = _data(seed=6)
        dense, fused = _pair("arcface", {}, "mean")
        for u, v, what in zip(_run(fused, x, y, w), _run(dense, x, y, w), ("loss", "grad x", "grad W")):
            _close(u, v, f"threaded tile {what}")
    finally:
        torch.set_num_threads(n)
    assert seen and set(seen) == {3}


@pytest.mark.parametrize("tile", [1, 2, 3])
def test_fused_underflow_rows_across_tiles(tile, monkeypatch):
    """Rows whose every non-target logit underflows under the fixed reference are redone with
    their own maximum; their tiles, row sums and input gradients are all replaced."""
    monkeypatch.setattr(fused_mod, "_TILE", tile)
    redone = []
    orig_block = fused_mod._block

    def block(*a, **k):
        if a[6] is None:                # ref2=None: the row-maximum recomputation
            redone.append(a[0].shape[0])
        return orig_block(*a, **k)

    monkeypatch.setattr(fused_mod, "_block", block)
    W = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.05], [-1.0, -0.05], [-0.6, -0.8]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-0.6, -0.8]])
    y = torch.tensor([0, 1, 0, 4])
    for name in ("cosface", "arcface"):
        _fused_matches_dense_on(name, W, x, y, rows=3)
    assert sum(redone) == 2                 # row 0 of the first block, once per loss


@pytest.mark.parametrize("tile", [1, 512])
def test_fused_unpg_with_an_underflowing_row(tile, monkeypatch):
    """Regression: the underflow recomputation looped ``for a, e, pt in pieces`` and overwrote
    UNPG's extra term ``e`` (AttributeError in the forward, which computes the gradients).
    Row 1 has every cosine (and every in-batch negative) near 0 at s = 64: its fixed-reference sum
    underflows and is redone; loss and gradients still equal dense."""
    monkeypatch.setattr(fused_mod, "_TILE", tile)
    redone = []
    orig_block = fused_mod._block

    def block(*a, **k):
        if a[6] is None:
            redone.append(a[0].shape[0])
        return orig_block(*a, **k)

    monkeypatch.setattr(fused_mod, "_block", block)
    W = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.05], [-1.0, -0.05]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    for kw in ({"whisker": 1.0}, {"base": "cosface", "whisker": 0.5}):
        _fused_matches_dense_on("unpg", W, x, y, 2, **kw)
    assert sum(redone) >= 2          # the underflow path ran (once per configuration)
