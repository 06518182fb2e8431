"""Negative-flip-free updates (issue 12, item 1): MPT's terms against loops
over the paper's equations, the official code's formulation, metrics, recipe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import losskit
from losskit.functional.negative_flips import focal_distillation_loss, margin_calibrated_logits, \
    margin_preserving_loss
from losskit.metrics.flips import FlipCounter, flip_summary, negative_flip_rate, relative_negative_flip_rate
from losskit.recipes.model_update import run_model_update, train_classifier


def _data(b=9, c=6, c_old=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g, dtype=dtype) * 3
    zo = torch.randn(b, c_old, generator=g, dtype=dtype) * 3
    zn = torch.randn(b, c, generator=g, dtype=dtype) * 3
    y = torch.randint(0, c, (b,), generator=g)
    y[0] = int(zo[0].argmax())  # at least one row where the old model is right
    y[1] = int(zn[1].argmax())
    return z, y, zo, zn


def _naive_fd(z, y, ref, alpha, beta, T):
    out = []
    for i in range(len(z)):
        c = len(ref[i])
        p = [math.exp(ref[i][j] / T) for j in range(c)]
        q = [math.exp(z[i][j] / T) for j in range(c)]
        sp, sq = sum(p), sum(q)
        kl = sum(p[j] / sp * math.log((p[j] / sp) / (q[j] / sq)) for j in range(c))
        right = max(range(c), key=lambda j: ref[i][j]) == int(y[i])
        out.append((alpha + beta * right) * kl)
    return torch.tensor(out, dtype=torch.float64)


def _naive_mpt(z, y, zo, zn, b, alpha, beta, T):
    rows = []
    for i in range(z.shape[0]):
        zc = [float(z[i, j]) + (b if j >= zo.shape[1] else 0.0) for j in range(z.shape[1])]
        lse = math.log(sum(math.exp(v) for v in zc))
        rows.append(lse - zc[int(y[i])])
    rows = torch.tensor(rows, dtype=torch.float64)
    rows = rows + _naive_fd(z.tolist(), y, zo.tolist(), alpha, beta, T)
    if zn is not None:
        rows = rows + _naive_fd(z.tolist(), y, zn.tolist(), alpha, beta, T)
    return rows


def test_focal_distillation_matches_the_equation():
    z, y, zo, _ = _data()
    got = focal_distillation_loss(z, y, zo, 1.0, 5.0, 5.0, reduction="none")
    torch.testing.assert_close(got, _naive_fd(z.tolist(), y, zo.tolist(), 1.0, 5.0, 5.0))


@pytest.mark.parametrize("b,with_new", [(4.0, True), (0.0, True), (2.0, False)])
def test_mpt_matches_the_equation(b, with_new):
    z, y, zo, zn = _data(seed=int(b))
    zn = zn if with_new else None
    got = margin_preserving_loss(z, y, zo, zn, bias=b, reduction="none")
    torch.testing.assert_close(got, _naive_mpt(z, y, zo, zn, b, 1.0, 5.0, 5.0))
    assert margin_preserving_loss(z, y, zo, zn, bias=b).item() == pytest.approx(got.mean().item())


def test_mpt_equals_the_official_formulation():
    """main.py, method MPT_KL: the two fdkl terms on the unbiased logits, then outputs[:, C_old:] += b in place,
    then CE on the biased logits (loss.py: mean of (alpha + beta 1[ref correct]) * KL, tau 5)."""
    z, y, zo, zn = _data(b=16, c=7, c_old=3, seed=5)

    def fdkl(out, ref, t, alpha=1.0, beta=5.0, tau=5.0):
        w = (ref.argmax(1) == t).to(out.dtype)
        kl = F.kl_div(F.log_softmax(out / tau, 1), F.softmax(ref / tau, 1), reduction="none").sum(1)
        return torch.mean((alpha + beta * w) * kl)

    zz = z.clone().requires_grad_(True)
    outputs = zz * 1.0
    loss = fdkl(outputs[:, :3], zo, y) + fdkl(outputs, zn, y)
    outputs[:, 3:] = outputs[:, 3:] + 4.0
    loss = loss + F.cross_entropy(outputs, y)
    loss.backward()
    ours_in = z.clone().requires_grad_(True)
    ours = losskit.get("mpt")(ours_in, y, old_logits=zo, new_logits=zn)
    ours.backward()
    assert ours.item() == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(ours_in.grad, zz.grad)


def test_gradcheck_float64():
    z, y, zo, zn = _data()
    z = z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: margin_preserving_loss(t, y, zo, zn, reduction="none"), (z,))
    assert torch.autograd.gradcheck(lambda t: focal_distillation_loss(t, y, zo, reduction="none"), (z,))


def test_bf16_has_no_nan():
    z, y, zo, zn = _data(dtype=torch.bfloat16)
    z = (z * 10).requires_grad_(True)
    out = margin_preserving_loss(z, y, zo * 10, zn * 10)
    out.backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out) and torch.isfinite(z.grad).all()


def test_calibration_is_out_of_place_and_the_bias_only_shifts_new_classes():
    z, *_ = _data()
    zc = margin_calibrated_logits(z, 4, 2.5)
    torch.testing.assert_close(zc[:, :4], z[:, :4])
    torch.testing.assert_close(zc[:, 4:], z[:, 4:] + 2.5)


def test_reference_whose_classes_do_not_match_is_refused():
    z, y, zo, zn = _data()
    with pytest.raises(ValueError, match="old_logits.*classes do not match"):
        margin_preserving_loss(z, y, torch.randn(9, 8, dtype=z.dtype), zn)
    with pytest.raises(ValueError, match="new_logits.*6 classes"):
        margin_preserving_loss(z, y, zo, zn[:, :5])
    with pytest.raises(ValueError, match="old_logits.*9 rows"):
        margin_preserving_loss(z, y, zo[:3], zn)
    with pytest.raises(ValueError, match="temperature"):
        focal_distillation_loss(z, y, zo, temperature=0.0)


# ----------------------------------------------------------------------------- metrics

def _naive_flips(new, old, y, c_old=None):
    rows = [i for i in range(len(y)) if c_old is None or y[i] < c_old]
    n = len(rows)
    nf = sum(1 for i in rows if old[i] == y[i] and new[i] != y[i]) / n
    er_o = sum(1 for i in rows if old[i] != y[i]) / n
    er_n = sum(1 for i in rows if new[i] != y[i]) / n
    return nf, nf / ((1 - er_o) * er_n)


def test_flip_metrics_match_their_definition_and_the_accumulator_matches_the_function():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (200,), generator=g)
    old = torch.where(torch.rand(200, generator=g) < 0.7, y, torch.randint(0, 3, (200,), generator=g))
    new_logits = torch.randn(200, 5, generator=g)
    new_logits[torch.arange(200), y] += 1.5
    new = new_logits.argmax(1)
    for c_old in (None, 3):
        nf, rel = _naive_flips(new.tolist(), old.tolist(), y.tolist(), c_old)
        assert negative_flip_rate(new_logits, old, y, c_old) == pytest.approx(nf)
        assert relative_negative_flip_rate(new, old, y, c_old) == pytest.approx(rel)
        acc = FlipCounter(c_old)
        for s in range(0, 200, 37):
            acc.update(new_logits[s:s + 37], old[s:s + 37], y[s:s + 37])
        assert acc.compute() == pytest.approx(flip_summary(new, old, y, c_old))
        acc2 = FlipCounter(c_old)
        acc2.load_state_dict(acc.state_dict())
        assert acc2.compute() == acc.compute()
    assert relative_negative_flip_rate(y, y, y) == 0.0  # no errors: no flips, not NaN
    with pytest.raises(ValueError, match="new: expected 200 rows"):
        negative_flip_rate(new[:5], old, y)


# ----------------------------------------------------------------------------- recipe

def _blobs(n_per=30, c=5, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * 2.5
    y = torch.arange(c).repeat_interleave(n_per)
    return centres[y] + torch.randn(len(y), d, generator=g), y


@pytest.mark.parametrize("method", ["ce", "calibration", "focal-distillation", "mpt-no-bias", "mpt"])
def test_model_update_recipe_runs_and_learns(method):
    torch.manual_seed(0)
    x, y = _blobs()
    old = torch.nn.Linear(6, 3)
    train_classifier(old, x[y < 3], y[y < 3], epochs=20, lr=0.05)
    model = torch.nn.Linear(6, 5)
    res = losskit.get("model-update", method=method, epochs=20, lr=0.05, batch_size=32)(model, x, y, old_model=old)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.8 and res.epoch_losses[-1] < res.epoch_losses[0]
    assert (res.new_model is not None) == method.startswith("mpt")


def test_model_update_refuses_an_old_model_whose_classes_do_not_match():
    x, y = _blobs()
    with pytest.raises(ValueError, match="old_model.*classes do not match.*7 classes"):
        run_model_update(torch.nn.Linear(6, 5), x, y, old_model=torch.nn.Linear(6, 7), epochs=1)
    with pytest.raises(ValueError, match="old_model.*num_old_classes is 2"):
        run_model_update(torch.nn.Linear(6, 5), x, y, old_model=torch.nn.Linear(6, 3), num_old_classes=2, epochs=1)
    with pytest.raises(ValueError, match="y: expected labels in"):
        run_model_update(torch.nn.Linear(6, 4), x, y, old_model=torch.nn.Linear(6, 3), epochs=1)
