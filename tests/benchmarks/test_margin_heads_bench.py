"""Smoke test of benchmarks/margin_heads.py on a tiny configuration (slow: subprocesses)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.mark.slow
def test_margin_heads_benchmark_runs():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "margin_heads.py"), "--batch", "8",
                          "--classes", "50", "--dim", "8", "--reps", "1", "--warmup", "0", "--threads", "1",
                          "--contenders", "floor", "chunked", "pml"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| 8 | 50 | chunked |" in out.stdout and "pml / chunked" in out.stdout
