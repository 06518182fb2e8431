"""Sow et al. (ICLR 2025) loss-based reweighting against a reference written
from the paper's equations (Section 3): h, the three strategies, the
KL-regularised softmax; burn-in, token counts, two gloo processes."""

import io
import math
import os
from datetime import timedelta

import pytest
import torch

import losskit
from losskit.weighting import Extremes, LinUpper, LossReweighting, Quadratic, Weighter


def naive(losses, strategy, r, delta=1.0):
    ls = [float(v) for v in losses]
    lo, hi = min(ls), max(ls)
    h = [2 * delta * (v - (hi + lo) / 2) / max(hi - lo, 1e-6) for v in ls]
    if strategy == "linupper":
        f = [min(x + delta, delta) for x in h]
    elif strategy == "quadratic":
        f = [1 - x * x / delta ** 2 for x in h]
    else:
        f = [abs(x) for x in h]
    m = max(f)
    e = [math.exp((v - m) / r) for v in f]
    return torch.tensor([len(ls) * v / sum(e) for v in e], dtype=torch.float64)


def _losses(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.5


@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes"])
@pytest.mark.parametrize("r", [0.1, 0.4, 1.0, 5.0])
@pytest.mark.parametrize("delta", [1.0, 2.0])
def test_weights_match_the_paper(strategy, r, delta):
    l = _losses()
    w = LossReweighting(strategy, r=r, delta=delta, burn_in=0)(l)
    torch.testing.assert_close(w, naive(l, strategy, r, delta))
    assert not w.requires_grad and w.dtype == l.dtype
    assert abs(float(w.mean()) - 1) < 1e-12


def test_presets_and_what_they_favour():
    l = torch.tensor([0.1, 1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    lin, quad, ext = (c(burn_in=0)(l) for c in (LinUpper, Quadratic, Extremes))
    assert lin[0] == lin.min() and torch.allclose(lin[3:], lin[-1].expand(2))   # flat above the mid-range loss
    assert (lin[:3].diff() > 0).all()                                              # a ramp below it
    mid = (l - (l.max() + l.min()) / 2).abs().argmin()
    assert quad.argmax() == mid and torch.isclose(quad[0], quad.min()) and torch.isclose(quad[-1], quad.min())   # middle up, extremes down
    assert ext[0] == ext.max() or ext[-1] == ext.max()
    assert (LinUpper().r, Quadratic().r, Extremes().r) == (0.4, 1.0, 0.4)
    assert losskit.spec("linupper").kind == "weighter" and isinstance(losskit.get("quadratic"), Weighter)


def test_large_r_is_uniform_and_equal_losses_are_uniform():
    l = _losses()
    for strategy in ("linupper", "quadratic", "extremes"):
        w = LossReweighting(strategy, r=1e4, burn_in=0)(l)     # the paper's sanity check
        assert (w - 1).abs().max() < 1e-3
        w = LossReweighting(strategy, r=1e12, burn_in=0)(l)
        torch.testing.assert_close(w, torch.ones_like(l))
        torch.testing.assert_close(LossReweighting(strategy, burn_in=0)(torch.full((5,), 2.0)), torch.ones(5))


def test_burn_in_counts_optimizer_steps():
    l = _losses()
    wt = LinUpper(burn_in=2)
    for _ in range(2):
        torch.testing.assert_close(wt(l), torch.ones_like(l))
        wt.step()
    torch.testing.assert_close(wt(l), naive(l, "linupper", 0.4))
    state = wt.state_dict()
    fresh = LinUpper(burn_in=2)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(l), wt(l))
    with pytest.raises(ValueError, match="r=0.4 \\(constructed 1.0\\)"):
        LinUpper(r=1.0, burn_in=2).load_state_dict(state)


def test_token_counts_give_the_token_weighted_mean_when_uniform():
    l = _losses(6)
    n = torch.tensor([3, 10, 1, 7, 4, 5])
    wt = LinUpper(burn_in=5)
    w = wt(l, lengths=n)
    torch.testing.assert_close((w * l).mean(),
                               (n * l).sum() / n.sum())
    wt2 = Quadratic(burn_in=0)
    torch.testing.assert_close(wt2(l, lengths=n), naive(l, "quadratic", 1.0) * n / n.double().mean())
    with pytest.raises(ValueError, match="lengths"):
        wt(l, lengths=n[:3])
    with pytest.raises(ValueError, match="lengths"):
        wt(l, lengths=-n)


def test_weights_are_a_sample_weight_for_any_objective():
    torch.manual_seed(0)
    z = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    ce = losskit.get("cross-entropy", reduction="none")
    per = ce(z, y)
    w = Extremes(burn_in=0)(per)
    loss = losskit.get("gce")(z, y, sample_weight=w)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(Extremes(burn_in=0).loss(per), (w * per).mean())
    with pytest.raises(ValueError, match="sample_weight"):
        losskit.get("gce")(z, y, sample_weight=w[:3])


def test_bad_input():
    with pytest.raises(ValueError, match="r"):
        LinUpper(r=0.0)
    with pytest.raises(ValueError, match="strategy"):
        LossReweighting("mid")
    with pytest.raises(ValueError, match="burn_in"):
        LinUpper(burn_in=-1)
    with pytest.raises(ValueError, match="losses"):
        LinUpper()(torch.rand(3, 2))
    with pytest.raises(ValueError, match="losses"):
        LinUpper()(torch.tensor([1.0, math.inf]))
    assert LinUpper(burn_in=0)(torch.zeros(0)).shape == (0,)


# ----------------------------------------------------------------------------- two gloo processes

SIZES = [5, 9]


def _worker(rank, world, port, outdir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    l_all = _losses(sum(SIZES), seed=3)
    n_all = torch.arange(1, sum(SIZES) + 1)
    sl = slice(sum(SIZES[:rank]), sum(SIZES[:rank + 1]))
    out = {}
    for name in ("linupper", "quadratic", "extremes"):
        wt = losskit.get(name, burn_in=0)
        out[name] = wt(l_all[sl])
        out[name + "+lengths"] = wt(l_all[sl], lengths=n_all[sl])
    torch.save(out, os.path.join(outdir, f"r{rank}.pt"))


def test_two_processes_give_the_weights_of_one_process_on_the_joined_batch(run_gloo):
    res = run_gloo(_worker, 2)
    l_all = _losses(sum(SIZES), seed=3)
    n_all = torch.arange(1, sum(SIZES) + 1)
    for name in ("linupper", "quadratic", "extremes"):
        one = losskit.get(name, burn_in=0)
        torch.testing.assert_close(torch.cat([res[0][name], res[1][name]]), one(l_all), msg=name)
        torch.testing.assert_close(torch.cat([res[0][name + "+lengths"], res[1][name + "+lengths"]]),
                                   one(l_all, lengths=n_all), msg=name)


@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes"])
def test_device_path_without_host_read_matches(strategy):
    """The range kept as 0-d tensors (the path of an accelerator with tensor checks off) gives the
    weights of the path that reads it (CPU, or checks on), and both the paper's."""
    from losskit.weighting.loss_based import loss_reweighting_weights

    l = _losses(32, seed=4)
    for dtype in (torch.float64, torch.float32):
        x = l.to(dtype)
        dev = loss_reweighting_weights(x, strategy, r=0.4, delta=2.0)
        host = LossReweighting(strategy, r=0.4, delta=2.0, burn_in=0)(x)
        assert dev.dtype == host.dtype == dtype
        torch.testing.assert_close(dev, host)
        torch.testing.assert_close(dev.double(), naive(l, strategy, 0.4, 2.0), rtol=1e-5, atol=1e-5)
    with losskit.tensor_checks(False):       # CPU: the read stays (no device to wait for), the values too
        torch.testing.assert_close(LossReweighting(strategy, burn_in=0)(l), naive(l, strategy, LossReweighting(
            strategy).r))
