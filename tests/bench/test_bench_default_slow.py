import time

import pytest

from losskit.bench.objectives import default_objectives
from losskit.cli import main


@pytest.mark.slow
def test_default_bench_runs_in_under_three_minutes(tmp_path, monkeypatch, capsys):
    # the README's main job: `losskit bench` with no arguments (digits, every objective, 3 seeds)
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    rc = main(["bench", "--no-progress"])
    wall = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert rc == 0
    for name in default_objectives():
        assert f" {name} " in out
    (run,) = (tmp_path / "runs").iterdir()
    assert len(list((run / "cells").glob("*.json"))) == 3 * len(default_objectives())
    assert len(list((run / "plots").glob("*.png"))) == 4
    assert wall < 180, f"default bench took {wall:.0f} s"
