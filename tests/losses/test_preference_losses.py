"""Preference losses against naive per-pair references written from the papers."""

import io
import math

import pytest
import torch

import losskit
from losskit import PreferenceBatch
from losskit.functional import preference as P

NAMES = ["dpo", "hinge", "ipo", "robust", "beta-dpo", "madpo"]


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def naive(name, pc, pr, rc, rr, beta=0.1, eps=0.1, lc=None, lr=None, margin=None, rm=None):
    """One pair at a time, straight from the equations."""
    out = []
    for i in range(len(pc)):
        cw = float(pc[i] - rc[i])
        cl = float(pr[i] - rr[i])
        if lc is not None:
            cw, cl = cw / float(lc[i]), cl / float(lr[i])
        h = cw - cl
        m = 0.0 if margin is None else float(margin[i])
        z = beta * h - m
        if name == "dpo":
            out.append(-_logsig(z))
        elif name == "hinge":
            out.append(max(0.0, 1.0 - z))
        elif name == "ipo":
            out.append((h - (0.5 + m) / beta) ** 2)
        elif name == "robust":
            out.append((-(1 - eps) * _logsig(z) + eps * _logsig(-z)) / (1 - 2 * eps))
        elif name == "madpo":
            out.append(naive_madpo_weight(float(rm[i])) * -_logsig(z))
    return torch.tensor(out, dtype=torch.float64)


def naive_madpo_weight(m, c_max=2.0, c_min=0.5, lam=1.0, tau=math.log(999)):
    # MADPO paper: c(a) = c_min + (c_max - c_min) / (1 + K e^{lam (a - tau)}), K = (c_max - 1)/(1 - c_min)
    if m <= -tau:
        return 1.0
    k = (c_max - 1) / (1 - c_min)
    c = c_min + (c_max - c_min) / (1 + k * math.exp(lam * (abs(m) - tau)))
    return _sig(c * m) / _sig(m)


def rand_pairs(b=7, dtype=torch.float64, seed=0, scale=20.0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(b, generator=g, dtype=dtype) * scale) for _ in range(4)]


def call(name, logps, **kw):
    loss = losskit.get(name, **kw.pop("hp", {}))
    if name != "madpo":
        kw.pop("reward_margin", None)
    elif "reward_margin" not in kw:
        kw["reward_margin"] = torch.linspace(-3, 3, logps[0].shape[0], dtype=logps[0].dtype)
    return loss(*logps, **kw)


# ---- closed forms -------------------------------------------------------------------------------

def test_dpo_zero_margin_is_ln2():
    z = torch.zeros(5, dtype=torch.float64)
    assert losskit.get("dpo")(z, z, z, z).item() == pytest.approx(math.log(2), abs=1e-12)
    # equal log-ratios (not zero log-probs) also give ln 2
    a, b = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -1.0])
    assert losskit.get("dpo", beta=0.7)(a, b, a, b).item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_ipo_zero_at_half_inverse_beta(beta):
    h = 1.0 / (2 * beta)
    pc = torch.tensor([h - 7.0], dtype=torch.float64)
    z = torch.tensor([-7.0], dtype=torch.float64)
    assert losskit.get("ipo", beta=beta)(pc, z, z, z).item() == pytest.approx(0.0, abs=1e-12)
    assert losskit.get("ipo", beta=beta)(pc + 1, z, z, z).item() == pytest.approx(1.0, abs=1e-9)


def test_robust_eps0_equals_dpo_and_differs_otherwise():
    x = rand_pairs()
    dpo = losskit.get("dpo", reduction="none")(*x)
    torch.testing.assert_close(losskit.get("robust", epsilon=0.0, reduction="none")(*x), dpo)
    assert not torch.allclose(losskit.get("robust", epsilon=0.2, reduction="none")(*x), dpo)


