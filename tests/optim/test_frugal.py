"""FRUGAL: exact equalities with AdamW and SGD, a naive reference written from
the paper's update, subspace renewal, state round trips, measured state bytes,
the parameter split and bad input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import losskit
from losskit.optim import FRUGAL, adamw_state_bytes, frugal_param_groups, frugal_state_bytes, optimizer_state_bytes
from losskit.optim.projections import PROJECTIONS

PROJ = list(PROJECTIONS)


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 9), nn.Tanh(),
                         nn.Linear(9, 3)).to(dtype)


def _data(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def _train(model, opt, steps, seed=0):
    for t in range(steps):
        x, y = _data(seed + t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("projection", PROJ)
def test_rho_one_is_adamw_step_for_step(projection):
    """rho = 1: every projectable weight's subspace is the whole space, so FRUGAL
    is AdamW, bit for bit, across subspace renewals (update_gap 3, 10 steps)."""
    a, b = _mlp(), _mlp()
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    ob = FRUGAL(frugal_param_groups(b, output_head=None), lr=1e-2, weight_decay=0.1, rho=1.0,
                projection=projection, update_gap=3)
    for t in range(10):
        _train(a, oa, 1, seed=t)
        _train(b, ob, 1, seed=t)
        assert _equal(a, b), f"step {t}"


@pytest.mark.parametrize("projection", PROJ)
def test_rho_zero_with_sgd_residual_is_sgd(projection):
    """rho = 0 with SGD on the residual: the whole gradient is residual; with
    only projectable weights that is plain SGD, bit for bit."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False))
    b = copy.deepcopy(a)
    oa = torch.optim.SGD(a.parameters(), lr=0.05)
    ob = FRUGAL(b.parameters(), lr=0.05, rho=0.0, residual="sgd", weight_decay=0.0, projection=projection,
                update_gap=3)
    for t in range(8):
        _train(a, oa, 1, seed=t)
        _train(b, ob, 1, seed=t)
        assert _equal(a, b), f"step {t}"
    assert optimizer_state_bytes(ob) == 0, "rho 0 keeps no Adam state on projectable weights"


def _naive_frugal_svd(w0, grads, lr, rho, gap, betas=(0.9, 0.999), eps=1e-8, wd=0.0):
    """The paper's update for one [m, n] weight, written out: every `gap` steps
    P = top-r right singular vectors of G (m >= n), m = v = 0; then
    W <- W (1 - lr wd) - lr P^T Adam(G P^T) - lr sign(G - G P^T P)."""
    W = w0.clone().double()
    m_, n_ = W.shape
    r = round(n_ * rho)
    out = []
    for t, G in enumerate(grads):
        G = G.double()
        if t % gap == 0:
            _, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
            P = Vh[:r].double()  # [r, n]
            m = torch.zeros(m_, r, dtype=torch.float64)
            v = torch.zeros(m_, r, dtype=torch.float64)
            k = 0
        k += 1
        low = G @ P.t()
        m = betas[0] * m + (1 - betas[0]) * low
        v = betas[1] * v + (1 - betas[1]) * low * low
        mhat = m / (1 - betas[0] ** k)
        vhat = v / (1 - betas[1] ** k)
        adam = mhat / (vhat.sqrt() + eps)
        resid = G - (G @ P.t()) @ P
        W = W * (1 - lr * wd) - lr * adam @ P - lr * torch.sign(resid)
        out.append(W.clone())
    return out


def test_svd_frugal_matches_a_naive_reference():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(8, 6, generator=g, dtype=torch.float64)
    grads = [torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(7)]
    ref = _naive_frugal_svd(w0, grads, lr=1e-2, rho=0.5, gap=3, wd=0.1)
    p = nn.Parameter(w0.clone())
    opt = FRUGAL([p], lr=1e-2, rho=0.5, projection="svd", update_gap=3, weight_decay=0.1)
    for t, G in enumerate(grads):
        p.grad = G.clone()
        opt.step()
        # float64 everywhere except the SVD itself (float32, as the paper): the same basis both sides
        torch.testing.assert_close(p.detach(), ref[t], rtol=1e-9, atol=1e-9, msg=lambda m: f"step {t}: {m}")


