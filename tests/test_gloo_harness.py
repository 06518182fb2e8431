"""The two-process harness of tests/conftest.py (``run_gloo``): a rank that dies of a signal is
run again once with a warning; a Python exception in a rank fails at once, naming it; a rank that
crashes twice fails with both tries' stacks."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist


def _init(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


def _sum_worker(rank, world, port, outdir):
    _init(rank, world, port)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    flag = os.environ["LOSSKIT_TEST_FLAG"]
    if rank == 1 and os.environ.get("LOSSKIT_TEST_MODE") == "abort-always":
        os.abort()
    if rank == 1 and os.environ.get("LOSSKIT_TEST_MODE") == "abort-once" and not os.path.exists(flag):
        open(flag, "w").close()
        os.abort()
    if rank == 1 and os.environ.get("LOSSKIT_TEST_MODE") == "raise":
        raise ValueError("rank 1 broke on purpose")
    torch.save(t, os.path.join(outdir, f"r{rank}.pt"))


def _env(monkeypatch, tmp_path, mode):
    monkeypatch.setenv("LOSSKIT_TEST_FLAG", str(tmp_path / "crashed-once"))
    monkeypatch.setenv("LOSSKIT_TEST_MODE", mode)


def test_a_rank_killed_by_a_signal_is_run_again_once_with_a_warning(run_gloo, monkeypatch, tmp_path):
    _env(monkeypatch, tmp_path, "abort-once")
    with pytest.warns(RuntimeWarning, match=r"(?s)died of a signal.*SIGABRT.*Fatal Python error: Aborted"):
        out = run_gloo(_sum_worker, 2, timeout=120)
    assert [float(t) for t in out] == [3.0, 3.0]
    assert (tmp_path / "crashed-once").exists()


def test_a_python_exception_in_a_rank_fails_at_once(run_gloo, monkeypatch, tmp_path):
    _env(monkeypatch, tmp_path, "raise")
    with pytest.raises(Exception, match="rank 1 broke on purpose"):
        run_gloo(_sum_worker, 2, timeout=120)


def test_a_rank_that_crashes_twice_fails_with_both_tries(run_gloo, monkeypatch, tmp_path):
    _env(monkeypatch, tmp_path, "abort-always")
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match=r"(?s)try 1 of 2.*try 2 of 2"):
        run_gloo(_sum_worker, 2, timeout=120)
