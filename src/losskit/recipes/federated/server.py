"""Server aggregation rules over client states (shared by the in-process loop and Flower).

``aggregate(global_state, states, weights) -> new global state``; ``weights``
are the clients' sample counts.  Every rule keeps a ``state_dict()`` so a
server can resume from its last saved round.

Non-floating tensors (BatchNorm's ``num_batches_tracked``) are not averaged:
the new value is the largest client value.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import torch
from torch import Tensor

from losskit.core.checks import check_hparam
from losskit.functional.federated import principal_gradient_aggregate, weighted_mean

__all__ = ["Aggregator", "FedAvgAggregator", "FedLDAggregator", "ServerMomentumAggregator", "make_aggregator"]


def _stack(states: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
    return torch.stack([s[key].detach() for s in states])


class Aggregator:
    """Base rule: the loop over the state's tensors is here; subclasses implement
    :meth:`_aggregate_float` for one floating tensor (non-floating tensors take the
    largest client value) and may count rounds in :meth:`_after_round`."""

    name = "base"

    def aggregate(self, global_state: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]],
                  weights: Sequence[float]) -> "OrderedDict[str, Tensor]":
        if not states:
            raise ValueError("states: expected at least one client state, got none")
        out = OrderedDict()
        for k, g in global_state.items():
            out[k] = (self._aggregate_float(k, g, states, weights) if g.is_floating_point()
                      else _stack(states, k).amax(0).to(g.dtype))
        self._after_round()
        return out

    def _aggregate_float(self, key: str, g: Tensor, states: Sequence[Mapping[str, Tensor]],
                         weights: Sequence[float]) -> Tensor:
        raise NotImplementedError

    def _after_round(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FedAvgAggregator(Aggregator):
    """FedAvg: ``sum_i n_i w_i / sum_i n_i`` (McMahan et al., 2017)."""

    name = "fedavg"

    def _aggregate_float(self, key, g, states, weights):
        return weighted_mean(_stack(states, key), weights).to(g.dtype)


class FedLDAggregator(Aggregator):
    """FedLD's principal-gradient aggregation, per tensor, on the deltas ``w_i - w_global``.

    Follows ``svd_tools.pcgrad_svd``: the first aggregation (no history yet)
    and single-element tensors use the plain (unweighted) mean of the deltas;
    afterwards every floating tensor with more than one element goes through
    :func:`~losskit.functional.federated.principal_gradient_aggregate`.
    BatchNorm running statistics are floating tensors and go through it too.
    The official rule is unweighted (``mean_i g^_i``), so ``weights`` are not
    used.  The official history EMA is only ever tested for "non-zero", so
    the state kept here is the number of aggregations done.
    """

    name = "fedld"

    def __init__(self, k_proportion: float = 0.8, eps: float = 1e-12):
        self.k_proportion = check_hparam("k_proportion", k_proportion, low=0, high=1, low_open=True)
        self.eps = check_hparam("eps", eps, low=0, low_open=True)
        self.rounds = 0

    def _aggregate_float(self, key, g, states, weights):
        deltas = _stack(states, key).reshape(len(states), -1).double() - g.detach().reshape(1, -1).double()
        if self.rounds == 0 or g.numel() == 1:
            step = deltas.mean(0)
        else:
            step = principal_gradient_aggregate(deltas, self.k_proportion, self.eps)
        return (g.double() + step.reshape(g.shape)).to(g.dtype)

    def _after_round(self):
        self.rounds += 1

    def state_dict(self):
        return {"rounds": self.rounds}

    def load_state_dict(self, state):
        self.rounds = int(state["rounds"])


class ServerMomentumAggregator(Aggregator):
    """FedAvg with the server momentum of FedLEx's official ``FedavgOptimizer``:
    ``d = w_global - mean_n(w_i)``, ``v <- beta v + (1 - beta) d``, ``w_global <- w_global - v``
    (``--beta 0.9``; the server lr of that optimizer is never used in its ``step``).
    ``beta = 0`` is plain FedAvg."""

    name = "server-momentum"

    def __init__(self, beta: float = 0.9):
        self.beta = check_hparam("beta", beta, low=0, high=1, high_open=True)
        self.buffers: dict[str, Tensor] = {}

    def _aggregate_float(self, key, g, states, weights):
        avg = weighted_mean(_stack(states, key), weights).to(g.dtype)  # FedAvg's value of this tensor
        d = g.double() - avg.double()
        v = self.buffers.get(key)
        v = (1 - self.beta) * d if v is None else self.beta * v + (1 - self.beta) * d
        self.buffers[key] = v
        return (g.double() - v).to(g.dtype)

    def state_dict(self):
        return {"beta": self.beta, "buffers": {k: v.clone() for k, v in self.buffers.items()}}

    def load_state_dict(self, state):
        self.buffers = {k: v.clone().double() for k, v in state["buffers"].items()}


def make_aggregator(algorithm: str, *, k_proportion: float = 0.8, eps: float = 1e-12,
                    server_momentum: float = 0.0) -> Aggregator:
    """The server rule of ``algorithm`` (``fedavg``/``fedprox``: FedAvg, ``fedld``: principal
    gradients, ``fedlex``: FedAvg with ``server_momentum``)."""
    if algorithm in ("fedavg", "fedprox"):
        return FedAvgAggregator() if server_momentum == 0 else ServerMomentumAggregator(server_momentum)
    if algorithm == "fedld":
        return FedLDAggregator(k_proportion, eps)
    if algorithm == "fedlex":
        return ServerMomentumAggregator(server_momentum) if server_momentum else FedAvgAggregator()
    raise ValueError(f"algorithm: expected one of ('fedavg', 'fedprox', 'fedld', 'fedlex'), got {algorithm!r}")
