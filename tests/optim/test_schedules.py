"""Linear decay, the refined schedule (against a loop written from the paper's
Algorithm 1) and the gradient-norm recorder."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import losskit
from losskit.optim import GradNormRecorder, LinearDecayLR, RefinedLR
from losskit.optim.schedules import linear_decay_factors, median_filter, refined_factors


def _opt(lr=0.5):
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_decay_values():
    assert linear_decay_factors(10) == pytest.approx([1, 8 / 9, 7 / 9, 6 / 9, 5 / 9, 4 / 9, 3 / 9, 2 / 9, 1 / 9, 0],
                                                      abs=1e-15)
    opt = _opt(0.5)
    lrs = _lrs(LinearDecayLR(opt, total_steps=10, warmup_steps=3), opt, 12)
    expect = [0.5 * f for f in (1 / 4, 2 / 4, 3 / 4)] + [0.5 * (6 - t) / 6 for t in range(7)] + [0.0, 0.0]
    assert lrs == pytest.approx(expect, abs=1e-15)


def test_a_schedule_shorter_than_its_warmup_is_refused():
    with pytest.raises(ValueError, match="total_steps"):
        LinearDecayLR(_opt(), total_steps=5, warmup_steps=5)
    with pytest.raises(ValueError, match="total_steps"):
        LinearDecayLR(_opt(), total_steps=4, warmup_steps=3)
    with pytest.raises(ValueError, match="total_steps"):
        RefinedLR(_opt(), [1.0] * 20, total_steps=6, warmup_steps=10)
    with pytest.raises(ValueError, match="warmup_steps"):
        LinearDecayLR(_opt(), total_steps=10, warmup_steps=-1)


def test_constant_gradient_norms_give_exactly_linear_decay():
    """The paper's Section 3: w_t constant => eta_t proportional to T - t."""
    assert refined_factors([1.0] * 10) == linear_decay_factors(10)  # 1, 0.889, ..., 0, to the bit
    assert refined_factors([1.0] * 10)[:2] == [1.0, 8 / 9]
    for base in ("adam", "sgd"):
        for g, n, total, warm in ((3.7, 10, 10, 0), (0.2, 50, 17, 4), (5.0, 7, 30, 2)):
            got = refined_factors([g] * n, total_steps=total, warmup_steps=warm, base=base)
            torch.testing.assert_close(torch.tensor(got), torch.tensor(linear_decay_factors(total, warm)),
                                       rtol=0, atol=1e-12)


def _naive_refined(norms, total, warmup, base, smoothing):
    """Algorithm 1 written with loops: median filter (reflect padding), linear
    interpolation to the new length, w_t, eta_t = w_t sum_{p>t} w_p, / max."""
    m = len(norms)
    window = max(1, round(smoothing * m))
    half = (window if window % 2 else window + 1) // 2
    half = min(half, m - 1)

    def at(i):  # reflect padding: -1 -> 1, m -> m - 2
        if i < 0:
            i = -i
        if i >= m:
            i = 2 * (m - 1) - i
        return norms[i]

    smooth = []
    for t in range(m):
        win = sorted(at(t + k) for k in range(-half, half + 1))
        smooth.append(win[len(win) // 2])
    n = total - warmup
    res = []
    for t in range(n):
        pos = t * (m - 1) / (n - 1)
        lo = min(int(math.floor(pos)), m - 2)
        fr = pos - lo
        res.append(smooth[lo] * (1 - fr) + smooth[lo + 1] * fr)
    w = [(1 / g ** 2) if base == "sgd" else 1 / g for g in res]
    eta = [w[t] * sum(w[p] for p in range(t + 1, n)) for t in range(n)]
    top = max(eta)
    return [(t + 1) / (warmup + 1) for t in range(warmup)] + [e / top for e in eta]


@pytest.mark.parametrize("base", ["adam", "sgd"])
@pytest.mark.parametrize("total,warmup", [(40, 0), (25, 3), (90, 5)])
def test_refined_matches_a_naive_reference(base, total, warmup):
    g = torch.Generator().manual_seed(1)
    t = torch.arange(60, dtype=torch.float64)
    norms = (2.0 + torch.sin(t / 6) + 0.5 * torch.rand(60, generator=g, dtype=torch.float64)).tolist()
    norms[10] = 40.0  # a spike the median filter removes
    got = refined_factors(norms, total, warmup, base, smoothing=0.1)
    ref = _naive_refined(norms, total, warmup, base, 0.1)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-12, atol=1e-12)
    assert got[-1] == 0.0 and max(got[warmup:]) == pytest.approx(1.0)


def test_median_filter_removes_a_spike():
    x = torch.ones(21, dtype=torch.float64)
    x[7] = 100.0
    assert torch.equal(median_filter(x, 5), torch.ones(21, dtype=torch.float64))


def test_rising_gradient_norms_decay_the_schedule_earlier():
    """Norms that grow late in training (the paper's Figure 1 case) put the
    refined schedule below linear decay in the second half."""
    norms = torch.linspace(1.0, 4.0, 100).tolist()
    ref = refined_factors(norms, base="sgd")
    lin = linear_decay_factors(100)
    assert all(r <= l_ + 1e-12 for r, l_ in zip(ref[50:], lin[50:]))
    assert sum(ref[50:]) < 0.8 * sum(lin[50:])


def test_bad_gradient_norms_are_clear_errors():
    for bad, what in (([1.0, float("nan"), 2.0], "finite"), ([1.0, float("inf")], "finite"),
                      ([1.0, 0.0, 2.0], "positive"), ([], "none")):
        with pytest.raises(ValueError, match="grad_norms.*" + what):
            RefinedLR(_opt(), bad, total_steps=10)
    with pytest.raises(ValueError, match="base"):
        RefinedLR(_opt(), [1.0] * 10, base="lion")
    with pytest.raises(TypeError, match="grad_norms"):
        RefinedLR(_opt(), GradNormRecorder())


def test_recorder_logs_the_norms_and_feeds_the_refined_schedule():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = GradNormRecorder(opt)
    manual_l1, manual_l2 = [], []
    for t in range(12):
        x = torch.randn(8, 4)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        gs = [p.grad.double() for p in model.parameters()]
        manual_l1.append(sum(float(g.abs().sum()) for g in gs))
        manual_l2.append(math.sqrt(sum(float((g ** 2).sum()) for g in gs)))
        opt.step()
    assert len(rec) == 12
    assert rec.norms("l1") == pytest.approx(manual_l1, rel=1e-12)
    assert rec.norms("l2") == pytest.approx(manual_l2, rel=1e-12)
    rec.remove()
    opt.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    assert len(rec) == 12, "remove() detaches the hook"
    rec2 = GradNormRecorder()
    buf = io.BytesIO()
    torch.save(rec.state_dict(), buf)
    buf.seek(0)
    rec2.load_state_dict(torch.load(buf))
    assert rec2.norms("l1") == rec.norms("l1")
    opt2 = _opt()
    s = RefinedLR.from_recorder(opt2, rec2, base="adam", total_steps=20)
    assert s.factors == refined_factors(manual_l1, total_steps=20, base="adam")
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        GradNormRecorder().record([nn.Parameter(torch.zeros(2))])


def test_registered_and_built_by_get():
    opt = _opt()
    s = losskit.get("linear-decay", opt, total_steps=10)
    assert isinstance(s, torch.optim.lr_scheduler.LRScheduler) and s.hparams["total_steps"] == 10
    s = losskit.get("refined", opt, grad_norms=[1.0, 2.0, 3.0])
    assert isinstance(s, RefinedLR) and len(s.factors) == 3
