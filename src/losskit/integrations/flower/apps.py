"""The ServerApp and ClientApp (Flower message API) running losskit's federated recipes.

``server_app`` reads the run config (``[tool.flwr.app.config]`` of the app's
pyproject.toml, overridable with ``flwr run --run-config``):

=====================  ========================================================
``algorithm``          ``fedavg`` | ``fedprox`` | ``fedld`` | ``fedlex``
``num-server-rounds``  training rounds (FedLEx runs one exploration round first)
``fraction-train``     fraction of the connected SuperNodes sampled per round
``min-nodes``          nodes to wait for / sample at least
``round-timeout``      seconds to wait for replies; a node that misses it is a failure
``local-epochs`` ...   ``batch-size``, ``lr``, ``lr-decay``, ``optimizer``, ``momentum``,
                       ``weight-decay``, ``mu``, ``lam``, ``k-proportion``,
                       ``server-momentum``, ``explore-epochs``
``alpha``, ``seed``    the Dirichlet partition (``partition-scheme``: dirichlet/classes/quantity)
``checkpoint-dir``     when set, the server saves ``server.pt`` after every round and
                       resumes from it on restart
``out-dir``            when set, ``result.json`` (per-round accuracy and fault events)
=====================  ========================================================

``client_app`` trains :func:`~losskit.integrations.flower.task.make_model` on
its partition (``--node-config "partition-id=i num-partitions=n"``) with
:func:`~losskit.recipes.federated.client.train_local` (or, in FedLEx's
exploration round, an independent scout).  The node-config key
``losskit-fault`` (``crash``, ``hang``, ``nan``, ``shape``) makes a node
misbehave on purpose, for the fault tests and demonstrations.
"""

from __future__ import annotations

import json
import os
import time
from logging import INFO
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from losskit.integrations.flower.strategies import LosskitStrategy, make_strategy
from losskit.integrations.flower.task import client_partition, load_digits_classification, make_model
from losskit.recipes.federated.client import LocalConfig, evaluate_accuracy, explore_scout, train_local
from losskit.recipes.federated.loop import client_seed

__all__ = ["server_app", "client_app", "run_rounds", "server_main", "client_train", "client_evaluate",
           "DEFAULTS"]

DEFAULTS: dict[str, Any] = {
    "algorithm": "fedavg", "num-server-rounds": 3, "fraction-train": 1.0, "min-nodes": 2, "round-timeout": 120.0,
    "local-epochs": 1, "batch-size": 32, "lr": 0.05, "lr-decay": 1.0, "optimizer": "sgd", "momentum": 0.5,
    "weight-decay": 5e-4, "mu": 0.01, "lam": 0.03, "k-proportion": 0.8, "server-momentum": 0.9,
    "explore-epochs": 2, "alpha": 0.5, "partition-scheme": "dirichlet", "classes-per-client": 2, "seed": 0,
    "hidden": 32, "checkpoint-dir": "", "out-dir": "",
}


def _cfg(run_config: dict) -> dict[str, Any]:
    return {**DEFAULTS, **dict(run_config)}


# ----------------------------------------------------------------------------- server

def _save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def run_rounds(strategy: LosskitStrategy, grid: Grid, arrays: ArrayRecord, num_rounds: int, *,
               timeout: float, checkpoint_dir: str | os.PathLike | None = None,
               evaluate_fn: Callable[[int, ArrayRecord], dict] | None = None) -> tuple[ArrayRecord, list[dict]]:
    """Flower's ``Strategy.start`` loop (train rounds only) with a checkpoint after every round.

    When ``checkpoint_dir/server.pt`` exists the loop resumes after its saved
    round with the saved arrays and strategy state.  Returns the final arrays and
    one record per round (``round``, ``seconds``, the strategy's events and the
    ``evaluate_fn`` metrics).
    """
    start, history = 1, []
    ckpt = Path(checkpoint_dir) / "server.pt" if checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        arrays = ArrayRecord(saved["arrays"])
        strategy.load_state_dict(saved["strategy"])
        history = list(saved["history"])
        start = int(saved["round"]) + 1
        log(INFO, "losskit: resuming from %s after round %d", ckpt, start - 1)
    for rnd in range(start, num_rounds + 1):
        t0 = time.perf_counter()
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        replies = grid.send_and_receive(msgs, timeout=timeout) if msgs else []
        new, _metrics = strategy.aggregate_train(rnd, replies)
        if new is not None:
            arrays = new
        rec = {"round": rnd, "seconds": time.perf_counter() - t0, **_plain(strategy.events.get(rnd, {}))}
        if evaluate_fn is not None:
            rec.update(evaluate_fn(rnd, arrays))
        history.append(rec)
        log(INFO, "losskit: round %d %s", rnd, {k: v for k, v in rec.items() if k in ("accuracy", "loss")})
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save(ckpt, {"round": rnd, "arrays": arrays.to_torch_state_dict(), "strategy": strategy.state_dict(),
                         "history": history})
    return arrays, history


def _plain(ev: dict) -> dict:
    return {k: [list(x) if isinstance(x, tuple) else x for x in v] for k, v in ev.items()}


