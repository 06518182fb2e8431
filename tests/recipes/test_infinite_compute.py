"""The infinite-compute recipe: neighbour search, ensembles, power-law fits, distillation; the text corpus."""

import math

import pytest
import torch
from torch import nn

import losskit
from losskit.data.text import char_corpus, stdlib_text
from losskit.recipes.infinite_compute import (PAPER_GRID, ensemble_logits, fit_power_law, gain_kept,
                                              member_hparams, neighbour_search, neighbours,
                                              run_ensemble_distillation, run_regularized_search,
                                              sample_autoregressive)

GRID = {"lr": (1, 2, 3, 4, 5), "wd": (0, 1, 2, 3)}


def bowl(opt):
    calls = []

    def f(p):
        calls.append(dict(p))
        return (p["lr"] - opt[0]) ** 2 + (p["wd"] - opt[1]) ** 2 + 0.1 * p["lr"] * p["wd"]
    return f, calls


def naive_certified(f, grid, point):
    """Every one-step neighbour (one coordinate one index away) strictly worse."""
    v = f(point)
    for k, vals in grid.items():
        i = vals.index(point[k])
        for j in (i - 1, i + 1):
            if 0 <= j < len(vals) and f({**point, k: vals[j]}) <= v:
                return False
    return True


def test_neighbours_are_one_step_along_one_coordinate():
    nb = neighbours({"lr": 1, "wd": 2}, GRID)
    assert nb == [{"lr": 2, "wd": 2}, {"lr": 1, "wd": 1}, {"lr": 1, "wd": 3}]


@pytest.mark.parametrize("start", [{"lr": 1, "wd": 0}, {"lr": 5, "wd": 3}, {"lr": 3, "wd": 1}])
def test_search_stops_at_a_certified_point_and_caches(start):
    f, calls = bowl((3.2, 1.1))
    r = neighbour_search(f, GRID, start)
    assert len(calls) == len({tuple(c.values()) for c in calls}) == r.num_evaluations  # each point once
    assert r.certified and naive_certified(f, GRID, r.best)
    brute = min(({"lr": a, "wd": b} for a in GRID["lr"] for b in GRID["wd"]), key=f)
    assert r.best == brute  # a convex bowl: the local certificate is the global optimum
    assert r.path[0] == start and r.path[-1] == r.best


def test_search_reports_edges_ties_and_budget():
    f, _ = bowl((9.0, 1.0))  # optimum beyond the lr grid
    r = neighbour_search(f, GRID, {"lr": 1, "wd": 1})
    assert r.best["lr"] == 5 and "lr" in r.at_edge
    flat = neighbour_search(lambda p: 0.0, GRID, {"lr": 3, "wd": 1})
    assert not flat.certified and flat.num_evaluations == 5  # ties: not better, not certified
    short = neighbour_search(f, GRID, {"lr": 1, "wd": 1}, max_evaluations=3)
    assert not short.certified and short.num_evaluations == 3
    with pytest.raises(ValueError, match="start\\['lr'\\]: expected one of the grid's values"):
        neighbour_search(f, GRID, {"lr": 7, "wd": 1})
    with pytest.raises(ValueError, match="NaN"):
        neighbour_search(lambda p: float("nan"), GRID, {"lr": 1, "wd": 1})


def test_registered_search_defaults_to_the_paper_grid():
    r = losskit.get("regularized-recipe-search", max_evaluations=200)
    res = r(lambda p: (math.log10(p["lr"]) + 2.5) ** 2 + (p["weight_decay"] - 0.8) ** 2
            + (math.log2(p["epochs"]) - 3) ** 2)
    assert res.best == {"lr": 3e-3, "weight_decay": 0.8, "epochs": 8} and res.certified
    assert member_hparams(res.best) == {"lr": 3e-3, "weight_decay": 0.4, "epochs": 16}
    assert set(PAPER_GRID["weight_decay"]) >= {0.0, 6.4}


def test_ensemble_averages_logits_not_probabilities():
    torch.manual_seed(0)
    ms = [nn.Linear(3, 4) for _ in range(3)]
    x = torch.randn(5, 3)
    z = ensemble_logits(ms, x)
    ref = sum(m(x) for m in ms) / 3
    assert torch.allclose(z, ref.detach(), atol=1e-6)
    probs = sum(torch.softmax(m(x), -1) for m in ms) / 3
    assert not torch.allclose(torch.softmax(z, -1), probs.detach(), atol=1e-4)
    assert torch.equal(ensemble_logits(torch.stack([m(x) for m in ms]).detach()), z)


