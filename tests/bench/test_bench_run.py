import json

import pytest
import torch

from losskit.bench.config import BenchConfig, BenchConfigError
from losskit.bench.runner import run_bench
from losskit.bench.store import cell_path


def _cfg(objectives, **kw):
    base = dict(objectives=list(objectives), seeds=2, epochs=2, embedding_dim=8, batch_size=8, device="cpu")
    base.update(kw)
    return BenchConfig(**base)


def _snapshot(out):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "cells").glob("*.json")}


def test_run_folder_contents(tmp_path, tiny, fakes):
    out = tmp_path / "run"
    run = run_bench(_cfg(["softmax", "fake-pair", "fake-proxy"]), out, progress=False, log=lambda s: None,
                    data=tiny)
    assert run.complete and not run.failed and len(run.computed) == 6
    for name in ("config.json", "results.json", "cells.csv", "summary.csv", "leaderboard.txt"):
        assert (out / name).stat().st_size > 0, name
    for name in ("metrics.png", "similarity_hist.png", "training_curves.png", "cost.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    cfg = json.loads((out / "config.json").read_text())["protocol"]
    assert cfg["objectives"] == ["softmax", "fake-pair", "fake-proxy"] and cfg["epochs"] == 2
    assert cfg["hparams"]["fake-pair"] == {"margin": 0.5, "scale": 1.0, "reduction": "mean"}
    text = (out / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: undefined values are null
    res = json.loads(text)
    assert res["complete"] and len(res["cells"]) == 6 and len(res["summary"]) == 3
    cell = json.loads(cell_path(out, "fake-proxy", 1).read_text())
    assert len(cell["epoch_loss"]) == 2 and cell["objective_params"] == 4 * 8
    assert 0 <= cell["metrics"]["recall@1"] <= 1 and cell["peak_memory_mb"] > 0
    n_test = len(tiny.test_y)
    assert sum(cell["hist"]["genuine"]) + sum(cell["hist"]["impostor"]) == n_test * (n_test - 1) // 2
    assert (out / "cells.csv").read_text().count("\n") == 7
    assert "softmax" in run.leaderboard and "fake-proxy" in run.leaderboard


def test_same_init_and_batches_for_every_objective(tmp_path, tiny, fakes):
    # with identical objectives (hparams equal) the cells must be identical: nothing else varies
    run = run_bench(_cfg(["fake-pair", "fake-trap"], seeds=1), tmp_path / "r", progress=False,
                    plots=False, log=lambda s: None, data=tiny)
    a, b = sorted(run.cells, key=lambda c: c["objective"])
    assert a["epoch_loss"] == b["epoch_loss"]
    assert json.dumps(a["metrics"], sort_keys=True) == json.dumps(b["metrics"], sort_keys=True)


def test_interrupt_then_resume_keeps_finished_cells(tmp_path, tiny, fakes):
    trap = fakes
    trap.exc, trap.after = KeyboardInterrupt(), 2  # fake-trap's second cell (seed 1) is "Ctrl-C"
    out = tmp_path / "run"
    cfg = _cfg(["softmax", "fake-pair", "fake-trap"])
    run = run_bench(cfg, out, progress=False, plots=False, log=lambda s: None, data=tiny)
    assert run.interrupted and not run.complete
    assert len(run.computed) == 5 and ("fake-trap", 1) not in run.computed
    before = _snapshot(out)
    assert len(before) == 5
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is False and res["missing"] == [["fake-trap", 1]]
    assert "INCOMPLETE" in run.leaderboard and "--resume" in run.leaderboard

    trap.exc = None
    run2 = run_bench(_cfg(["softmax", "fake-pair", "fake-trap"]), out, resume=True, progress=False,
                     log=lambda s: None, data=tiny)
    assert run2.computed == [("fake-trap", 1)]  # only the missing cell ran
    assert run2.complete and not run2.interrupted
    after = _snapshot(out)
    assert {k: after[k] for k in before} == before  # finished cells untouched (bytes and mtime)
    full = run_bench(_cfg(["softmax", "fake-pair", "fake-trap"]), tmp_path / "full", progress=False, plots=False,
                     log=lambda s: None, data=tiny)  # the same run, never interrupted
    resumed = json.loads(cell_path(out, "fake-trap", 1).read_text())
    (same,) = [c for c in full.cells if (c["objective"], c["seed"]) == ("fake-trap", 1)]
    assert resumed["epoch_loss"] == same["epoch_loss"]
    assert json.loads((out / "results.json").read_text())["complete"] is True

    # a third call has nothing left to do
    run3 = run_bench(_cfg(["softmax", "fake-pair", "fake-trap"]), out, resume=True, progress=False,
                     plots=False, log=lambda s: None, data=tiny)
    assert run3.computed == [] and _snapshot(out) == after


def test_cells_do_not_depend_on_what_ran_before(tmp_path, tiny, fakes):
    # an objective drawing random numbers gives the same cell alone, after others, or resumed
    alone = run_bench(_cfg(["fake-noisy"], seeds=1), tmp_path / "a", progress=False, plots=False,
                      log=lambda s: None, data=tiny).cells[0]
    torch.rand(1000)
    after = run_bench(_cfg(["fake-pair", "fake-proxy", "fake-noisy"], seeds=1), tmp_path / "b", progress=False,
                      plots=False, log=lambda s: None, data=tiny).cells[-1]
    assert after["objective"] == "fake-noisy"
    assert alone["epoch_loss"] == after["epoch_loss"]
    assert json.dumps(alone["metrics"], sort_keys=True) == json.dumps(after["metrics"], sort_keys=True)


def test_crash_in_one_cell_keeps_others_and_resume_retries(tmp_path, tiny, fakes):
    trap = fakes
    trap.exc, trap.after = RuntimeError("boom"), 1
    out = tmp_path / "run"
    run = run_bench(_cfg(["fake-pair", "fake-trap"]), out, progress=False, plots=False, log=lambda s: None,
                    data=tiny)
    assert set(run.failed) == {("fake-trap", 0), ("fake-trap", 1)} and "boom" in run.failed[("fake-trap", 0)]
    assert (out / "cells" / "fake-trap__seed0.error.txt").exists()
    assert sorted(run.computed) == [("fake-pair", 0), ("fake-pair", 1)]
    assert "FAILED" in run.leaderboard
    trap.exc = None
    run2 = run_bench(_cfg(["fake-pair", "fake-trap"]), out, resume=True, progress=False, plots=False,
                     log=lambda s: None, data=tiny)
    assert sorted(run2.computed) == [("fake-trap", 0), ("fake-trap", 1)] and run2.complete
    assert not (out / "cells" / "fake-trap__seed0.error.txt").exists()


def test_resume_refuses_a_different_config(tmp_path, tiny, fakes):
    out = tmp_path / "run"
    run_bench(_cfg(["fake-pair"], seeds=1, epochs=1), out, progress=False, plots=False, log=lambda s: None,
              data=tiny)
    with pytest.raises(BenchConfigError, match=r"differs(.|\n)*epochs: run has 1, now 2"):
        run_bench(_cfg(["fake-pair"], seeds=1, epochs=2), out, resume=True, log=lambda s: None, data=tiny)
    cfg = _cfg(["fake-pair"], seeds=1, epochs=1, overrides={"fake-pair": {"margin": 0.1}})
    with pytest.raises(BenchConfigError, match=r"hparams\[fake-pair\]"):
        run_bench(cfg, out, resume=True, log=lambda s: None, data=tiny)
    with pytest.raises(BenchConfigError, match="already holds a bench run"):
        run_bench(_cfg(["fake-pair"], seeds=1, epochs=1), out, log=lambda s: None, data=tiny)
    with pytest.raises(BenchConfigError, match="no config.json"):
        run_bench(_cfg(["fake-pair"]), tmp_path / "nothing", resume=True, log=lambda s: None, data=tiny)


def test_diverging_objective_is_reported_not_hidden(tmp_path, tiny, fakes):
    out = tmp_path / "run"
    cfg = _cfg(["fake-pair"], seeds=1, epochs=1, overrides={"fake-pair": {"scale": float("nan")}})
    run = run_bench(cfg, out, progress=False, plots=False, log=lambda s: None, data=tiny)
    assert "CellDiverged" in run.failed[("fake-pair", 0)] and not run.complete


def test_augment_shift_runs(tmp_path, tiny, fakes):
    run = run_bench(_cfg(["fake-pair"], seeds=1, epochs=1, augment="shift"), tmp_path / "r", progress=False,
                    plots=False, log=lambda s: None, data=tiny)
    assert run.complete


def test_progress_without_a_terminal_logs_one_line_per_cell(tmp_path, tiny, fakes):
    # pytest captures stderr, so it is not a terminal: no tqdm bar, one line per finished cell
    lines = []
    run_bench(_cfg(["softmax", "fake-pair"], seeds=1), tmp_path / "r", progress=True, plots=False,
              log=lines.append, data=tiny)
    done = [s for s in lines if s.endswith(" done")]
    assert done == ["bench: [1/2] softmax seed 0 done", "bench: [2/2] fake-pair seed 0 done"]
