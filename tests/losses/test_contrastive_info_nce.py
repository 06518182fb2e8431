"""InfoNCE (CLIP) against a naive reference written from the paper's equations,
the chunked kernel against dense, the learnable logit scale, open_clip's
ClipLoss (when installed), and bad input."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import losskit
from losskit.functional.contrastive import cement_margins, hard_negative_share, info_nce_loss
from losskit.kernels.info_nce import pair_lse


def _data(b=9, d=5, h=0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, d, generator=g, dtype=dtype)
    bb = torch.randn(b, d, generator=g, dtype=dtype)
    hn = torch.randn(b, h, d, generator=g, dtype=dtype) if h else None
    return a, bb, hn


def _naive(a, b, s, symmetric=True, hard=None, margins=None):
    """CLIP's pseudocode (Figure 3) row by row: cross-entropy of row i of
    s * <a_i, b_j> against column i, and of column i against row i; hard
    negatives (with margins) extend row i of the a -> b side."""
    unit = lambda x: [v / math.sqrt(sum(w * w for w in x)) for v in x]  # noqa: E731
    a = [unit(x) for x in a.tolist()]
    b = [unit(x) for x in b.tolist()]
    dot = lambda x, y: sum(u * v for u, v in zip(x, y))  # noqa: E731
    n = len(a)
    out = []
    for i in range(n):
        logits = [s * dot(a[i], b[j]) for j in range(n)]
        if hard is not None:
            for k, hk in enumerate(hard[i].tolist()):
                hk = [v / math.sqrt(sum(w * w for w in hk)) for v in hk]
                logits.append(s * dot(a[i], hk) + (0.0 if margins is None else float(margins[i, k])))
        l_ab = -logits[i] + math.log(sum(math.exp(z) for z in logits))
        if not symmetric:
            out.append(l_ab)
            continue
        col = [s * dot(a[j], b[i]) for j in range(n)]
        l_ba = -col[i] + math.log(sum(math.exp(z) for z in col))
        out.append(0.5 * (l_ab + l_ba))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("chunk", [None, 1, 4, 100])
def test_matches_the_naive_reference(symmetric, chunk):
    a, b, _ = _data()
    got = info_nce_loss(a, b, 1 / 0.07, symmetric=symmetric, chunk_size=chunk, reduction="none")
    torch.testing.assert_close(got, _naive(a, b, 1 / 0.07, symmetric), rtol=1e-10, atol=1e-10)
    mean = info_nce_loss(a, b, 1 / 0.07, symmetric=symmetric, chunk_size=chunk)
    torch.testing.assert_close(mean, _naive(a, b, 1 / 0.07, symmetric).mean(), rtol=1e-10, atol=1e-10)


def test_matches_the_cross_entropy_form_of_clip():
    a, b, _ = _data(b=7)
    an, bn = F.normalize(a, dim=1), F.normalize(b, dim=1)
    logits = an @ bn.t() / 0.07
    y = torch.arange(7)
    want = (F.cross_entropy(logits, y) + F.cross_entropy(logits.t(), y)) / 2
    torch.testing.assert_close(info_nce_loss(a, b, 1 / 0.07), want)


def test_hard_negatives_and_margins_match_the_reference():
    a, b, h = _data(h=3)
    m = torch.rand(9, 3, dtype=torch.float64)
    for chunk in (None, 2):
        got = info_nce_loss(a, b, 5.0, hard_negatives=h, hard_margins=m, chunk_size=chunk, reduction="none")
        torch.testing.assert_close(got, _naive(a, b, 5.0, True, h, m), rtol=1e-10, atol=1e-10)
    got = info_nce_loss(a, b, 5.0, hard_negatives=h, symmetric=False, reduction="none")
    torch.testing.assert_close(got, _naive(a, b, 5.0, False, h), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_dense_values_and_gradients(symmetric, dtype):
    a0, b0, _ = _data(b=37, d=16, dtype=dtype)
    w = torch.rand(37, dtype=dtype)
    res = {}
    for chunk in (None, 1, 5, 37, 64):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        t = torch.tensor(math.log(1 / 0.07), dtype=dtype, requires_grad=True)
        out = info_nce_loss(a, b, t.exp(), symmetric=symmetric, chunk_size=chunk, sample_weight=w)
        out.backward()
        res[chunk] = (out.detach(), a.grad, b.grad, t.grad)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)
    for chunk, r in res.items():
        for x, y in zip(r, res[None]):
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"chunk {chunk}: {m}")


def test_kernel_gradcheck_rows_columns_and_scale():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    wr = torch.randn(6, generator=g, dtype=torch.float64)
    wc = torch.randn(5, generator=g, dtype=torch.float64)

    def f(q, k, s):
        r, c = pair_lse(q, k, s, chunk=4, cols=True)
        return (r * wr).sum() + (c * wc).sum()

    assert torch.autograd.gradcheck(f, (q, k, s))
    assert torch.autograd.gradcheck(lambda q, k, s: pair_lse(q, k, s, chunk=2, cols=False)[0], (q, k, s))
    z = 1.7 * q.detach() @ k.detach().t()
    r, c = pair_lse(q.detach(), k.detach(), 1.7, chunk=4)
    torch.testing.assert_close(r, torch.logsumexp(z, 1))
    torch.testing.assert_close(c, torch.logsumexp(z, 0))


def test_large_scale_logits_do_not_overflow():
    a, b, _ = _data(b=12, d=3)
    out = info_nce_loss(a, b, 1e4, chunk_size=5, reduction="none")
    torch.testing.assert_close(out, info_nce_loss(a, b, 1e4, reduction="none"))
    assert bool(torch.isfinite(out).all())


def test_chunked_never_allocates_the_full_matrix():
    """The largest single allocation of a chunked forward+backward is a block, not B x B."""
    from torch.profiler import ProfilerActivity, profile

    B, D, chunk = 2048, 8, 64
    a = torch.randn(B, D, requires_grad=True)
    b = torch.randn(B, D, requires_grad=True)
    for chunk_size, must_be_small in ((chunk, True), (None, False)):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            info_nce_loss(a, b, 10.0, chunk_size=chunk_size).backward()
        biggest = max(e.self_cpu_memory_usage for e in prof.events())
        full = B * B * 4
        if must_be_small:
            assert biggest <= 2 * chunk * B * 4 + 8 * B * D * 4, f"chunked: an allocation of {biggest} bytes"
        else:
            assert biggest >= full, "the dense check must see the B x B matrix (else this test cannot fail)"


def test_learnable_logit_scale_init_clip_and_gradient():
    loss = losskit.get("info-nce")
    assert loss.learnable and math.isclose(float(loss.logit_scale), math.log(1 / 0.07), rel_tol=1e-6)
    a, b, _ = _data(dtype=torch.float32)
    loss(a, b).backward()
    assert loss.logit_scale.grad is not None and float(loss.logit_scale.grad) != 0.0
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(1000.0))
    loss.logit_scale.grad = None
    out = loss(a, b)
    out.backward()
    assert math.isclose(float(loss.scale()), 100.0, rel_tol=1e-5), "the scale is clipped at max_scale = 100"
    assert float(loss.logit_scale.grad) == 0.0
    torch.testing.assert_close(out, info_nce_loss(a, b, 100.0))
    fixed = losskit.get("info-nce", learnable=False, temperature=0.05)
    assert not list(fixed.parameters())
    torch.testing.assert_close(fixed(a, b), info_nce_loss(a, b, 20.0))


def _open_clip_loss_module():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    # loss.py alone (the package's __init__ imports torchvision and timm)
    mspec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


def test_agrees_with_open_clip_clip_loss():
    mod = _open_clip_loss_module()
    a, b, _ = _data(b=16, d=8)
    an, bn = F.normalize(a, dim=1).requires_grad_(), F.normalize(b, dim=1).requires_grad_()
    s = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    want = mod.ClipLoss()(an, bn, s)
    want.backward()
    grads = (an.grad, bn.grad, s.grad)
    for chunk in (None, 3):
        an2, bn2 = an.detach().clone().requires_grad_(), bn.detach().clone().requires_grad_()
        s2 = s.detach().clone().requires_grad_()
        got = info_nce_loss(an2, bn2, s2, normalize=False, chunk_size=chunk)
        got.backward()
        torch.testing.assert_close(got, want.detach())
        for x, y in zip((an2.grad, bn2.grad, s2.grad), grads):
            torch.testing.assert_close(x, y)


def test_bad_input_is_a_clear_error():
    a, b, h = _data(h=2)
    with pytest.raises(ValueError, match="b: expected 9 rows"):
        info_nce_loss(a, b[:5])
    with pytest.raises(ValueError, match="b: expected dimension 5"):
        info_nce_loss(a, b[:, :3])
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="scale"):
            info_nce_loss(a, b, bad)
    with pytest.raises(ValueError, match="scale"):
        info_nce_loss(a, b, torch.tensor(-2.0))
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="temperature"):
            losskit.get("info-nce", temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        losskit.get("info-nce", temperature=0.001)  # 1 / T = 1000 > max_scale
    with pytest.raises(ValueError, match="hard_negatives"):
        info_nce_loss(a, b, hard_negatives=h[:, :, :2])
    with pytest.raises(ValueError, match="hard_margins"):
        info_nce_loss(a, b, hard_negatives=h, hard_margins=torch.zeros(9, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_size"):
        losskit.get("info-nce", chunk_size=0)
    with pytest.raises(TypeError, match="a: expected a torch.Tensor"):
        info_nce_loss(a.tolist(), b)


def test_cement_margins_and_gradient_share():
    a, b, h = _data(b=6, h=2)
    c = torch.tensor([[1.0, 5.0]] * 6, dtype=torch.float64)
    m = cement_margins(c, 0.5)
    torch.testing.assert_close(m, torch.tensor([[0.0, 0.5]] * 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"concreteness: expected scores on the norms' scale \[1, 5\], got 6"):
        cement_margins(c + 1, 0.5)
    with pytest.raises(ValueError, match="concreteness"):
        cement_margins(c - 0.5, 0.5)
    cement = losskit.get("cement", gamma=0.5, learnable=False).double()
    torch.testing.assert_close(cement(a, b, h, c, ), info_nce_loss(a, b, 1 / 0.07, hard_negatives=h, hard_margins=m))
    # the share: p_h / (1 - p_i) from the softmax over the batch's captions and the row's hard negatives
    share = hard_negative_share(a, b, h, 3.0, hard_margins=m)
    an, bn, hn = F.normalize(a, dim=1), F.normalize(b, dim=1), F.normalize(h, dim=2)
    for i in range(6):
        z = [3.0 * float(an[i] @ bn[j]) for j in range(6)] + \
            [3.0 * float(an[i] @ hn[i, k]) + float(m[i, k]) for k in range(2)]
        e = [math.exp(v) for v in z]
        p = [v / sum(e) for v in e]
        for k in range(2):
            assert math.isclose(float(share[i, k]), p[6 + k] / (1 - p[i]), rel_tol=1e-9)
    # the share of a hard negative shrinks as the batch (the number of negatives) grows
    a2, b2, h2 = _data(b=200, h=1, seed=4)
    small = hard_negative_share(a2[:8], b2[:8], h2[:8], 3.0).mean()
    large = hard_negative_share(a2, b2, h2, 3.0)[:8].mean()
    assert float(large) < float(small)
    # and the gradient on the hard negative's logit is p_h: autograd agrees with the share times (1 - p_i)
    zc = torch.cat([an @ bn.t() * 3.0, torch.einsum("bd,bhd->bh", an, hn) * 3.0 + m], 1).requires_grad_()
    F.cross_entropy(zc, torch.arange(6), reduction="sum").backward()
    p = torch.softmax(zc.detach(), 1)
    torch.testing.assert_close(zc.grad[:, 6:], share * (1 - p[torch.arange(6), torch.arange(6)])[:, None])


def _assert_paths_agree(q0, k0, scale, wr, wc, *, chunk, cols, paths):
    """pair_lse's row/column log-sum-exps and every gradient are equal on the given ``bounded`` paths."""
    res = []
    for bounded in paths:
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
        r, c = pair_lse(q, k, s, chunk=chunk, cols=cols, bounded=bounded)
        ((r * wr).sum() + (c * wc).sum()).backward()
        res.append((r.detach(), c.detach(), q.grad, k.grad, s.grad))
    for x, y in zip(*res):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cols", [True, False])
