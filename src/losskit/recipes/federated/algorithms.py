"""The registered federated recipes: ``fedavg``, ``fedprox``, ``fedld``, ``fedlex``.

``losskit.get("fedld", rounds=50)`` binds the options and returns the
function; call it with ``(model, clients)`` where ``clients`` is a list of
``(x, y)`` pairs (for example from :mod:`losskit.data.partition`) or of
:class:`~losskit.recipes.federated.loop.LocalClient` objects.  Each returns a
:class:`~losskit.recipes.federated.loop.FederatedHistory` and leaves the final
global weights in ``model``.

Defaults: FedAvg / FedProx / FedLD use FedLD's official local training
(SGD lr 0.01, momentum 0.5, weight decay 5e-4, 5 local epochs, batch 50);
FedLEx its own (Adam 3e-4 decayed 0.99 per round, server momentum 0.9,
batch 350 in the official MNIST example, 50 here).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from torch import nn

from losskit.core.registry import Paper, register
from losskit.recipes.federated.client import LocalConfig
from losskit.recipes.federated.loop import FederatedHistory, run_federated

__all__ = ["run_fedavg", "run_fedprox", "run_fedld", "run_fedlex", "FEDAVG_PAPER", "FEDPROX_PAPER",
           "FEDLD_PAPER", "FEDLEX_PAPER"]

FEDAVG_PAPER = Paper("Communication-Efficient Learning of Deep Networks from Decentralized Data", 2017, "1602.05629")
FEDPROX_PAPER = Paper("Federated Optimization in Heterogeneous Networks", 2020, "1812.06127")
FEDLD_PAPER = Paper("Tackling Data Heterogeneity in Federated Learning via Loss Decomposition", 2024, "2408.12300")
FEDLEX_PAPER = Paper("Federated Loss Exploration for Improved Convergence on Non-IID Data", 2024, "2506.18640")

@register("fedavg", family="federated", kind="recipe", paper=FEDAVG_PAPER,
          summary="FedAvg: local SGD epochs, sample-weighted average of the client models.")
def run_fedavg(model: nn.Module, clients: Sequence[Any], *, rounds: int = 10, fraction: float = 1.0,
               local_epochs: int = 5, batch_size: int = 50, lr: float = 0.01, momentum: float = 0.5,
               weight_decay: float = 5e-4, seed: int = 0, eval_data: Any = None,
               checkpoint: str | os.PathLike | None = None) -> FederatedHistory:
    cfg = LocalConfig(local_epochs, batch_size, lr, "sgd", momentum, weight_decay)
    return run_federated(model, clients, algorithm="fedavg", rounds=rounds, fraction=fraction, local=cfg,
                         seed=seed, eval_data=eval_data, checkpoint=checkpoint)


@register("fedprox", family="federated", kind="recipe", paper=FEDPROX_PAPER,
          summary="FedProx: FedAvg with the proximal term mu/2 ||w - w_global||^2 in every local step.")
def run_fedprox(model: nn.Module, clients: Sequence[Any], *, rounds: int = 10, fraction: float = 1.0,
                mu: float = 0.01, local_epochs: int = 5, batch_size: int = 50, lr: float = 0.01,
                momentum: float = 0.5, weight_decay: float = 5e-4, seed: int = 0, eval_data: Any = None,
                checkpoint: str | os.PathLike | None = None) -> FederatedHistory:
    cfg = LocalConfig(local_epochs, batch_size, lr, "sgd", momentum, weight_decay, mu=mu)
    return run_federated(model, clients, algorithm="fedprox", rounds=rounds, fraction=fraction, local=cfg,
                         seed=seed, eval_data=eval_data, checkpoint=checkpoint)


@register("fedld", family="federated", kind="recipe", paper=FEDLD_PAPER,
          summary="FedLD: margin-control local loss and principal-gradient server aggregation.")
def run_fedld(model: nn.Module, clients: Sequence[Any], *, rounds: int = 10, fraction: float = 1.0,
              lam: float = 0.03, k_proportion: float = 0.8, local_epochs: int = 5, batch_size: int = 50,
              lr: float = 0.01, momentum: float = 0.5, weight_decay: float = 5e-4, eps: float = 1e-12,
              seed: int = 0, eval_data: Any = None, checkpoint: str | os.PathLike | None = None) -> FederatedHistory:
    cfg = LocalConfig(local_epochs, batch_size, lr, "sgd", momentum, weight_decay, loss="margin-control", lam=lam)
    return run_federated(model, clients, algorithm="fedld", rounds=rounds, fraction=fraction, local=cfg,
                         k_proportion=k_proportion, eps=eps, seed=seed, eval_data=eval_data, checkpoint=checkpoint)


@register("fedlex", family="federated", kind="recipe", paper=FEDLEX_PAPER,
          summary="FedLEx: an exploration phase of independent scouts builds a guidance matrix that masks "
                  "every local gradient; FedAvg with server momentum.")
def run_fedlex(model: nn.Module, clients: Sequence[Any], *, rounds: int = 10, fraction: float = 1.0,
               explore_epochs: int = 5, explore_fraction: float = 1.0, server_momentum: float = 0.9,
               local_epochs: int = 5, batch_size: int = 50, lr: float = 3e-4, lr_decay: float = 0.99,
               weight_decay: float = 0.0, seed: int = 0, eval_data: Any = None,
               checkpoint: str | os.PathLike | None = None) -> FederatedHistory:
    cfg = LocalConfig(local_epochs, batch_size, lr, "adam", 0.0, weight_decay)
    return run_federated(model, clients, algorithm="fedlex", rounds=rounds, fraction=fraction, local=cfg,
                         lr_decay=lr_decay, server_momentum=server_momentum, explore_epochs=explore_epochs,
                         explore_fraction=explore_fraction, seed=seed, eval_data=eval_data, checkpoint=checkpoint)