def server_main(grid: Grid, context: Context) -> None:
    c = _cfg(context.run_config)
    algorithm = str(c["algorithm"])
    local = {"local-epochs": int(c["local-epochs"]), "batch-size": int(c["batch-size"]), "lr": float(c["lr"]),
             "optimizer": str(c["optimizer"]), "momentum": float(c["momentum"]),
             "weight-decay": float(c["weight-decay"])}
    n = int(c["min-nodes"])
    strategy = make_strategy(algorithm, local=local, mu=float(c["mu"]), lam=float(c["lam"]),
                             k_proportion=float(c["k-proportion"]), server_momentum=float(c["server-momentum"]),
                             explore_epochs=int(c["explore-epochs"]), lr_decay=float(c["lr-decay"]),
                             fraction_train=float(c["fraction-train"]), min_train_nodes=n, min_available_nodes=n)
    model = make_model(int(c["hidden"]), int(c["seed"]))
    _, _, xt, yt = load_digits_classification(int(c["seed"]))

    def evaluate(rnd: int, arrays: ArrayRecord) -> dict:
        model.load_state_dict(arrays.to_torch_state_dict())
        acc, loss = evaluate_accuracy(model, xt, yt)
        return {"accuracy": acc, "loss": loss}

    rounds = int(c["num-server-rounds"]) + (1 if algorithm == "fedlex" else 0)
    _, history = run_rounds(strategy, grid, ArrayRecord(model.state_dict()), rounds,
                            timeout=float(c["round-timeout"]), checkpoint_dir=c["checkpoint-dir"] or None,
                            evaluate_fn=evaluate)
    if c["out-dir"]:
        out = Path(str(c["out-dir"]))
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({"algorithm": algorithm, "rounds": history}, indent=1))


server_app = ServerApp()
server_app.main()(server_main)


# ----------------------------------------------------------------------------- client

def _client_data(context: Context):
    c = _cfg(context.run_config)
    nc = context.node_config
    pid, parts = int(nc.get("partition-id", 0)), int(nc.get("num-partitions", 1))
    x, y, _, _ = load_digits_classification(int(c["seed"]))
    idx = client_partition(y, pid, parts, scheme=str(c["partition-scheme"]), alpha=float(c["alpha"]),
                           classes_per_client=int(c["classes-per-client"]), seed=int(c["seed"]))
    return pid, x[torch.as_tensor(idx)], y[torch.as_tensor(idx)], c


def _local_config(cfg: ConfigRecord) -> LocalConfig:
    g = cfg.get
    return LocalConfig(epochs=int(g("local-epochs", 1)), batch_size=int(g("batch-size", 32)), lr=float(g("lr", 0.05)),
                       optimizer=str(g("optimizer", "sgd")), momentum=float(g("momentum", 0.0)),
                       weight_decay=float(g("weight-decay", 0.0)), loss=str(g("loss", "ce")),
                       lam=float(g("lam", 0.03)), mu=float(g("mu", 0.0)))


def client_train(msg: Message, context: Context) -> Message:
    pid, x, y, c = _client_data(context)
    fault = str(context.node_config.get("losskit-fault", ""))
    if fault == "crash":
        raise RuntimeError(f"partition {pid}: injected crash (losskit-fault=crash)")
    if fault == "hang":
        time.sleep(float(context.node_config.get("losskit-hang-seconds", 3600.0)))
    cfg = msg.content["config"]
    local = _local_config(cfg)
    model = make_model(int(c["hidden"]), int(c["seed"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    rnd = int(cfg.get("server-round", 0))
    gen = torch.Generator().manual_seed(client_seed(int(c["seed"]), rnd, pid))
    if cfg.get("phase", "train") == "explore":
        scout = explore_scout(model, x, y, local, generator=gen)
        state = {**model.state_dict(), **scout}
        metrics = {"train-loss": float("nan")}
    else:
        guidance = msg.content["guidance"].to_torch_state_dict() if "guidance" in msg.content.array_records else None
        out = train_local(model, x, y, local, generator=gen, guidance=guidance)
        state = model.state_dict()
        metrics = {"train-loss": out["loss_last"]}
    state = {k: v.detach().clone() for k, v in state.items()}
    if fault == "nan":
        first = next(iter(state))
        state[first] = state[first] * float("nan")
    elif fault == "shape":
        first = next(iter(state))
        state[first] = torch.zeros(3, 3)
    return Message(RecordDict({"arrays": ArrayRecord(state),
                               "metrics": MetricRecord({**metrics, "num-examples": int(x.shape[0])})}),
                   reply_to=msg)


def client_evaluate(msg: Message, context: Context) -> Message:
    _, x, y, c = _client_data(context)
    model = make_model(int(c["hidden"]), int(c["seed"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    acc, loss = evaluate_accuracy(model, x, y)
    return Message(RecordDict({"metrics": MetricRecord({"accuracy": acc, "loss": loss,
                                                        "num-examples": int(x.shape[0])})}), reply_to=msg)


client_app = ClientApp()
client_app.train()(client_train)
client_app.evaluate()(client_evaluate)