def test_logit_bound_path_equals_the_online_path(cols):
    """Normalised inputs and a small scale take one exp2 per similarity against the fixed
    reference s; the result and gradients equal the online-maximum path."""
    g = torch.Generator().manual_seed(7)
    q0 = F.normalize(torch.randn(11, 4, generator=g, dtype=torch.float64), dim=1)
    k0 = F.normalize(torch.randn(9, 4, generator=g, dtype=torch.float64), dim=1)
    wr = torch.randn(11, generator=g, dtype=torch.float64)
    wc = torch.randn(9, generator=g, dtype=torch.float64)
    _assert_paths_agree(q0, k0, 30.0, wr, wc, chunk=4, cols=cols, paths=(True, False))

    def f(q, k, s):
        r, c = pair_lse(q, k, s, chunk=4, cols=cols, bounded=True)
        return (r * wr).sum() + (c * wc).sum()

    qq = q0.clone().requires_grad_()
    kk = k0.clone().requires_grad_()
    # gradcheck perturbs q and k off the unit sphere by 1e-6: |z| <= s still holds to first order
    assert torch.autograd.gradcheck(f, (qq, kk, torch.tensor(3.0, dtype=torch.float64, requires_grad=True)))


def test_measured_reference_for_unnormalised_inputs():
    """``bounded=None`` measures ``ref = s max|q| max|k|``: bounded unnormalised inputs take the
    one-exp2 path and agree with the online path; large norms or scales fall back to it."""
    from losskit.kernels.info_nce import logit_bound

    g = torch.Generator().manual_seed(11)
    q0 = torch.randn(10, 5, generator=g, dtype=torch.float64) * 0.3
    k0 = torch.randn(7, 5, generator=g, dtype=torch.float64) * 0.3
    ref = logit_bound(q0, k0, 5.0, None)
    want = 5.0 * float(q0.norm(dim=1).max() * k0.norm(dim=1).max())
    assert ref is not None and math.isclose(ref, want, rel_tol=1e-12)
    assert logit_bound(q0, k0, 5.0, False) is None and logit_bound(q0, k0, 5.0, True) == 5.0
    assert logit_bound(q0.float() * 100, k0.float(), 5.0, None) is None      # 2 ref above float32's 80
    assert logit_bound(q0.float(), k0.float(), 50.0, True) is None           # 2 s above 80
    with losskit.tensor_checks(False):
        assert logit_bound(q0, k0, torch.tensor(5.0), None) is None           # no host read
    wr = torch.randn(10, generator=g, dtype=torch.float64)
    wc = torch.randn(7, generator=g, dtype=torch.float64)
    _assert_paths_agree(q0, k0, 5.0, wr, wc, chunk=3, cols=True, paths=(None, False))
    a, b = q0.float(), k0[:7].float().repeat(2, 1)[:10]
    torch.testing.assert_close(info_nce_loss(a, b, 5.0, normalize=False, chunk_size=4, reduction="none"),
                               info_nce_loss(a.double(), b.double(), 5.0, normalize=False, reduction="none").float())


