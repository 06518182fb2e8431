"""Classification metrics against loop references and scikit-learn."""

import math

import numpy as np
import pytest
import torch

from losskit.metrics.classification import (accuracy, classification_summary, expected_calibration_error, macro_f1,
                                            nll, robust_accuracy)


def _data(n=200, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,), generator=g)
    z[torch.arange(n), y] += 1.5
    return z, y


def naive_ece(z, y, bins):
    p = torch.softmax(z, 1)
    tot = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        rows = [i for i in range(len(y)) if lo < float(p[i].max()) <= hi]
        if rows:
            acc = sum(int(p[i].argmax()) == int(y[i]) for i in rows) / len(rows)
            conf = sum(float(p[i].max()) for i in rows) / len(rows)
            tot += len(rows) / len(y) * abs(acc - conf)
    return tot


def test_against_references():
    skm = pytest.importorskip("sklearn.metrics")
    z, y = _data()
    pred = z.argmax(1).numpy()
    assert accuracy(z, y) == pytest.approx(skm.accuracy_score(y.numpy(), pred))
    assert macro_f1(z, y) == pytest.approx(skm.f1_score(y.numpy(), pred, average="macro"))
    assert nll(z, y) == pytest.approx(skm.log_loss(y.numpy(), torch.softmax(z, 1).numpy(), labels=list(range(6))))
    for bins in (1, 10, 15):
        assert expected_calibration_error(z, y, bins) == pytest.approx(naive_ece(z, y, bins), abs=1e-12)
    s = classification_summary(z, y)
    assert set(s) == {"accuracy", "macro-f1", "nll", "ece"}
    # a class never predicted and never true does not enter macro-F1 (sklearn's labels=None)
    z2 = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    assert macro_f1(z2, torch.tensor([0, 1])) == 1.0


def test_bad_input():
    z, y = _data()
    with pytest.raises(ValueError, match="labels"):
        accuracy(z, y[:5])
    with pytest.raises(ValueError, match="labels"):
        macro_f1(z, torch.full_like(y, 9))
    bad = z.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="logits"):
        nll(bad, y)
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(z, y, 0)


def test_robust_accuracy_drops_with_the_radius_and_restores_the_mode():
    torch.manual_seed(0)
    x = torch.rand(64, 10)
    w = torch.randn(3, 10)
    y = (x @ w.t()).argmax(1)
    model = torch.nn.Linear(10, 3)
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.zero_()
    model.train()
    clean = robust_accuracy(model, x, y, radius=0.0)
    assert clean == 1.0 and model.training
    accs = [robust_accuracy(model, x, y, radius=r, steps=10, generator=torch.Generator().manual_seed(0))
            for r in (0.02, 0.1, 0.3)]
    assert accs[0] >= accs[1] >= accs[2] and accs[2] < 0.5
    assert model.weight.grad is None
    with pytest.raises(ValueError, match="labels"):
        robust_accuracy(model, x, y[:3], radius=0.1)
