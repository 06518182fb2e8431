"""KLoM against a naive reference written from the paper's definition (loops)."""

import math

import numpy as np
import pytest
import torch

from losskit.metrics import KLoMAccumulator, binned_kl, klom, klom_summary, margins_from_logits


def naive_margin(z, y):
    others = [math.exp(v) for j, v in enumerate(z) if j != y]
    return z[y] - math.log(sum(others))


def naive_klom(p, q, bins=20, eps=1e-5, clip=100.0):
    """KL(p || q) of two lists of margins: clip, 20 bins over the joint range (last bin closed), floor, KL."""
    p = [min(max(v, -clip), clip) for v in p]
    q = [min(max(v, -clip), clip) for v in q]
    lo, hi = min(p + q), max(p + q)
    if hi <= lo:
        return 0.0
    edges = [lo + (hi - lo) * k / bins for k in range(bins)] + [hi]

    def count(s):
        c = [0] * bins
        for v in s:
            for b in range(bins):
                last = b == bins - 1
                if edges[b] <= v < edges[b + 1] or (last and v == edges[b + 1]):
                    c[b] += 1
                    break
        assert sum(c) == len(s)
        return [x / len(s) for x in c]

    ph, qh = count(p), count(q)
    qh = [max(qb, eps) if pb > 0 else qb for pb, qb in zip(ph, qh)]
    tot = sum(qh)
    qh = [x / tot for x in qh]
    return sum(pb * math.log(pb / qb) for pb, qb in zip(ph, qh) if pb > 0)


def test_margins_match_the_definition():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(5, (7,), generator=g)
    m = margins_from_logits(z, y)
    assert m.shape == (3, 7)
    for a in range(3):
        for t in range(7):
            assert m[a, t].item() == pytest.approx(naive_margin(z[a, t].tolist(), int(y[t])), abs=1e-12)


@pytest.mark.parametrize("shift", [0.0, 0.7, 3.0])
def test_klom_matches_naive_reference(shift):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(30, 6, generator=g, dtype=torch.float64) + shift
    o = torch.randn(25, 6, generator=g, dtype=torch.float64) * 1.5
    got = klom(u, o)
    for t in range(6):
        assert got[t].item() == pytest.approx(naive_klom(u[:, t].tolist(), o[:, t].tolist()), rel=1e-10, abs=1e-12)


def test_sample_at_the_maximum_is_counted_unlike_np_digitize():
    # the official np.digitize count drops the sample equal to the joint maximum
    u = torch.tensor([0.0] * 19 + [10.0], dtype=torch.float64)[:, None]
    o = torch.tensor([0.0] * 20, dtype=torch.float64)[:, None]
    ours = klom(u, o).item()
    assert ours == pytest.approx(naive_klom(u[:, 0].tolist(), o[:, 0].tolist()))
    edges = np.linspace(0.0, 10.0, 21)
    dig = np.digitize(u[:, 0].numpy(), edges)
    assert (dig == 21).sum() == 1  # what the official count loop never reads
    assert ours > 0.1  # the outlier is a whole bin of unlearned mass where the oracles have none


def test_direction_is_unlearned_given_oracle():
    g = torch.Generator().manual_seed(2)
    u = torch.randn(40, 1, generator=g, dtype=torch.float64)
    o = torch.cat([torch.randn(20, 1, generator=g, dtype=torch.float64), torch.full((20, 1), 6.0,
                                                                                   dtype=torch.float64)])
    fwd, rev = klom(u, o).item(), klom(o, u).item()
    assert fwd == pytest.approx(naive_klom(u[:, 0].tolist(), o[:, 0].tolist()))
    assert rev == pytest.approx(naive_klom(o[:, 0].tolist(), u[:, 0].tolist()))
    assert abs(fwd - rev) > 1.0  # the sides matter: the official load_klom passes them swapped


def test_identical_samples_give_zero_and_clip_applies():
    x = torch.randn(20, 4, dtype=torch.float64)
    assert torch.allclose(klom(x, x.clone()), torch.zeros(4, dtype=torch.float64))
    big = torch.full((20, 1), 1e6, dtype=torch.float64)
    same = torch.full((20, 1), 100.0, dtype=torch.float64)
    assert klom(big, same).item() == 0.0  # both clipped to 100
    assert klom(torch.full((20, 1), 2.0), torch.full((20, 1), 2.0)).item() == 0.0  # one value: zero width


def test_summary_95th_percentile_per_group_and_accumulator():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(20, 10, generator=g)
    o = torch.randn(20, 10, generator=g) + torch.linspace(0, 3, 10)
    groups = {"forget": torch.arange(3), "retain": torch.arange(3, 8), "validation": torch.arange(8, 10)}
    s = klom_summary(u, o, groups)
    vals = klom(u, o)
    for k, idx in groups.items():
        xs = sorted(vals[idx].tolist())
        pos = 0.95 * (len(xs) - 1)  # linear interpolation between order statistics
        lo = int(math.floor(pos))
        ref = xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)
        assert s[k] == pytest.approx(ref)
    acc = KLoMAccumulator()
    labels = torch.zeros(10, dtype=torch.long)
    for r in range(20):  # margins of two-class logits [m, 0] with label 0 are m
        acc.add_unlearned(torch.stack([u[r].double(), torch.zeros(10, dtype=torch.float64)], 1), labels)
        acc.add_oracle(margins=o[r])
    assert torch.allclose(acc.compute(), vals, atol=1e-9)
    st = acc.state_dict()
    acc2 = KLoMAccumulator(bins=5)
    acc2.load_state_dict(st)
    assert acc2.summary(groups) == pytest.approx(s)


def test_bad_input_is_refused_clearly():
    x = torch.randn(20, 3)
    with pytest.raises(ValueError, match="at least 20 models"):
        klom(torch.randn(5, 3), x)
    with pytest.raises(ValueError, match="oracle: expected at least 20"):
        klom(x, torch.randn(19, 3))
    klom(torch.randn(5, 3), torch.randn(5, 3), bins=5)
    with pytest.raises(ValueError, match="same 3 points"):
        klom(x, torch.randn(20, 4))
    with pytest.raises(ValueError, match="NaN"):
        klom(x, torch.full((20, 3), float("nan")))
    with pytest.raises(ValueError, match="bins"):
        klom(x, x, bins=1)
    with pytest.raises(ValueError, match="labels"):
        margins_from_logits(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="groups"):
        klom_summary(x, x, {"forget": torch.tensor([], dtype=torch.long)})
    acc = KLoMAccumulator()
    with pytest.raises(ValueError, match="no models"):
        acc.compute()
    acc.add_oracle(margins=torch.zeros(3))
    with pytest.raises(ValueError, match="expected 3 points"):
        acc.add_unlearned(margins=torch.zeros(4))


def test_binned_kl_float32_and_bf16_inputs_give_finite():
    g = torch.Generator().manual_seed(4)
    u = torch.randn(20, 5, generator=g)
    o = torch.randn(20, 5, generator=g)
    for dt in (torch.float32, torch.bfloat16):
        v = binned_kl(u.to(dt), o.to(dt))
        assert v.dtype == torch.float64 and torch.isfinite(v).all()
