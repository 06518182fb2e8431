"""Federated learning without Flower: FedAvg, FedProx, FedLD, FedLEx (registered recipes).

* :mod:`~losskit.recipes.federated.client`: local training (FedProx term, FedLD loss,
  FedLEx guided step and scouts);
* :mod:`~losskit.recipes.federated.server`: aggregation rules (FedAvg, FedLD's
  principal gradients, server momentum);
* :mod:`~losskit.recipes.federated.updates`: the client-update check;
* :mod:`~losskit.recipes.federated.loop`: the in-process loop (faults, checkpoints);
* :mod:`~losskit.recipes.federated.algorithms`: the registered recipes.

The Flower strategies in :mod:`losskit.integrations.flower` use the same rules.
"""

from losskit.recipes.federated.algorithms import run_fedavg, run_fedld, run_fedlex, run_fedprox
from losskit.recipes.federated.client import LocalConfig, evaluate_accuracy, explore_scout, train_local
from losskit.recipes.federated.loop import FederatedHistory, LocalClient, build_guidance, run_federated
from losskit.recipes.federated.server import (FedAvgAggregator, FedLDAggregator, ServerMomentumAggregator,
                                              make_aggregator)
from losskit.recipes.federated.updates import ClientUpdate, UpdateRejected, state_of, validate_update

__all__ = ["run_fedavg", "run_fedprox", "run_fedld", "run_fedlex", "run_federated", "LocalConfig", "LocalClient",
           "FederatedHistory", "train_local", "explore_scout", "evaluate_accuracy", "build_guidance",
           "FedAvgAggregator", "FedLDAggregator", "ServerMomentumAggregator", "make_aggregator", "ClientUpdate",
           "UpdateRejected", "state_of", "validate_update"]
