"""`--early-stop EPS`: a cell stops once the learning-curve forecaster (docs/theory.md) says its held-out
metric is within EPS of the forecast asymptote; off by default; refused without the held-out curve."""

from __future__ import annotations

import json

import pytest

from losskit.bench.config import BenchConfig, BenchConfigError
from losskit.bench.runner import run_bench
from losskit.bench.store import cell_path
from losskit.bench.tasks.embedding import EmbeddingTask


def _cfg(**kw):
    base = dict(objectives=["fake-pair"], seeds=1, epochs=12, embedding_dim=8, batch_size=8, device="cpu",
                baselines=False)
    base.update(kw)
    return BenchConfig(**base)


@pytest.fixture
def pattern_curve(monkeypatch):
    """The held-out metric follows 0.9 - 0.5 e^-0.8 exactly (a settled curve)."""
    calls = {"n": 0}

    def track(self, cfg, data, trainer, device):
        calls["n"] += 1
        return 0.9 - 0.5 * calls["n"] ** -0.8

    monkeypatch.setattr(EmbeddingTask, "track", track)
    return calls


def test_a_settled_curve_stops_the_cell_early(tmp_path, tiny, fakes, pattern_curve):
    out = tmp_path / "run"
    run_bench(_cfg(early_stop=0.1), out, progress=False, plots=False, log=lambda s: None, data=tiny)
    cell = json.loads(cell_path(out, "fake-pair", 0).read_text())
    stop = cell["stopped_at_epoch"]
    assert 5 <= stop < 12  # trusted needs 3 forecasts of >= 3 points
    assert len(cell["epoch_loss"]) == stop and [e for e, _ in cell["epoch_metric"]] == list(range(1, stop + 1))
    # the criterion: the last value is within epsilon of the asymptote (0.9) by then
    assert 0.9 - cell["epoch_metric"][-1][1] <= 0.1


def test_off_by_default(tmp_path, tiny, fakes, pattern_curve):
    out = tmp_path / "run"
    run_bench(_cfg(epochs=6), out, progress=False, plots=False, log=lambda s: None, data=tiny)
    cell = json.loads(cell_path(out, "fake-pair", 0).read_text())
    assert "stopped_at_epoch" not in cell and len(cell["epoch_loss"]) == 6


def test_needs_the_held_out_curve():
    with pytest.raises(BenchConfigError, match="--early-stop 0.01 needs the held-out curve: --track-every"):
        _cfg(early_stop=0.01, track_every=0).validate()
    with pytest.raises(BenchConfigError, match="--early-stop must be >= 0"):
        _cfg(early_stop=-1.0).validate()