def test_residual_rules_and_scales():
    """A residual in the orthogonal complement gets -lr s_p s_i sign(r) (signSGD),
    -lr s_p s_i r (SGD) or nothing; Adam's part gets -lr s_p."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(6, 4, generator=g, dtype=torch.float64)
    outs = {}
    for rule in ("signsgd", "sgd", "none"):
        p = nn.Parameter(torch.zeros(6, 4, dtype=torch.float64))
        opt = FRUGAL([p], lr=0.1, rho=0.5, projection="randk", residual=rule, proj_lr_scale=2.0,
                     residual_lr_scale=0.5, weight_decay=0.0)
        p.grad = G.clone()
        opt.step()
        idx = opt.state[p]["subspace"]["index"].long()
        outs[rule] = (p.detach().clone(), idx)
    p, idx = outs["signsgd"]
    rest = [j for j in range(4) if j not in idx.tolist()]
    torch.testing.assert_close(p[:, rest], -0.1 * 2.0 * 0.5 * torch.sign(G[:, rest]))
    # Adam's first step is lr s_p sign(g) up to eps
    torch.testing.assert_close(p[:, idx], -0.1 * 2.0 * torch.sign(G[:, idx]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs["sgd"][0][:, rest], -0.1 * 2.0 * 0.5 * G[:, rest])
    assert bool((outs["none"][0][:, rest] == 0).all())


def test_blockwise_descending_order_and_state_reset():
    """Eight projectable tensors, rho 0.25: two on Adam at a time, moving down
    from the last pair every update_gap steps; the Adam state starts again."""
    torch.manual_seed(0)
    ws = [nn.Parameter(torch.randn(3, 3)) for _ in range(8)]
    opt = FRUGAL(ws, rho=0.25, update_gap=2)
    seen = []
    for t in range(10):
        for w in ws:
            w.grad = torch.randn(3, 3)
        opt.step()
        active = [i for i, w in enumerate(ws) if opt.state[w]["active"]]
        seen.append(active)
        steps = [opt.state[ws[i]]["step"] for i in active]
        assert steps == [1 + t % 2] * 2, f"step {t}: Adam state restarts at each renewal, got {steps}"
        for i, w in enumerate(ws):
            if i not in active:
                assert "exp_avg" not in opt.state[w], "inactive blocks keep no state"
    assert seen[::2] == [[6, 7], [4, 5], [2, 3], [0, 1], [6, 7]]


@pytest.mark.parametrize("projection", PROJ)
def test_state_dict_round_trip_resumes_bit_for_bit(projection):
    a = _mlp()
    oa = FRUGAL(frugal_param_groups(a), lr=1e-2, rho=0.5, projection=projection, update_gap=3,
                block_order="random")
    _train(a, oa, 4)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    b = _mlp(seed=5)
    b.load_state_dict(saved["model"])
    ob = FRUGAL(frugal_param_groups(b), lr=1e-2, rho=0.5, projection=projection, update_gap=3,
                block_order="random")
    ob.load_state_dict(saved["opt"])
    for t in range(4, 10):  # crosses the renewals at steps 6 and 9
        _train(a, oa, 1, seed=t)
        _train(b, ob, 1, seed=t)
        assert _equal(a, b), f"step {t}"


def test_state_bytes_are_measured_and_follow_the_paper_s_count():
    """Measured bytes (tensor sizes in the state) equal the count from the
    shapes: 4 bytes x (2 r m for each projected [m, n] weight + 2 P_other) plus
    the r x n projectors; AdamW's is 4 x 2 P (+ its step tensors)."""
    model = _mlp()
    groups = frugal_param_groups(model)
    opt = FRUGAL(groups, rho=0.25, projection="svd")
    _train(model, opt, 1)
    proj = [p for g in groups if g["projectable"] for p in g["params"]]
    other = sum(p.numel() for g in groups if not g["projectable"] for p in g["params"])
    moments = projectors = 0
    for p in proj:
        m, n = p.shape
        side_n, side_m = (n, m) if m >= n else (m, n)
        r = round(side_n * 0.25)
        moments += 2 * r * side_m * 4
        projectors += r * side_n * 4
    moments += 2 * other * 4
    got = opt.state_bytes()
    assert got == {"moments": moments, "projectors": projectors, "total": moments + projectors}
    adam = torch.optim.AdamW(model.parameters())
    _train(model, adam, 1)
    n_params = sum(p.numel() for p in model.parameters())
    assert optimizer_state_bytes(adam) == 8 * n_params + 4 * len(list(model.parameters()))


def test_frugal_param_groups_keep_embeddings_norms_and_head_on_adamw():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 8)
            self.norm = nn.LayerNorm(8)
            self.attn = nn.Linear(8, 8)
            self.mlp = nn.Linear(8, 16)
            self.lm_head = nn.Linear(16, 11)

    lm = LM()
    groups = frugal_param_groups(lm)
    proj = next(g for g in groups if g["projectable"])["params"]
    assert [id(p) for p in proj] == [id(lm.attn.weight), id(lm.mlp.weight)]
    rest = next(g for g in groups if not g["projectable"])["params"]
    assert {id(p) for p in rest} == {id(p) for p in lm.parameters()} - {id(p) for p in proj}
    assert [id(p) for p in next(g for g in frugal_param_groups(lm, exclude=("mlp",))
                                 if g["projectable"])["params"]] == [id(lm.attn.weight)]
    lm.lm_head = nn.Linear(8, 11)
    lm.lm_head.weight = lm.embed.weight  # tied: stays on AdamW
    proj = next(g for g in frugal_param_groups(lm, output_head=None) if g["projectable"])["params"]
    assert id(lm.embed.weight) not in {id(p) for p in proj}
    with pytest.raises(ValueError, match="output_head"):
        frugal_param_groups(lm, output_head="nope")


