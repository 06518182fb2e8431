"""The head implementations give the same numbers: chunked == dense in loss
and gradients for every reduction and with sample weights, with tensor checks
on (buffered fixed-reference path) and off (the no-host-sync path: online
log-sum-exp, out-of-place ops); sampled (Partial FC) selection; mixed
precision; edge cases."""

import pytest
import torch

import losskit


from losskit.heads import select_sampled_classes
from losskit.kernels.chunked_lse import nontarget_lse

B, C, D, CHUNK = 7, 1003, 32, 128

NAMES = [("arcface", {}), ("cosface", {}), ("normalized-softmax", {}), ("combined-margin", {}),
         ("elastic-arcface", {"plus": True}), ("elastic-cosface", {}), ("cfcd", {"alpha": 0.1}),
         ("unpg", {"whisker": 1.0})]


def _pair(name, kw, reduction, dtype=torch.float32):
    dense = losskit.get(name, num_classes=C, embedding_dim=D, head="dense", reduction=reduction, **kw).to(dtype)
    chunk = losskit.get(name, num_classes=C, embedding_dim=D, head="chunked", chunk_size=CHUNK,
                        reduction=reduction, **kw).to(dtype)
    torch.nn.init.normal_(dense.weight, generator=torch.Generator().manual_seed(0))
    chunk.weight.data.copy_(dense.weight.data)
    return dense, chunk


def _run(m, x, y, w, seed=7):
    x = x.clone().requires_grad_(True)
    m.weight.grad = None
    torch.manual_seed(seed)
    out = m(x, y, sample_weight=w)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) if out.dim() else torch.tensor(1.0)
    (out * g).sum().backward()
    return out.detach(), x.grad, m.weight.grad.clone()


def _close(a, b, what):
    # 1e-5 relative to the largest entry (fp32)
    scale = max(float(b.abs().max()), 1e-6)
    assert float((a - b).abs().max()) <= 1e-5 * scale + 1e-7, f"{what}: {float((a - b).abs().max())} vs {scale}"


NOSYNC_NAMES = [n for n in NAMES if n[0] not in ("cfcd", "unpg")]   # data-dependent by design


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("checks", [True, False], ids=["checks-on", "checks-off"])
@pytest.mark.parametrize("name,kw", NAMES)
def test_chunked_equals_dense(name, kw, reduction, checks):
    """Checks off runs the no-sync path (online log-sum-exp), checks on the fixed-reference one."""
    if not checks and (name, kw) not in NOSYNC_NAMES:
        pytest.skip(f"{name}: data-dependent by design, no no-sync path")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    y[0] = y[4]          # a repeated class
    y[2] = -1            # an ignored row
    y[5] = C - 1         # the last, partial chunk
    w = torch.rand(B, generator=g)
    dense, chunk = _pair(name, kw, reduction)
    for weights in (None, w):
        a = _run(dense, x, y, weights)
        with losskit.tensor_checks(checks):
            b = _run(chunk, x, y, weights)
        for u, v, what in zip(b, a, ("loss", "grad x", "grad W")):
            _close(u, v, f"checks {'on' if checks else 'off'}: {name} {reduction} w={weights is not None} {what}")


def test_chunk_kernel_no_sync_path_is_taken_and_gradchecks(monkeypatch):
    from losskit.kernels import chunked_lse as K
    calls = []
    for fn in ("_forward_nosync", "_backward_nosync"):
        orig = getattr(K, fn)
        monkeypatch.setattr(K, fn, lambda *a, _o=orig, _n=fn, **k: (calls.append(_n), _o(*a, **k))[1])
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    W = torch.randn(11, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, -1, 10, 3])
    with losskit.tensor_checks(False):
        assert torch.autograd.gradcheck(lambda a, b: nontarget_lse(a, b, y, 3.0, 4),
                                        (x.requires_grad_(True), W.requires_grad_(True)))
        assert torch.autograd.gradcheck(lambda a, b: nontarget_lse(a, b, y, 3.0, 4, return_target=True)[1].sum()
                                        + nontarget_lse(a, b, y, 3.0, 4).square().sum(), (x, W))
    assert "_forward_nosync" in calls and "_backward_nosync" in calls


def test_chunk_kernel_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    W = torch.randn(11, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, -1, 10, 3])
    assert torch.autograd.gradcheck(lambda a, b: nontarget_lse(a, b, y, 3.0, 4),
                                    (x.requires_grad_(True), W.requires_grad_(True)))


def test_sampled_rate_one_equals_dense_and_selection():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    dense, _ = _pair("arcface", {}, "mean")
    samp = losskit.get("arcface", num_classes=C, embedding_dim=D, head="sampled", sample_rate=1.0)
    samp.weight.data.copy_(dense.weight.data)
    for u, v in zip(_run(samp, x, y, None), _run(dense, x, y, None)):
        _close(u, v, "sampled rate 1")
    idx = select_sampled_classes(y, C, 0.1, torch.Generator().manual_seed(0))
    assert idx.numel() == 101 and bool((idx[1:] > idx[:-1]).all())
    assert set(y.tolist()) <= set(idx.tolist())
    # all positives are kept even when they exceed the rate
    yy = torch.arange(50)
    assert select_sampled_classes(yy, C, 0.01).tolist() == list(range(50))
    # gradient only reaches the sampled rows
    samp2 = losskit.get("arcface", num_classes=C, embedding_dim=D, head="sampled", sample_rate=0.05)
    samp2(x, y).backward()
    assert int((samp2.weight.grad.abs().sum(1) > 0).sum()) == 51


