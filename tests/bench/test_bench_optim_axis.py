"""The bench's optimiser axis: --optimizer and --schedule (a refined run from a
previous run's recorded gradient norms)."""

import json

import pytest

from losskit.bench.config import BenchConfig, BenchConfigError
from losskit.bench.runner import run_bench
from losskit.bench.store import cell_path
from losskit.optim.schedules import refined_factors


def _cfg(**kw):
    base = dict(objectives=["softmax"], seeds=1, epochs=2, embedding_dim=8, batch_size=8, device="cpu")
    base.update(kw)
    return BenchConfig(**base)


def _run(tmp_path, name, tiny, **kw):
    out = tmp_path / name
    run = run_bench(_cfg(**kw), out, progress=False, plots=False, log=lambda s: None, data=tiny)
    assert run.complete and not run.failed
    return out, json.loads(cell_path(out, "softmax", 0).read_text())


def test_optimizers_and_schedules_train_and_are_recorded(tmp_path, tiny):
    losses = {}
    for opt in ("adam", "adamw", "sgd", "frugal"):
        out, cell = _run(tmp_path, opt, tiny, optimizer=opt, schedule="linear-decay", lr=1e-2)
        assert cell["optimizer"] == opt and cell["schedule"] == "linear-decay"
        assert len(cell["grad_norms_l1"]) == cell["steps"] == len(cell["grad_norms_l2"])
        protocol = json.loads((out / "config.json").read_text())["protocol"]
        assert protocol["optimizer"] == opt and protocol["schedule"] == "linear-decay"
        losses[opt] = cell["epoch_loss"]
    assert losses["adam"] != losses["frugal"] != losses["sgd"], "the optimiser changes the training"
    _, const = _run(tmp_path, "const", tiny)
    assert const["schedule"] == "constant" and "grad_norms_l1" not in const


def test_refined_run_uses_the_previous_run_s_norms(tmp_path, tiny):
    first, cell = _run(tmp_path, "lin", tiny, schedule="linear-decay")
    out, ref = _run(tmp_path, "ref", tiny, schedule="refined", refine_from=str(first))
    assert ref["schedule"] == "refined" and ref["epoch_loss"] != cell["epoch_loss"]
    assert refined_factors(cell["grad_norms_l1"], total_steps=cell["steps"])[-1] == 0.0


def test_bad_axis_options_are_clear_errors(tmp_path, tiny):
    with pytest.raises(BenchConfigError, match="--refine-from"):
        _cfg(schedule="cosine", refine_from=str(tmp_path)).validate()
    with pytest.raises(BenchConfigError, match="--optimizer"):
        _cfg(optimizer="lion").validate()
    first, _ = _run(tmp_path, "const", tiny)
    run = run_bench(_cfg(schedule="refined", refine_from=str(first)), tmp_path / "x", progress=False,
                    plots=False, log=lambda s: None, data=tiny)
    assert "has no grad_norms_l1" in run.failed[("softmax", 0)]


def test_an_early_stopped_run_seeds_a_refined_run(tmp_path, tiny, monkeypatch):
    """--early-stop ends a cell before its last step; the runner's on_end hook still copies the
    recorded gradient norms (one per step trained), and --refine-from that run trains."""
    from losskit.bench.tasks.embedding import EmbeddingTask

    calls = {"n": 0}

    def settled(self, cfg, data, trainer, device):  # the held-out metric follows 0.9 - 0.5 n^-0.8
        calls["n"] += 1
        return 0.9 - 0.5 * calls["n"] ** -0.8

    monkeypatch.setattr(EmbeddingTask, "track", settled)
    first, cell = _run(tmp_path, "lin", tiny, schedule="linear-decay", epochs=12, early_stop=0.1, baselines=False)
    stop = cell["stopped_at_epoch"]
    assert stop < 12, "the cell stopped early"
    assert len(cell["grad_norms_l1"]) == len(cell["grad_norms_l2"]) == cell["steps"]
    monkeypatch.undo()
    out, ref = _run(tmp_path, "ref", tiny, schedule="refined", refine_from=str(first), epochs=12, baselines=False)
    assert ref["schedule"] == "refined" and ref["refined_from_steps"] == cell["steps"]
    assert "stopped_at_epoch" not in ref and len(ref["grad_norms_l1"]) == ref["steps"]
    assert ref["steps"] * stop == cell["steps"] * 12, "the early-stopped cell recorded the steps of its epochs"


def test_refined_without_refine_from_trains_a_pilot_run_first(tmp_path, tiny):
    """--schedule refined alone: a linear-decay pilot in OUT/pilot, then the refined cells from its
    norms -- the same cells, bit for bit, as the two runs by hand; --resume trains nothing again."""
    lin, _ = _run(tmp_path, "lin", tiny, schedule="linear-decay", seeds=2, baselines=False)
    _, by_hand = _run(tmp_path, "ref", tiny, schedule="refined", refine_from=str(lin), seeds=2)
    logs = []
    out = tmp_path / "auto"
    run = run_bench(_cfg(schedule="refined", seeds=2), out, progress=False, plots=False, log=logs.append, data=tiny)
    assert run.complete and not run.failed and any("pilot run" in m for m in logs)
    for seed in (0, 1):
        pilot = json.loads(cell_path(out / "pilot", "softmax", seed).read_text())
        mine = json.loads(cell_path(lin, "softmax", seed).read_text())
        assert pilot["schedule"] == "linear-decay" and pilot["grad_norms_l1"] == mine["grad_norms_l1"]
    auto = json.loads(cell_path(out, "softmax", 0).read_text())
    assert auto["schedule"] == "refined" and auto["epoch_loss"] == by_hand["epoch_loss"]
    assert auto["metrics"] == by_hand["metrics"]
    protocol = json.loads((out / "config.json").read_text())["protocol"]
    assert protocol["schedule"] == "refined" and protocol["refine_from"] is None
    cell_path(out, "softmax", 1).unlink()  # resume: the pilot is complete, one refined cell is missing
    logs.clear()
    again = run_bench(_cfg(schedule="refined", seeds=2), out, resume=True, progress=False, plots=False,
                      log=logs.append, data=tiny)
    assert again.complete and again.computed == [("softmax", 1)]
    assert any("pilot: resuming" in m and "0 to run" in m for m in logs)
