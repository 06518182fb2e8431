"""Smoke test of benchmarks/comp_sum.py and benchmarks/naive_bayes_crossover.py (slow: subprocesses)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.mark.slow
def test_comp_sum_benchmark_runs():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "comp_sum.py"), "--quick", "--reps", "1",
                          "--warmup", "0", "--threads", "1"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    assert out.returncode == 0, out.stderr
    for row in ("| F.cross_entropy |", "| comp-sum tau=1.5 |", "| arcface fused (tau=1) |", "| reweighted glow |"):
        assert row in out.stdout, out.stdout
