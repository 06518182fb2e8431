import pytest
import torch
from torch import nn

import losskit
from losskit.metrics.entanglement import gradient_entanglement, pairwise_normalized_loss, per_pair_grad_norms


def bandit(d=5, k=6, seed=0):
    torch.manual_seed(seed)
    m = nn.Linear(d, k, bias=False).double()
    nn.init.normal_(m.weight, std=1.0)
    return m


def logps(m, x, a):
    return torch.log_softmax(m(x), -1).gather(1, a[:, None]).squeeze(1)


def closed_form(m, x, w, l):
    # d log pi(a|x) / dW = (e_a - p) x^T  =>  <g_w, g_l> = (e_w - p).(e_l - p) ||x||^2
    out = []
    with torch.no_grad():
        p = torch.softmax(m(x), -1)
        for i in range(x.shape[0]):
            ew = torch.zeros_like(p[i]); ew[w[i]] = 1
            el = torch.zeros_like(p[i]); el[l[i]] = 1
            xx = float(x[i] @ x[i])
            inner = float((ew - p[i]) @ (el - p[i])) * xx
            nw2 = float((ew - p[i]) @ (ew - p[i])) * xx
            nl2 = float((el - p[i]) @ (el - p[i])) * xx
            out.append((inner, nw2 ** 0.5, nl2 ** 0.5, inner / min(nw2, nl2)))
    return out


def test_entanglement_matches_closed_form_and_uses_both_norms():
    m = bandit()
    x = torch.randn(8, 5, dtype=torch.float64)
    w = torch.randint(0, 6, (8,))
    l = (w + 1 + torch.randint(0, 5, (8,))) % 6
    st = gradient_entanglement(logps(m, x, w), logps(m, x, l), m)
    ref = closed_form(m, x, w, l)
    for i, (inner, nw, nl, ratio) in enumerate(ref):
        assert st.inner[i].item() == pytest.approx(inner, rel=1e-9)
        assert st.chosen_norm[i].item() == pytest.approx(nw, rel=1e-9)
        assert st.rejected_norm[i].item() == pytest.approx(nl, rel=1e-9)
        assert st.ratio[i].item() == pytest.approx(ratio, rel=1e-9)
        assert st.cosine[i].item() == pytest.approx(inner / (nw * nl), rel=1e-9)
    # at least one pair where the rejected norm is the smaller one: the official min(g_w, g_w) would differ there
    official_bug = st.inner / st.chosen_norm ** 2
    assert (st.rejected_norm < st.chosen_norm).any()
    assert not torch.allclose(official_bug, st.ratio)
    s = st.summary()
    assert s["pairs"] == 8 and 0 <= s["frac_ratio_gt_1"] <= 1


def test_condition_predicts_one_small_dpo_step():
    # the chosen log-prob rises after a tiny DPO step iff <g_w,g_l> <= ||g_w||^2 (first order)
    m = bandit(seed=3)
    x = torch.randn(1, 5, dtype=torch.float64).repeat(1, 1)
    agree = 0
    trials = 0
    for a in range(6):
        for b in range(6):
            if a == b:
                continue
            w, l = torch.tensor([a]), torch.tensor([b])
            st = gradient_entanglement(logps(m, x, w), logps(m, x, l), m)
            before_w, before_l = logps(m, x, w).item(), logps(m, x, l).item()
            mm = bandit(seed=3)
            opt = torch.optim.SGD(mm.parameters(), lr=1e-4)
            ref = logps(mm, x, w).detach(), logps(mm, x, l).detach()
            losskit.get("dpo")(logps(mm, x, w), logps(mm, x, l), *ref).backward()
            opt.step()
            dw = logps(mm, x, w).item() - before_w
            dl = logps(mm, x, l).item() - before_l
            agree += int((dw > 0) == bool(st.chosen_rises[0])) + int((dl < 0) == bool(st.rejected_falls[0]))
            trials += 2
    assert agree == trials


def test_pairwise_normalized_gradient_direction():
    m = bandit(seed=1)
    x = torch.randn(4, 5, dtype=torch.float64)
    w = torch.tensor([0, 1, 2, 3])
    l = torch.tensor([5, 4, 3, 2])
    cw, cl = logps(m, x, w), logps(m, x, l)
    rc, rr = cw.detach() - 0.3, cl.detach() + 0.2
    loss = pairwise_normalized_loss(cw, cl, m, rc, rr, beta=0.5, reduction="sum")
    (g,) = torch.autograd.grad(loss, m.weight, retain_graph=True)
    # explicit: -sum_i c_i (g_w,i/||g_w,i|| - g_l,i/||g_l,i||), c_i = beta sigma(-beta h_i)
    exp = torch.zeros_like(m.weight)
    h = (cw - rc) - (cl - rr)
    for i in range(4):
        gw, = torch.autograd.grad(cw[i], m.weight, retain_graph=True)
        gl, = torch.autograd.grad(cl[i], m.weight, retain_graph=True)
        c = 0.5 * torch.sigmoid(-0.5 * h[i]).item()
        exp -= c * (gw / gw.norm() - gl / gl.norm())
    torch.testing.assert_close(g, exp)
    # unweighted form and norms helper
    nw, nl = per_pair_grad_norms(cw, cl, m)
    assert nw.shape == (4,) and (nw > 0).all()
    loss2 = pairwise_normalized_loss(cw, cl, m, dpo_weight=False)
    assert torch.isfinite(loss2)


def test_entanglement_bad_input():
    m = bandit()
    x = torch.randn(3, 5, dtype=torch.float64)
    a = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="graph"):
        gradient_entanglement(logps(m, x, a).detach(), logps(m, x, a), m)
    with pytest.raises(ValueError, match="rejected_logps"):
        gradient_entanglement(logps(m, x, a), logps(m, x[:2], a[:2]), m)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        pairwise_normalized_loss(logps(m, x, a), logps(m, x, a), m)


def test_bad_values_and_hyperparameters_by_message():
    from losskit.metrics.entanglement import pairwise_normalized_loss

    lp = torch.tensor([-1.0, float("-inf")], requires_grad=True)
    ok = torch.tensor([-1.0, -2.0], requires_grad=True)
    norms = (torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="chosen_logps: expected finite log-probabilities, got -inf at index 1"):
        pairwise_normalized_loss(lp, ok, None, dpo_weight=False, grad_norms=norms)
    with pytest.raises(ValueError, match="beta: expected a finite number > 0.0, got nan"):
        pairwise_normalized_loss(ok, ok, None, ok.detach(), ok.detach(), beta=float("nan"), grad_norms=norms)
    with pytest.raises(ValueError, match="beta: expected a value > 0.0, got -1.0"):
        pairwise_normalized_loss(ok, ok, None, ok.detach(), ok.detach(), beta=-1.0, grad_norms=norms)
    assert pairwise_normalized_loss(ok, ok, None, dpo_weight=False, grad_norms=norms, reduction="none").shape == (2,)
