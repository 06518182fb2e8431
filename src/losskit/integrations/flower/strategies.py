"""FedAvg / FedProx / FedLD / FedLEx as Flower message-API strategies (``flwr.serverapp.strategy``).

Each is a :class:`flwr.serverapp.strategy.FedAvg` subclass whose
``aggregate_train`` (1) records error replies (a ClientApp that raised) and
sampled nodes that never replied (timed out) as failures, (2) checks every
other reply's arrays against the global model with
:func:`~losskit.recipes.federated.updates.validate_update` -- wrong keys or
shapes, NaN/inf, a non-positive ``num-examples`` -- and rejects it with a
WARNING log line, (3) aggregates the accepted ones with the losskit rule:
FedAvg's weighted mean, FedLD's principal gradients, FedLEx's server momentum.
``events[round]`` holds ``sampled``, ``accepted``, ``failures``, ``rejected``,
``missing``.  ``state_dict()``/``load_state_dict()`` carry what a resumed
server needs.

The local-training options travel in each round's ``config`` record
(``local-epochs``, ``batch-size``, ``lr``, ``optimizer``, ``momentum``,
``weight-decay``, ``loss``, ``lam``, ``mu``), so the ClientApp holds no
algorithm of its own.
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from losskit.core.checks import check_choice, check_hparam, check_int
from losskit.recipes.federated.loop import build_guidance
from losskit.recipes.federated.server import (Aggregator, FedAvgAggregator, FedLDAggregator,
                                              ServerMomentumAggregator)
from losskit.recipes.federated.updates import UpdateRejected, validate_update

__all__ = ["LosskitStrategy", "FedAvgStrategy", "FedLDStrategy", "FedLExStrategy", "make_strategy"]


class LosskitStrategy(FedAvg):
    """A FedAvg-shaped strategy with a losskit aggregation rule and fault records."""

    def __init__(self, aggregator: Aggregator, *, local: Mapping[str, Any] | None = None, lr_decay: float = 1.0,
                 fraction_train: float = 1.0, min_train_nodes: int = 2, min_available_nodes: int = 2,
                 **kwargs: Any):
        kwargs.setdefault("fraction_evaluate", 0.0)  # the ServerApp evaluates the global model centrally
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, **kwargs)
        self.aggregator = aggregator
        self.local = dict(local or {})
        self.lr_decay = check_hparam("lr_decay", lr_decay, low=0, high=1, low_open=True)
        self.events: dict[int, dict] = {}
        self._global: dict[str, torch.Tensor] | None = None
        self._sampled: list[int] = []

    # -- what each round sends
    def round_config(self, server_round: int) -> dict[str, Any]:
        cfg = dict(self.local)
        if "lr" in cfg:
            cfg["lr"] = float(cfg["lr"]) * self.lr_decay ** (server_round - 1)
        return cfg

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        merged = ConfigRecord({**dict(config), **self.round_config(server_round)})
        msgs = list(super().configure_train(server_round, arrays, merged, grid))
        self._sampled = [m.metadata.dst_node_id for m in msgs]
        return msgs

    # -- what comes back
    def _read(self, msg: Message) -> tuple[dict[str, torch.Tensor], float]:
        who = f"node {msg.metadata.src_node_id}"
        content = msg.content
        if self.arrayrecord_key not in content.array_records:
            raise UpdateRejected(f"{who}: no ArrayRecord {self.arrayrecord_key!r} in the reply")
        try:
            state = content[self.arrayrecord_key].to_torch_state_dict()
        except Exception as e:  # undecodable arrays
            raise UpdateRejected(f"{who}: arrays could not be read ({e})") from e
        validate_update(self._global, state, who=who)
        n = None
        for rec in content.metric_records.values():
            n = rec.get(self.weighted_by_key, n)
        if not isinstance(n, (int, float)) or not n > 0 or n != n:
            raise UpdateRejected(f"{who}: {self.weighted_by_key!r} must be a positive number, got {n!r}")
        return state, float(n)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        ev: dict[str, Any] = {"sampled": list(self._sampled), "accepted": [], "failures": [], "rejected": [],
                              "missing": []}
        states, weights, contents, seen = [], [], [], set()
        for msg in replies:
            nid = msg.metadata.src_node_id
            seen.add(nid)
            if msg.has_error():
                ev["failures"].append((nid, msg.error.reason))
                log(WARNING, "round %s: node %s failed: %s", server_round, nid, msg.error.reason)
                continue
            try:
                state, n = self._read(msg)
            except UpdateRejected as e:
                ev["rejected"].append((nid, str(e)))
                log(WARNING, "round %s: rejected update: %s", server_round, e)
                continue
            states.append(state)
            weights.append(n)
            contents.append(msg.content)
            ev["accepted"].append(nid)
        ev["missing"] = [n for n in self._sampled if n not in seen]
        for nid in ev["missing"]:
            ev["failures"].append((nid, "no reply before the round timeout"))
            log(WARNING, "round %s: node %s did not reply before the timeout", server_round, nid)
        self.events[server_round] = ev
        log(INFO, "round %s: %d accepted, %d failed, %d rejected", server_round, len(states), len(ev["failures"]),
            len(ev["rejected"]))
        if not states:
            return None, None
        new_state = self.combine(server_round, states, weights)
        try:
            metrics = aggregate_metricrecords(contents, self.weighted_by_key)
        except Exception:  # replies with different metric keys: keep the arrays, drop the metrics
            metrics = MetricRecord({"num-accepted": len(states)})
        return ArrayRecord(new_state), metrics

    def combine(self, server_round: int, states, weights):
        return self.aggregator.aggregate(self._global, states, weights)

    # -- resume
    def state_dict(self) -> dict:
        return {"aggregator": self.aggregator.state_dict(), "events": self.events}

    def load_state_dict(self, state: dict) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
        self.events = dict(state["events"])


class FedAvgStrategy(LosskitStrategy):
    """FedAvg (``mu = 0``) or FedProx (``mu > 0``, sent to the clients as ``mu``)."""

    def __init__(self, *, mu: float = 0.0, local: Mapping[str, Any] | None = None, **kwargs: Any):
        mu = check_hparam("mu", mu, low=0)
        super().__init__(FedAvgAggregator(), local={**(local or {}), "mu": mu, "loss": "ce"}, **kwargs)


class FedLDStrategy(LosskitStrategy):
    """FedLD: the clients train with the margin-control loss (``lam``); the server
    aggregates with principal gradients (``k_proportion``, ``eps``)."""

    def __init__(self, *, lam: float = 0.03, k_proportion: float = 0.8, eps: float = 1e-12,
                 local: Mapping[str, Any] | None = None, **kwargs: Any):
        lam = check_hparam("lam", lam, low=0)
        super().__init__(FedLDAggregator(k_proportion, eps), local={**(local or {}), "loss": "margin-control",
                                                                    "lam": lam, "mu": 0.0}, **kwargs)


class FedLExStrategy(LosskitStrategy):
    """FedLEx: round 1 is the exploration round (``phase = "explore"``: every
    sampled client trains an independent scout for ``explore_epochs`` from the
    global weights and returns it; the server builds the guidance and keeps the
    global weights); from round 2 on every message also carries the guidance
    as the ArrayRecord ``"guidance"`` and the server aggregates with momentum."""

    def __init__(self, *, server_momentum: float = 0.9, explore_epochs: int = 5,
                 local: Mapping[str, Any] | None = None, **kwargs: Any):
        self.explore_epochs = check_int("explore_epochs", explore_epochs, low=1)
        agg = ServerMomentumAggregator(server_momentum) if server_momentum else FedAvgAggregator()
        super().__init__(agg, local={**(local or {}), "loss": "ce", "mu": 0.0}, **kwargs)
        self.guidance: dict[str, torch.Tensor] | None = None

    def round_config(self, server_round: int) -> dict[str, Any]:
        if self.guidance is None:
            return {**dict(self.local), "phase": "explore", "local-epochs": self.explore_epochs}
        cfg = super().round_config(server_round - 1)  # the lr decays from the first training round
        cfg["phase"] = "train"
        return cfg

    def configure_train(self, server_round, arrays, config, grid):
        msgs = super().configure_train(server_round, arrays, config, grid)
        if self.guidance is not None and msgs:
            msgs[0].content["guidance"] = ArrayRecord(self.guidance)  # the messages share one RecordDict
        return msgs

    def combine(self, server_round, states, weights):
        if self.guidance is None:
            names = [k for k in states[0] if self._global[k].is_floating_point()]
            self.guidance = build_guidance(self._global, [{k: s[k] for k in names} for s in states])
            log(INFO, "round %s: exploration done, guidance built from %d scouts", server_round, len(states))
            return dict(self._global)
        return super().combine(server_round, states, weights)

    def state_dict(self):
        return {**super().state_dict(), "guidance": self.guidance}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.guidance = state.get("guidance")


def make_strategy(algorithm: str, *, local: Mapping[str, Any] | None = None, mu: float = 0.01, lam: float = 0.03,
                  k_proportion: float = 0.8, server_momentum: float = 0.9, explore_epochs: int = 5,
                  **kwargs: Any) -> LosskitStrategy:
    """The strategy for ``fedavg``, ``fedprox``, ``fedld`` or ``fedlex``."""
    check_choice("algorithm", algorithm, ("fedavg", "fedprox", "fedld", "fedlex"))
    if algorithm == "fedavg":
        return FedAvgStrategy(mu=0.0, local=local, **kwargs)
    if algorithm == "fedprox":
        if mu <= 0:
            raise ValueError(f"mu: FedProx needs mu > 0, got {mu}")
        return FedAvgStrategy(mu=mu, local=local, **kwargs)
    if algorithm == "fedld":
        return FedLDStrategy(lam=lam, k_proportion=k_proportion, local=local, **kwargs)
    return FedLExStrategy(server_momentum=server_momentum, explore_epochs=explore_epochs, local=local, **kwargs)
