"""Pure margin transforms on cosine logits."""

import math

import pytest
import torch

from losskit.functional import margins as FM


def test_elastic_plus_worked_example_intended_and_legacy():
    cos = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7])
    drawn = torch.tensor([0.50, 0.40, 0.60, 0.45, 0.55])   # any order: only the multiset matters
    intended = FM.assign_elastic_margins(cos, drawn)
    torch.testing.assert_close(intended, torch.tensor([0.60, 0.40, 0.50, 0.55, 0.45]))
    legacy = FM.assign_elastic_margins(cos, drawn, legacy_permutation=True)
    torch.testing.assert_close(legacy, torch.tensor([0.45, 0.60, 0.50, 0.55, 0.40]))


def test_elastic_logits_functional_paths():
    torch.manual_seed(0)
    cos = torch.rand(6, 10) * 2 - 1
    y = torch.tensor([0, 3, -1, 9, 3, 5])
    m = torch.full((6,), 0.5)
    torch.testing.assert_close(FM.elastic_arcface_logits(cos, y, margins=m), FM.arcface_logits(cos, y, 0.5))
    torch.testing.assert_close(FM.elastic_cosface_logits(cos, y, margins=m - 0.15),
                               FM.cosface_logits(cos, y, 0.35))
    out = FM.elastic_arcface_logits(cos, y, std=0.0, plus=True)
    torch.testing.assert_close(out, FM.arcface_logits(cos, y, 0.5))
    # the ignored row is untouched (only scaled)
    torch.testing.assert_close(out[2], cos[2] * 64)


def test_arcface_logits_values_and_easy_margin():
    cos = torch.tensor([[0.5, 0.1], [-0.2, 0.3], [-0.95, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0])
    out = FM.arcface_logits(cos, y, 0.5, scale=1.0)
    assert out[0, 0] == pytest.approx(math.cos(math.acos(0.5) + 0.5))
    assert out[1, 0] == pytest.approx(math.cos(math.acos(-0.2) + 0.5))
    assert out[2, 0] == pytest.approx(-0.95 - 0.5 * math.sin(0.5))      # theta + m > pi
    assert out[0, 1] == pytest.approx(0.1)
    easy = FM.arcface_logits(cos, y, 0.5, scale=1.0, easy_margin=True)
    assert easy[1, 0] == pytest.approx(-0.2) and easy[0, 0] == pytest.approx(out[0, 0])


def test_cfcd_logits_and_margin_cross_entropy():
    torch.manual_seed(1)
    cos = torch.rand(9, 30, dtype=torch.float64) * 0.6 - 0.3
    y = torch.randint(0, 30, (9,))
    cos[torch.arange(9), y] = torch.linspace(0.3, 0.9, 9, dtype=torch.float64)
    logits, s, m = FM.cfcd_logits(cos, y, alpha=0.05)
    assert float(m) > 0
    p = torch.softmax(logits, 1)[torch.arange(9), y]
    k = int(torch.median(cos[torch.arange(9), y], 0).indices)
    assert float(p[k]) == pytest.approx(0.05, rel=1e-9)
    _, _, m_eval = FM.cfcd_logits(cos, y, alpha=0.05, training=False)
    assert float(m_eval) == 0.0
    # extra columns folded into one log-sum-exp == appended columns
    extra = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64) * 10
    a = FM.margin_cross_entropy(logits, y, "none", extra_logits=extra)
    full = torch.cat([logits, extra.expand(9, 3)], 1)
    b = torch.nn.functional.cross_entropy(full, y, reduction="none")
    torch.testing.assert_close(a, b)


def test_unpg_negatives_filtering_and_empty():
    x = torch.randn(5, 4)
    assert FM.unpg_negatives(x, torch.zeros(5, dtype=torch.long)).numel() == 0
    y = torch.arange(5)
    allv = FM.unpg_negatives(x, y, whisker=1e9)
    assert allv.numel() == 10
    narrow = FM.unpg_negatives(x, y, whisker=0.0)
    srt = torch.sort(allv).values
    q1, q3 = srt[2], srt[7]
    assert bool(((narrow >= q1) & (narrow <= q3)).all()) and narrow.numel() == int(((allv >= q1) & (allv <= q3)).sum())


def test_combined_target_continuous_and_monotone():
    c = torch.linspace(-1, 0.9, 2001, dtype=torch.float64)   # acos is steep near 1
    psi = FM.combined_target(c, 1.3, 0.2, 0.1)
    assert bool((psi[1:] >= psi[:-1] - 1e-12).all())
    assert float((psi[1:] - psi[:-1]).abs().max()) < 0.01
    with pytest.raises(ValueError, match="margin"):
        FM.arcface_target(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="alpha"):
        FM.cfcd_scale(torch.zeros(3), 0.0)
