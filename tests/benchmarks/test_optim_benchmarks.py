"""Smoke tests of benchmarks/optim_charlm.py and benchmarks/ignite_offline.py (slow: subprocesses)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
ENV = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}


@pytest.mark.slow
def test_charlm_benchmark_runs(tmp_path):
    raw = tmp_path / "raw.json"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "optim_charlm.py"), "--steps", "24",
                          "--seeds", "1", "--threads", "1", "--update-gap", "5", "--contenders", "adamw",
                          "frugal-block", "frugal-svd", "--schedules", "--json", str(raw)],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stderr
    assert "| frugal-svd |" in out.stdout and "| refined (from linear-decay) |" in out.stdout
    rows = {r["optimizer"]: r for r in json.loads(raw.read_text())["rows"]}
    assert rows["frugal-block"]["state_bytes"] < 0.5 * rows["adamw"]["state_bytes"]
    table = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "optim_charlm.py"), "--state-table"],
                           capture_output=True, text=True, timeout=600, env=ENV)
    assert table.returncode == 0, table.stderr
    tiny = next(line for line in table.stdout.splitlines() if line.startswith("| 64, 2, 256 |")).split(" | ")
    # the state from the parameter split (no training) is the measured peak of the run above
    assert int(tiny[3].replace(",", "")) == rows["adamw"]["state_bytes"]
    for col, name in ((5, "frugal-block"), (7, "frugal-svd")):
        assert float(tiny[col]) == round(rows[name]["state_bytes"] / rows["adamw"]["state_bytes"], 3)


@pytest.mark.slow
def test_ignite_benchmark_runs(tmp_path):
    raw = tmp_path / "raw.json"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ignite_offline.py"), "--seeds", "2",
                          "--epochs", "2", "--tasks", "random-net", "--json", str(raw)],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stderr
    rows = json.loads(raw.read_text())
    assert [r["variant"] for r in rows] == ["plain (no IGNITE)", "IGNITE (eta 0.001)"]
    assert all(0 <= v <= 1.5 for r in rows for v in r["p100"])