def naive_power_law(n, y, alphas):
    """Grid over alpha; for each, A and E by ordinary least squares (closed form), A, E >= 0."""
    best = None
    for a in alphas:
        f = [v ** -a for v in n]
        m = len(n)
        fm, ym = sum(f) / m, sum(y) / m
        cov = sum((fi - fm) * (yi - ym) for fi, yi in zip(f, y))
        var = sum((fi - fm) ** 2 for fi in f)
        A = max(cov / var, 0.0)
        E = max(ym - A * fm, 0.0)
        sse = sum((A * fi + E - yi) ** 2 for fi, yi in zip(f, y))
        if best is None or sse < best[0]:
            best = (sse, A, a, E)
    return best


def test_power_law_fit_recovers_parameters_and_matches_a_grid_search():
    pytest.importorskip("scipy")
    n = torch.tensor([1e3, 2e3, 4e3, 8e3, 16e3, 32e3], dtype=torch.float64)
    y = 50.0 / n ** 0.6 + 1.7
    g = torch.Generator().manual_seed(0)
    yn = y + 0.002 * torch.randn(6, generator=g, dtype=torch.float64)
    fit = fit_power_law(n, yn, bootstrap=50)
    sse, A, a, E = naive_power_law(n.tolist(), yn.tolist(), [0.3 + 0.001 * k for k in range(700)])
    assert fit.alpha == pytest.approx(a, abs=0.01) and fit.E == pytest.approx(E, abs=0.01)
    assert fit.E == pytest.approx(1.7, abs=0.02) and fit.alpha == pytest.approx(0.6, abs=0.08)
    lo, hi = fit.intervals["E"]
    assert lo <= fit.E <= hi and hi - lo < 0.1 and fit.bootstrap == 50
    assert torch.allclose(fit.predict(n), yn, atol=0.01)
    # bounds hold: data that would want a negative asymptote get E = 0
    neg = fit_power_law(n, 50.0 / n ** 0.6 - 0.05, bootstrap=0)
    assert 0.0 <= neg.E < 1e-9 and neg.A >= 0


def test_power_law_bad_input():
    pytest.importorskip("scipy")
    with pytest.raises(ValueError, match="at least 3 points with distinct N, got 2"):
        fit_power_law([1, 2, 2], [3.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="one value per N"):
        fit_power_law([1, 2, 3], [3.0, 2.0])
    with pytest.raises(ValueError, match="bounds"):
        fit_power_law([1, 2, 3], [3.0, 2.0, 1.5], bounds=((1, 1, 1), (0, 0, 0)))


def test_autoregressive_sampling_and_distillation():
    torch.manual_seed(0)
    V, k = 5, 3
    teacher = nn.Sequential(nn.Embedding(V, 4), nn.Flatten(), nn.Linear(4 * k, V))
    prompt = torch.randint(V, (4, k))
    seq = sample_autoregressive(teacher, prompt, 10, context=k, generator=torch.Generator().manual_seed(1))
    assert seq.shape == (4, 13) and torch.equal(seq[:, :k], prompt)
    windows = seq.unfold(1, k + 1, 1).reshape(-1, k + 1)
    student = nn.Sequential(nn.Embedding(V, 2), nn.Flatten(), nn.Linear(2 * k, V))
    real = (torch.randint(V, (20, k)), torch.randint(V, (20,)))
    log = losskit.get("ensemble-distillation", epochs=3, batch_size=10)(student, real,
                                                                         (windows[:, :k], windows[:, k]))
    assert log.steps == 3 * math.ceil(40 / 0.9 / 10) and log.examples == log.steps * 10
    assert gain_kept(3.0, 2.0, 2.2) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="ensemble"):
        gain_kept(2.0, 2.5, 2.2)


def test_stdlib_corpus_is_deterministic_and_split():
    a = stdlib_text(("json", "textwrap"))
    assert a == stdlib_text(("json", "textwrap")) and "JSON" in a and len(a) > 1000
    c = char_corpus(a, val_fraction=0.2)
    assert c.decode(torch.cat([c.train, c.val])) == a
    assert abs(len(c.val) - 0.2 * len(a)) <= 1 and c.vocab == sorted(set(a))
    with pytest.raises(ValueError, match="val_fraction"):
        char_corpus(a, val_fraction=1.0)