def test_bad_input_is_a_clear_error():
    p = [nn.Parameter(torch.randn(3, 3))]
    for rho in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rho"):
            FRUGAL(p, rho=rho)
    with pytest.raises(ValueError, match="projection"):
        FRUGAL(p, projection="galore")
    with pytest.raises(ValueError, match="residual"):
        FRUGAL(p, residual="adam")
    with pytest.raises(ValueError, match="update_gap"):
        FRUGAL(p, update_gap=0)
    with pytest.raises(ValueError, match="empty"):
        FRUGAL([{"params": p}, {"params": []}])
    with pytest.raises(ValueError, match="empty"):
        FRUGAL([])
    with pytest.raises(ValueError, match="projectable"):
        FRUGAL([{"params": [nn.Parameter(torch.randn(4))], "projectable": True}])
    with pytest.raises(ValueError, match="param group 1 rho"):
        FRUGAL([{"params": p}, {"params": [nn.Parameter(torch.randn(2, 2))], "rho": 2.0}])
    with pytest.raises(TypeError, match="params"):
        losskit.get("frugal")


def test_bfloat16_training_stays_finite():
    model = _mlp(dtype=torch.bfloat16)
    opt = FRUGAL(frugal_param_groups(model), lr=1e-2, rho=0.25, projection="svd", update_gap=2)
    for t in range(6):
        x, y = _data(t)
        opt.zero_grad()
        loss = ((model(x.bfloat16()) - y.bfloat16()) ** 2).mean()
        loss.backward()
        opt.step()
        assert math.isfinite(float(loss))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(s["subspace"]["basis"].dtype == torch.bfloat16 for s in opt.state.values() if "subspace" in s
               and s["subspace"]["basis"] is not None)


def test_training_reduces_the_loss_for_every_projection():
    for projection in PROJ:
        model = _mlp()
        opt = FRUGAL(frugal_param_groups(model), lr=1e-2, projection=projection, update_gap=5)
        x, _ = _data(0, n=64)
        y = torch.tanh(x[:, :3] * 2)  # a target the network can fit
        first = float(((model(x) - y) ** 2).mean())
        for _ in range(40):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        assert float(((model(x) - y) ** 2).mean()) < 0.6 * first, projection


@pytest.mark.parametrize("projection", PROJ)
@pytest.mark.parametrize("order", ["descending", "random"])
def test_expected_state_bytes_equal_the_measured_ones_at_every_step(projection, order):
    """frugal_state_bytes (shapes and dtypes alone) == state_bytes() measured after every step of
    every renewal; its peak is the measured peak; adamw_state_bytes == torch AdamW's measured."""
    for dtype, rho in ((torch.float32, 0.25), (torch.float32, 0.6), (torch.bfloat16, 0.4)):
        model = _mlp(dtype=dtype)
        kw = dict(lr=1e-3, rho=rho, projection=projection, update_gap=2, block_order=order, seed=3)
        opt = FRUGAL(frugal_param_groups(model), **kw)
        measured = []
        for t in range(12):
            x, y = _data(t)
            opt.zero_grad()
            ((model(x.to(dtype)) - y.to(dtype)) ** 2).float().mean().backward()
            opt.step()
            got = opt.state_bytes()
            assert got == opt.expected_state_bytes(t // 2), f"{dtype} rho {rho} step {t}"
            measured.append(got["total"])
        expected = frugal_state_bytes(frugal_param_groups(model), steps=12, **kw)
        assert [r["total"] for r in expected["per_renewal"]] == measured[::2]
        assert expected["peak"] == max(measured)
        if dtype == torch.float32:
            adam = torch.optim.AdamW(model.parameters())
            _train(model, adam, 1)
            assert expected["adamw"] == adamw_state_bytes(model.parameters()) == optimizer_state_bytes(adam)


def test_expected_state_bytes_need_no_memory_and_show_the_parameter_split():
    """Meta tensors: a model too large to train here.  Blockwise at rho 0.25 over 4 equal tensors
    keeps one on Adam; the head, biases and norms keep full AdamW moments."""
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(4)], nn.LayerNorm(1024),
                              nn.Linear(1024, 10))
    est = frugal_state_bytes(frugal_param_groups(model), rho=0.25)
    other = 2 * 1024 + 1024 * 10 + 10
    assert est["projectable"] == 4 * 1024 * 1024 and est["other"] == other
    assert est["adam_projectable"] == 1024 * 1024
    assert est["peak"] == est["mean"] == 8 * (1024 * 1024 + other)
    assert est["adamw"] == 8 * (4 * 1024 * 1024 + other) + 4 * 8  # 8 tensors, a float32 step each
    svd = frugal_state_bytes(frugal_param_groups(model), rho=0.25, projection="svd")
    assert svd["peak"] == 4 * (4 * (2 * 1024 * 256 + 256 * 1024) + 2 * other)
    with pytest.raises(ValueError, match="rho"):
        frugal_state_bytes(frugal_param_groups(model), rho=1.5)