def test_unit_rows_equals_f_normalize_and_non_finite_rows_are_refused():
    from losskit.kernels.info_nce import unit_rows

    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    x[2] = 0.0
    x[4] *= 1e-14                      # below eps: the clamped branch
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, n = unit_rows(x1, 1e-12)
    want = F.normalize(x2, dim=1, eps=1e-12)
    torch.testing.assert_close(y, want, rtol=1e-15, atol=0)
    torch.testing.assert_close(n, x.norm(dim=1))
    (y * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: unit_rows(t, 1e-12)[0], (torch.randn(5, 3, generator=g, dtype=torch.float64,
                                                                                 requires_grad=True),))
    a, b, _ = _data()
    for name, bad in (("a", a.clone()), ("b", b.clone())):
        bad[3, 1] = math.nan
        args = (bad, b) if name == "a" else (a, bad)
        with pytest.raises(ValueError, match=f"{name}: expected finite values, got nan at index"):
            info_nce_loss(*args)
        bad[3, 1] = math.inf
        with pytest.raises(ValueError, match=f"{name}: expected finite values, got inf"):
            info_nce_loss(*args, normalize=False)
    big = a.float() * 1e30                 # finite values whose norm overflows float32: no error
    assert bool(torch.isfinite(info_nce_loss(big, b.float())).all())