@pytest.mark.parametrize("head", ["dense", "chunked"])
def test_scale64_under_bf16_autocast_and_fp16(head):
    g = torch.Generator().manual_seed(0)
    m = losskit.get("arcface", num_classes=300, embedding_dim=16, scale=64.0, head=head, chunk_size=64)
    x = (torch.randn(8, 16, generator=g) * 30).requires_grad_(True)
    y = torch.randint(0, 300, (8,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all() and torch.isfinite(m.weight.grad).all()
    ref = m(x.detach(), y)
    assert abs(float(out.detach()) - float(ref.detach())) < 0.05 * float(ref.detach())
    for dt in (torch.float16, torch.bfloat16):
        xh = x.detach().to(dt).requires_grad_(True)
        out = m(xh, y)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(xh.grad.float()).all()
    for name, kw in NAMES:
        mm = losskit.get(name, num_classes=300, embedding_dim=16, head=head, chunk_size=64, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(mm(x.detach(), y)), name


@pytest.mark.parametrize("head", ["dense", "chunked", "sampled"])
def test_empty_batch_one_class_and_all_ignored(head):
    m = losskit.get("arcface", num_classes=5, embedding_dim=3, head=head)
    x = torch.randn(0, 3, requires_grad=True)
    out = m(x, torch.zeros(0, dtype=torch.long))
    assert out.item() == 0.0
    out.backward()
    assert m(x, torch.zeros(0, dtype=torch.long), reduction="none").shape == (0,)
    one = losskit.get("cfcd", num_classes=1, embedding_dim=3, head=head)
    x1 = torch.randn(4, 3, requires_grad=True)
    out = one(x1, torch.zeros(4, dtype=torch.long))
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(x1.grad).all()
    for name in ("arcface", "unpg", "cfcd"):
        mm = losskit.get(name, num_classes=5, embedding_dim=3, head=head)
        x2 = torch.randn(3, 3, requires_grad=True)
        out = mm(x2, torch.full((3,), -1))
        assert out.item() == 0.0
        out.backward()
        assert torch.isfinite(x2.grad).all()


def test_huge_logits_do_not_overflow():
    # all samples exactly on their centres: s * cos = 64 for the target
    m = losskit.get("cosface", num_classes=50, embedding_dim=50, scale=64.0, margin=0.0, head="chunked",
                    chunk_size=7)
    with torch.no_grad():
        m.weight.copy_(torch.eye(50) * 1e3)
    x = torch.eye(50)[:10] * 1e4
    out = m(x, torch.arange(10))
    assert torch.isfinite(out) and float(out.detach()) < 1e-20


@pytest.mark.parametrize("checks", [True, False])
def test_chunked_underflow_rows_fall_back_to_online_max(checks):
    # every non-target cosine near -1: exp(64 cos - 64) underflows in fp32; with checks on those rows
    # are recomputed with their own maximum, with checks off the online maximum covers every row
    W = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.05], [-1.0, -0.05]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    for name in ("cosface", "arcface") + (("cfcd",) if checks else ()):
        ms = [losskit.get(name, num_classes=4, embedding_dim=2, head=h, chunk_size=2) for h in ("dense", "chunked")]
        res = []
        for m in ms:
            m.weight.data.copy_(W)
            xx = x.clone().requires_grad_(True)
            with losskit.tensor_checks(checks if m.head == "chunked" else True):
                out = m(xx, y)
                out.backward()
            res.append((out.detach(), xx.grad, m.weight.grad))
        for u, v in zip(*res):
            assert torch.isfinite(u).all()
            _close(u, v, name)


def test_chunked_never_materialises_batch_by_class():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.biggest = (0, "")

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.numel() > self.biggest[0]:
                    self.biggest = (t.numel(), str(func))
            return out

    Bq, Cq, Dq = 16, 1001, 4          # C x D = 4004 < B x C = 16016
    for name, kw in NAMES:
        m = losskit.get(name, num_classes=Cq, embedding_dim=Dq, head="chunked", chunk_size=100, **kw)
        x = torch.randn(Bq, Dq, requires_grad=True)
        y = torch.randint(0, Cq, (Bq,))
        with Largest() as mode:
            m(x, y).backward()
        assert mode.biggest[0] < Bq * Cq // 2, (name, mode.biggest)
    dense = losskit.get("arcface", num_classes=Cq, embedding_dim=Dq, head="dense")
    with Largest() as mode:
        dense(x, y).backward()
    assert mode.biggest[0] >= Bq * Cq      # the check does see a B x C tensor when one exists


def test_fp16_autocast_cpu():
    m = losskit.get("arcface", num_classes=50, embedding_dim=8, head="chunked", chunk_size=16)
    x = (torch.randn(6, 8) * 100).requires_grad_(True)
    y = torch.randint(0, 50, (6,))
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = m(x, y)
    except RuntimeError as e:  # pragma: no cover - depends on the CPU build
        pytest.skip(f"fp16 autocast unsupported on this CPU build: {e}")
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
