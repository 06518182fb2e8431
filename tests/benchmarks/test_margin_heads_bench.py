"""Smoke test of benchmarks/margin_heads.py on a tiny configuration (slow: subprocesses)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.mark.slow
def test_margin_heads_benchmark_runs(tmp_path):
    raw = tmp_path / "raw.json"
    B, C, D = 8, 2000, 64
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "margin_heads.py"), "--batch", str(B),
                          "--classes", str(C), "--dim", str(D), "--reps", "1", "--warmup", "0", "--threads", "1",
                          "--contenders", "floor", "chunked", "fused", "pml", "--json", str(raw)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| 8 | 2000 | chunked |" in out.stdout and "pml / chunked" in out.stdout and "pml / fused" in out.stdout
    rows = {r["contender"]: r for r in json.loads(raw.read_text())}
    floor_bytes = (2 * C * D + B * D) * 4
    for name in ("floor", "chunked", "fused", "pml"):
        # every contender holds W, its gradient and the embeddings at the end of a step
        assert rows[name]["tensor_peak"] >= floor_bytes, (name, rows[name])
        assert rows[name]["peak"] > 0
    # the floor also holds its B x C upstream gradient and output
    assert rows["floor"]["tensor_peak"] >= floor_bytes + 2 * B * C * 4
