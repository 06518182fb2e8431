"""The Flower strategies, ServerApp and ClientApp driven in-process: Flower's own
Message/RecordDict/Context objects, a Grid that hands each message to the ClientApp
handler of its node.  Faults (crash, timeout, NaN, wrong shape), FedLEx's
exploration round and guidance, and resume after a kill."""

import json

import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from losskit.integrations.flower import apps  # noqa: E402
from losskit.integrations.flower.strategies import FedLDStrategy, make_strategy  # noqa: E402


@pytest.fixture(autouse=True)
def _identity():
    """A ServerApp process has a run/node/task identity (Flower sets it); so does this test."""
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


class LocalGrid:
    """Delivers each message to ``apps.client_train`` of its node; a handler that raises
    gives an Error reply (as a SuperNode does), ``losskit-fault=hang`` gives no reply
    (a node that missed the timeout). ``kill_at``: raise KeyboardInterrupt on that round."""

    def __init__(self, node_configs, run_config, kill_at=None):
        self.nodes = {1000 + i: {"partition-id": i, "num-partitions": len(node_configs), **nc}
                      for i, nc in enumerate(node_configs)}
        self.run_config = run_config
        self.kill_at = kill_at
        self.sent = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            rnd = int(m.content["config"]["server-round"])
            if self.kill_at is not None and rnd == self.kill_at:
                raise KeyboardInterrupt("server killed")
            nc = self.nodes[m.metadata.dst_node_id]
            if nc.get("losskit-fault") == "hang":
                continue
            ctx = Context(run_id=1, node_id=m.metadata.dst_node_id, node_config=nc, state=RecordDict(),
                          run_config=self.run_config)
            try:
                out.append(apps.client_train(m, ctx))
            except Exception as e:
                out.append(Message(Error(1, f"ClientApp raised: {e!r}"), reply_to=m))
        return out


RUN = {"num-server-rounds": 2, "min-nodes": 2, "local-epochs": 1, "batch-size": 32, "lr": 0.1, "alpha": 1.0,
       "seed": 0, "hidden": 16}


def _run(tmp_path, algorithm, nodes, name="out", **over):
    cfg = {**apps.DEFAULTS, **RUN, "algorithm": algorithm, "out-dir": str(tmp_path / name), **over}
    grid = LocalGrid(nodes, cfg, kill_at=cfg.pop("kill_at", None))
    apps.server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    return json.loads((tmp_path / name / "result.json").read_text())["rounds"], grid


def test_faulty_nodes_are_recorded_and_rejected(tmp_path, caplog):
    nodes = [{}, {}, {"losskit-fault": "crash"}, {"losskit-fault": "hang"}, {"losskit-fault": "nan"},
             {"losskit-fault": "shape"}]
    with caplog.at_level("WARNING"):
        rounds, _ = _run(tmp_path, "fedavg", nodes, **{"min-nodes": 6})
    for r in rounds:
        assert sorted(r["accepted"]) == [1000, 1001]
        failed = {n: why for n, why in r["failures"]}
        assert "injected crash" in failed[1002] and "timeout" in failed[1003]
        rejected = {n: why for n, why in r["rejected"]}
        assert "non-finite" in rejected[1004] and "shape" in rejected[1005]
        assert r["missing"] == [1003]
    assert "rejected update" in caplog.text
    # the global model never took the bad arrays: the same as when the four bad nodes say nothing
    silent, _ = _run(tmp_path, "fedavg", nodes[:2] + [{"losskit-fault": "hang"}] * 4, name="silent",
                     **{"min-nodes": 6})
    for a, b in zip(rounds, silent):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_fedld_and_fedprox_learn_and_send_their_loss(tmp_path):
    for alg in ("fedld", "fedprox"):
        rounds, grid = _run(tmp_path, alg, [{}, {}, {}], name=alg, **{"num-server-rounds": 3, "min-nodes": 3})
        cfg = grid.sent[0].content["config"]
        assert cfg["loss"] == ("margin-control" if alg == "fedld" else "ce")
        assert (cfg["mu"] > 0) == (alg == "fedprox")
        assert rounds[-1]["accuracy"] > rounds[0]["accuracy"], rounds


def test_fedlex_explores_then_sends_guidance(tmp_path):
    rounds, grid = _run(tmp_path, "fedlex", [{}, {}], **{"num-server-rounds": 2, "explore-epochs": 1})
    assert [r["round"] for r in rounds] == [1, 2, 3]  # one exploration round first
    by_round = {}
    for m in grid.sent:
        by_round.setdefault(int(m.content["config"]["server-round"]), m)
    assert by_round[1].content["config"]["phase"] == "explore" and "guidance" not in by_round[1].content.array_records
    g = by_round[2].content["guidance"].to_torch_state_dict()
    assert set(g) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in g.values())
    # the exploration round does not move the global model
    from losskit.integrations.flower.task import load_digits_classification, make_model
    from losskit.recipes.federated import evaluate_accuracy

    _, _, xt, yt = load_digits_classification(0)
    assert rounds[0]["accuracy"] == pytest.approx(evaluate_accuracy(make_model(16, 0), xt, yt)[0])
    assert rounds[2]["accuracy"] != rounds[0]["accuracy"]


def test_server_resumes_from_its_last_round(tmp_path):
    full, _ = _run(tmp_path, "fedld", [{}, {}], name="full", **{"num-server-rounds": 3})
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "fedld", [{}, {}], name="killed", **{"num-server-rounds": 3, "checkpoint-dir": str(ck),
                                                            "kill_at": 3})
    assert (ck / "server.pt").exists()
    resumed, grid = _run(tmp_path, "fedld", [{}, {}], name="resumed", **{"num-server-rounds": 3,
                                                                       "checkpoint-dir": str(ck)})
    assert {int(m.content["config"]["server-round"]) for m in grid.sent} == {3}  # only the missing round ran
    assert [r["round"] for r in resumed] == [1, 2, 3]
    for a, b in zip(full, resumed):
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_fedld_strategy_identical_replies_equal_fedavg(tmp_path):
    model = torch.nn.Linear(3, 2)
    g = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moved = {k: v + 0.5 for k, v in g.items()}
    s = FedLDStrategy()
    grid = LocalGrid([{}, {}], {})
    arrays = ArrayRecord(g)
    out = None
    for rnd in (1, 2):
        msgs = list(s.configure_train(rnd, arrays, flwr.app.ConfigRecord(), grid))
        replies = [Message(RecordDict({"arrays": ArrayRecord(moved),
                                       "metrics": flwr.app.MetricRecord({"num-examples": 5})}), reply_to=m)
                   for m in msgs]
        out, _ = s.aggregate_train(rnd, replies)
        arrays = ArrayRecord(g)  # the same starting point both rounds
    for k, v in out.to_torch_state_dict().items():
        torch.testing.assert_close(v, moved[k])
    with pytest.raises(ValueError, match="algorithm"):
        make_strategy("scaffold")
