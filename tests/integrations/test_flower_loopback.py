"""A real Flower deployment on 127.0.0.1: one SuperLink, SuperNodes, ``flwr run`` of the
app folder ``examples/flower-app``; insecure and with self-signed TLS.  Every process
the test starts is stopped (process groups, deadlines) and checked gone.

Slow: one run takes 95-120 s on the shared 2-core machine (each round spawns a
ClientApp process per node, which imports torch and scikit-learn)."""

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("sklearn")

from losskit.integrations.flower.loopback import Loopback, live_pids  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"
pytestmark = pytest.mark.slow


def _live_in_groups(pgids):
    """Processes (not zombies) still in the given process groups."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp in pgids and state != "Z":
            out.append(int(d.name))
    return out


def _run(tmp_path, nodes, run_config, tls=False, node_configs=None):
    fed = Loopback(nodes, workdir=tmp_path / "fed", tls=tls, node_configs=node_configs)
    with fed:
        pgids = {os.getpgid(p.pid) for _, p, _ in fed.procs}
        assert len(fed.alive()) == nodes + 1
        res = fed.run(APP, {"out-dir": str(tmp_path / "out"), **run_config}, timeout=420)
        tree = fed.process_tree()  # with the SuperLink's SuperExec, which runs in a session of its own
        logs = fed.logs() + (fed.workdir / "superlink.log").read_text(errors="replace")
    assert not _live_in_groups(pgids), "processes left running after stop()"
    assert not live_pids(tree), "descendants left running after stop()"
    assert res.returncode == 0, res.stdout[-3000:] + logs
    return json.loads((tmp_path / "out" / "result.json").read_text())["rounds"], res, logs


def test_loopback_two_nodes_two_rounds_fedld(tmp_path):
    rounds, res, _ = _run(tmp_path, 2, {"algorithm": "fedld", "num-server-rounds": 2, "lr": 0.1})
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert len(r["accepted"]) == 2 and not r["failures"] and not r["rejected"]
    assert rounds[1]["loss"] < rounds[0]["loss"]  # (accuracy can stay put for a round: 2 skewed clients)
    assert "127.0.0.1" in res.stdout


def test_loopback_tls_with_a_crashing_node(tmp_path):
    rounds, res, logs = _run(tmp_path, 3, {"algorithm": "fedavg", "num-server-rounds": 2, "min-nodes": 3},
                             tls=True, node_configs=[{}, {}, {"losskit-fault": "crash"}])
    assert "https://127.0.0.1" in logs  # the SuperLink served TLS
    for r in rounds:
        assert len(r["accepted"]) == 2 and len(r["failures"]) == 1
    assert rounds[1]["accuracy"] > 0.1


def test_loopback_server_resumes_after_a_kill(tmp_path):
    """Kill the whole deployment (SuperLink, ServerApp, SuperNodes) after round 1 is saved,
    start a new one with the same checkpoint folder: the run continues at round 2."""
    import time

    import torch

    ck = tmp_path / "ck"
    cfg = {"algorithm": "fedavg", "num-server-rounds": 3, "checkpoint-dir": str(ck)}
    fed = Loopback(2, workdir=tmp_path / "fed1")
    with fed:
        pgids = {os.getpgid(p.pid) for _, p, _ in fed.procs}
        run = fed.launch(APP, cfg)
        pgids.add(os.getpgid(run.pid))
        deadline = time.monotonic() + 300
        while not (ck / "server.pt").exists():
            assert run.poll() is None, (tmp_path / "fed1" / "flwr-run.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
    assert not _live_in_groups(pgids)
    saved = torch.load(ck / "server.pt", weights_only=False)
    assert 1 <= saved["round"] < 3
    rounds, res, logs = _run(tmp_path / "second", 2, cfg)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert "resuming" in res.stdout