def test_madpo_weights_published_shape():
    m = torch.tensor([0.5, 1.0, 3.0, -1.0, -3.0], dtype=torch.float64)
    w = losskit.get("madpo").weights(m)
    expected = [naive_madpo_weight(float(v)) for v in m]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64))
    assert [round(float(v), 2) for v in w] == [1.17, 1.20, 1.05, 0.45, 0.06]
    # continuity at m = -tau (c(tau) = 1) and w = 1 below it
    tau = math.log(999)
    w2 = P.madpo_weights(torch.tensor([-tau + 1e-9, -tau - 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(w2, torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert not P.madpo_weights(torch.tensor([1.0], requires_grad=True)).requires_grad


def test_madpo_weights_detached_in_loss():
    x = [t.clone().requires_grad_() for t in rand_pairs()]
    rm = torch.linspace(-2, 2, 7, dtype=torch.float64, requires_grad=True)
    losskit.get("madpo")(*x, reward_margin=rm).backward()
    assert rm.grad is None and x[0].grad is not None


# ---- naive references ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dpo", "hinge", "ipo", "robust", "madpo"])
def test_matches_naive(name):
    x = rand_pairs()
    rm = torch.linspace(-4, 4, 7, dtype=torch.float64)
    got = call(name, x, hp={"reduction": "none", "beta": 0.3}, reward_margin=rm)
    torch.testing.assert_close(got, naive(name, *x, beta=0.3, rm=rm))
    # lengths + margins
    lc = torch.randint(1, 30, (7,)).double()
    lr = torch.randint(1, 30, (7,)).double()
    mg = torch.rand(7, dtype=torch.float64)
    got = call(name, x, hp={"reduction": "none", "beta": 0.3, "length_normalize": True}, reward_margin=rm,
               chosen_lengths=lc, rejected_lengths=lr, margin=mg)
    torch.testing.assert_close(got, naive(name, *x, beta=0.3, lc=lc, lr=lr, margin=mg, rm=rm))


def test_ipo_length_normalisation_modes():
    x = rand_pairs()
    lc, lr = torch.full((7,), 4.0, dtype=torch.float64), torch.full((7,), 9.0, dtype=torch.float64)
    default = losskit.get("ipo", reduction="none")
    torch.testing.assert_close(default(*x, chosen_lengths=lc, rejected_lengths=lr),
                               naive("ipo", *x, lc=lc, lr=lr))  # TRL's form when lengths are given
    torch.testing.assert_close(default(*x), naive("ipo", *x))  # no lengths: the paper's form
    unnorm = losskit.get("ipo", reduction="none", length_normalize=False)
    torch.testing.assert_close(unnorm(*x, chosen_lengths=lc, rejected_lengths=lr), naive("ipo", *x))
    with pytest.raises(ValueError, match="chosen_lengths"):
        losskit.get("ipo", length_normalize=True)(*x)


def test_nll_term_rpo():
    x = rand_pairs()
    lc = torch.randint(1, 30, (7,)).double()
    lr = torch.randint(1, 30, (7,)).double()
    base = losskit.get("dpo", reduction="none")(*x)
    with_nll = losskit.get("dpo", reduction="none", nll_weight=0.5)(*x, chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(with_nll, base + 0.5 * (-x[0] / lc))
    nll = torch.rand(7, dtype=torch.float64)
    torch.testing.assert_close(losskit.get("dpo", reduction="none", nll_weight=2.0)(*x, chosen_nll=nll),
                               base + 2 * nll)
    with pytest.raises(ValueError, match="chosen_nll"):
        losskit.get("dpo", nll_weight=0.5)(*x)


# ---- reductions, weights -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dpo", "hinge", "ipo", "robust", "madpo"])
def test_reductions_and_sample_weight(name):
    x = rand_pairs()
    w = torch.rand(7, dtype=torch.float64)
    per = call(name, x, hp={"reduction": "none"})
    torch.testing.assert_close(call(name, x, hp={"reduction": "mean"}), per.mean())
    torch.testing.assert_close(call(name, x, hp={"reduction": "sum"}), per.sum())
    torch.testing.assert_close(call(name, x, hp={"reduction": "none"}, sample_weight=w), per * w)
    torch.testing.assert_close(call(name, x, hp={"reduction": "mean"}, sample_weight=w), (per * w).sum() / 7)
    # zero weight removes a pair's gradient
    xs = [t.clone().requires_grad_() for t in x]
    w0 = torch.ones(7, dtype=torch.float64)
    w0[2] = 0
    call(name, xs, sample_weight=w0).backward()
    assert xs[0].grad[2].item() == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name):
    x = [t.clone().requires_grad_() for t in rand_pairs(b=5, scale=5.0)]
    # beta-DPO's batch beta is detached by design (paper and official code), so its value must not
    # move with the inputs under finite differences: alpha = 0 keeps it at beta0
    loss = losskit.get(name, alpha=0.0) if name == "beta-dpo" else losskit.get(name)
    kw = {"reward_margin": torch.linspace(-3, 3, 5, dtype=torch.float64)} if name == "madpo" else {}
    if name == "beta-dpo":
        loss.eval()  # frozen running state; the keep_ratio draw is fixed by a seeded generator

        def f(*t):
            return loss(*t, generator=torch.Generator().manual_seed(3))
    else:
        def f(*t):
            return loss(*t, **kw)
    assert torch.autograd.gradcheck(f, tuple(x))


@pytest.mark.parametrize("name", NAMES)
def test_bf16_and_autocast_no_nan(name):
    x = [t.bfloat16() * 50 for t in rand_pairs(b=16, dtype=torch.float32, scale=100.0)]
    x = [t.requires_grad_() for t in x]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(name, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float())
    out.float().backward()
    assert all(torch.isfinite(t.grad.float()).all() for t in x)
    # huge log-ratios in float32 stay finite
    big = [torch.tensor([-1e4, -1.0]), torch.tensor([-1.0, -1e4]), torch.zeros(2), torch.zeros(2)]
    assert torch.isfinite(call(name, big))


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_is_zero_with_graph(name):
    e = [torch.zeros(0, requires_grad=True) for _ in range(4)]
    kw = {"reward_margin": torch.zeros(0)} if name == "madpo" else {}
    out = losskit.get(name)(*e, **kw)
    assert out.item() == 0.0
    out.backward()


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_bad_shapes_and_values(name):
    ok = torch.zeros(3)
    kw = {"reward_margin": torch.zeros(3)} if name == "madpo" else {}
    loss = losskit.get(name)
    with pytest.raises(ValueError, match=r"policy_chosen_logps.*\[B\].*\[3, 4\]"):
        loss(torch.zeros(3, 4), ok, ok, ok, **kw)
    with pytest.raises(ValueError, match=r"ref_rejected_logps.*\[3\].*\[2\]"):
        loss(ok, ok, ok, torch.zeros(2), **kw)
    with pytest.raises(ValueError, match="policy_rejected_logps: expected finite.*-inf.*index 1"):
        loss(ok, torch.tensor([0.0, -float("inf"), 0.0]), ok, ok, **kw)
    with pytest.raises(ValueError, match="ref_chosen_logps: expected finite.*nan"):
        loss(ok, ok, torch.tensor([0.0, 0.0, float("nan")]), ok, **kw)
    with pytest.raises(TypeError, match="floating"):
        loss(torch.zeros(3, dtype=torch.long), ok, ok, ok, **kw)
    with pytest.raises(ValueError, match="sample_weight"):
        loss(ok, ok, ok, ok, sample_weight=torch.tensor([1.0, -1.0, 1.0]), **kw)
    with pytest.raises(ValueError, match="chosen_lengths.*positive"):
        loss(ok, ok, ok, ok, chosen_lengths=torch.tensor([1, 0, 2]), rejected_lengths=torch.ones(3), **kw)
    with pytest.raises(ValueError, match="margin.*\\[3\\]"):
        loss(ok, ok, ok, ok, margin=torch.zeros(4), **kw)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="beta"):
        losskit.get("dpo", beta=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        losskit.get("robust", epsilon=0.5)
    with pytest.raises(ValueError, match="c_max"):
        losskit.get("madpo", c_max=0.9)
    with pytest.raises(ValueError, match="keep_ratio"):
        losskit.get("beta-dpo", keep_ratio=0.0)
    with pytest.raises(ValueError, match="reduction"):
        losskit.get("dpo", reduction="avg")
    with pytest.raises(TypeError, match="reward_margin"):
        losskit.get("madpo")(*rand_pairs())
    with pytest.raises(ValueError, match=r"reward_margin.*\[7\]"):
        losskit.get("madpo")(*rand_pairs(), reward_margin=torch.zeros(3))


# ---- beta-DPO state -----------------------------------------------------------------------------

def naive_beta_dpo(h, mu, sd, keep, beta=0.1, alpha=0.6):
    gap = [beta * v for v in h]
    kept = [g for g, k in zip(gap, keep) if k]
    b = max(beta * (1 + alpha * (sum(kept) / len(kept) - mu)), 1e-3)
    losses = [-_logsig(b * v) for v, k in zip(h, keep) if k]
    return sum(losses) / len(losses), b


def test_beta_dpo_matches_naive_and_updates_state():
    x = rand_pairs(b=10)
    loss = losskit.get("beta-dpo")
    h = (x[0] - x[2]) - (x[1] - x[3])
    out, beta_b, keep = P.beta_dpo_loss(PreferenceBatch(*x), gap_mean=0.3, gap_std=0.5, generator=torch.Generator().manual_seed(0),
                                        return_details=True)
    assert int(keep.sum()) == 8
    ref, b_ref = naive_beta_dpo(h.tolist(), 0.3, 0.5, keep.tolist())
    assert out.item() == pytest.approx(ref, rel=1e-10)
    assert float(beta_b) == pytest.approx(b_ref, rel=1e-10)
    # module: EMA of the batch statistics (momentum 0.1), updated before the loss
    loss.train()
    loss(*x)
    assert float(loss.gap_mean) == pytest.approx(0.1 * float((0.1 * h).mean()), rel=1e-9)
    assert float(loss.gap_std) == pytest.approx(0.1 * float((0.1 * h).std()), rel=1e-9)
    assert int(loss.num_updates) == 1
    loss.eval()
    loss(*x)
    assert int(loss.num_updates) == 1  # eval reads the state only (the official code also updated it in eval)


def test_beta_dpo_state_dict_roundtrip():
    loss = losskit.get("beta-dpo")
    for s in range(3):
        loss(*rand_pairs(b=10, seed=s))
    buf = io.BytesIO()
    torch.save(loss.state_dict(), buf)
    buf.seek(0)
    fresh = losskit.get("beta-dpo")
    fresh.load_state_dict(torch.load(buf))
    for k in ("gap_mean", "gap_std", "num_updates", "last_beta"):
        assert torch.equal(getattr(fresh, k), getattr(loss, k)), k
    x = rand_pairs(b=10, seed=9)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(fresh(*x, generator=g1), loss(*x, generator=g2))


def test_beta_dpo_filtering_prefers_typical_pairs():
    # one pair far from the running mean is dropped (almost) always
    b = 10
    x = [torch.zeros(b, dtype=torch.float64) for _ in range(4)]
    x[0][0] = 100.0  # h_0 = 100, others 0
    drops = 0
    for s in range(50):
        _, _, keep = P.beta_dpo_loss(PreferenceBatch(*x), gap_mean=0.0, gap_std=0.5, keep_ratio=0.9,
                                     generator=torch.Generator().manual_seed(s), return_details=True)
        drops += int(not keep[0])
    assert drops == 50
    # keep_ratio = 1 keeps everyone and equals DPO with the adapted beta
    out, bb, keep = P.beta_dpo_loss(PreferenceBatch(*rand_pairs()), gap_mean=0.0, gap_std=1.0, keep_ratio=1.0, return_details=True)
    assert keep.all()
    torch.testing.assert_close(out, losskit.get("dpo", beta=float(bb))(*rand_pairs()))


def test_docs_plain_pytorch_example_runs(capsys):
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "preference.md").read_text()
    block = doc.split("<!-- example: plain-pytorch -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(block, "docs/preference.md", "exec"), {})
    assert math.isfinite(float(capsys.readouterr().out.strip().splitlines()[-1]))


def test_beta_dpo_reductions_and_weights():
    x = rand_pairs(b=10)
    w = torch.rand(10, dtype=torch.float64)
    kw = dict(gap_mean=0.1, gap_std=0.4)

    def run(red, sw=None):
        return P.beta_dpo_loss(PreferenceBatch(*x), **kw, reduction=red, sample_weight=sw,
                               generator=torch.Generator().manual_seed(4), return_details=True)

    per, bb, keep = run("none", w)
    h = (x[0] - x[2]) - (x[1] - x[3])
    expected = -torch.nn.functional.logsigmoid(bb * h) * keep * w
    torch.testing.assert_close(per, expected)
    assert (per[~keep] == 0).all()
    torch.testing.assert_close(run("sum", w)[0], expected.sum())
    torch.testing.assert_close(run("mean", w)[0], expected.sum() / keep.sum())
