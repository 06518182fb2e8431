"""The Flower app folder ``examples/flower-app`` under Flower's simulation engine (Ray):
a SuperLink started with ``--simulation``, virtual SuperNodes in Ray actors, ``flwr run``.
Skipped where Ray (``losskit[simulation]``) is absent.  Every process the run started
(the SuperLink's detached SuperExec, ``flwr-simulation``, Ray's processes) is checked gone.

Slow: one run takes about 40-90 s on the shared 2-core machine (Ray's start-up)."""

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("sklearn")

from losskit.integrations.flower.loopback import Loopback, live_pids, simulation_available  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"


@pytest.mark.slow
@pytest.mark.skipif(not simulation_available(),
                    reason="Flower's simulation engine needs Ray: pip install 'losskit[simulation]'")
def test_simulation_engine_three_virtual_nodes_fedld(tmp_path):
    fed = Loopback(3, workdir=tmp_path / "sim", simulation=True, client_cpus=1)
    with fed:
        assert fed.alive() == ["superlink"]  # no SuperNode processes: the nodes are virtual
        res = fed.run(APP, {"out-dir": str(tmp_path / "out"), "algorithm": "fedld", "num-server-rounds": 2,
                            "lr": 0.1}, timeout=420)
        tree = fed.process_tree()
        logs = fed.logs()
        ray_dir = fed.ray_tmpdir
        ran_ray = any(ray_dir.rglob("session_*"))
    assert not live_pids(tree), "processes left running after stop()"
    assert res.returncode == 0, res.stdout[-3000:] + logs
    assert (tmp_path / "out" / "result.json").exists(), res.stdout[-3000:]  # flwr run exits 0 on a crash too
    assert "Starting Flower Simulation" in res.stdout and "3 simulated SuperNodes" in res.stdout
    assert ran_ray, f"Ray did not run (no session under RAY_TMPDIR={ray_dir})"
    if not str(ray_dir).startswith(str(tmp_path)):  # pytest's tmp_path is too long for Ray's sockets
        assert not ray_dir.exists(), "stop() left its own Ray temp folder"
    rounds = json.loads((tmp_path / "out" / "result.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert len(r["accepted"]) == 3 and not r["failures"] and not r["rejected"]
    assert rounds[1]["loss"] < rounds[0]["loss"]


def test_simulation_refuses_node_configs_and_bad_cpus():
    with pytest.raises(ValueError, match="node_configs"):
        Loopback(2, simulation=True, node_configs=[{"losskit-fault": "crash"}, {}])
    with pytest.raises(ValueError, match="client_cpus"):
        Loopback(2, simulation=True, client_cpus=2, ray_cpus=1)
