"""The in-process federated loop: sample clients, train locally, check, aggregate,
evaluate, save -- FedAvg, FedProx, FedLD and FedLEx without Flower.

Everything random is a function of ``(seed, round, client)``: client sampling
uses ``numpy.random.default_rng([seed, round])`` and each local run a torch
generator seeded from ``(seed, round, client)``; so a run resumed from its
checkpoint ends with the same weights as one that was never interrupted.

Faults: a client whose ``update`` raises is recorded in the round's
``failures`` and the round completes with the others; an update with wrong
keys/shapes or non-finite values is rejected (``rejected``, with the reason,
also logged) and never aggregated.  A round in which no client succeeded
leaves the global model unchanged.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from losskit.core.checks import check_choice, check_hparam, check_int
from losskit.functional.federated import guidance_matrix
from losskit.recipes.federated.client import LocalConfig, evaluate_accuracy, explore_scout, train_local
from losskit.recipes.federated.server import make_aggregator
from losskit.recipes.federated.updates import ClientUpdate, UpdateRejected, state_of, validate_update

__all__ = ["LocalClient", "FederatedHistory", "run_federated", "client_seed", "sample_clients",
           "build_guidance", "ALGORITHMS"]

log = logging.getLogger("losskit.federated")

ALGORITHMS = ("fedavg", "fedprox", "fedld", "fedlex")


def client_seed(seed: int, round_: int, client: int) -> int:
    """The torch seed of one local run (a fixed mix of the three integers)."""
    return int(np.random.SeedSequence([int(seed), int(round_) + 1, int(client)]).generate_state(1)[0])


def sample_clients(num_clients: int, fraction: float, seed: int, round_: int) -> list[int]:
    """``max(1, round(fraction * N))`` distinct clients, sorted; a function of ``(seed, round)``."""
    m = max(1, int(round(fraction * num_clients)))
    if m >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([int(seed), int(round_) + 1])  # round -1: FedLEx's exploration
    return sorted(int(i) for i in rng.choice(num_clients, size=m, replace=False))


class LocalClient:
    """One client's data ``(x, y)``; ``update`` trains the given model in place and
    returns its state.  Subclass it to change local training (or to test faults)."""

    def __init__(self, x: Tensor, y: Tensor, name: Any = None):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x, y: expected the same number of rows, got {x.shape[0]} and {y.shape[0]}")
        self.x, self.y, self.name = x, y, name

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def update(self, model: nn.Module, cfg: LocalConfig, *, generator: torch.Generator,
               guidance: Mapping[str, Tensor] | None = None) -> ClientUpdate:
        metrics = train_local(model, self.x, self.y, cfg, generator=generator, guidance=guidance)
        return ClientUpdate(self.name, state_of(model), len(self), metrics)

    def explore(self, model: nn.Module, cfg: LocalConfig, *, generator: torch.Generator) -> dict[str, Tensor]:
        return explore_scout(model, self.x, self.y, cfg, generator=generator)


@dataclass
class FederatedHistory:
    """One dict per round: ``round``, ``clients``, ``accepted``, ``failures``
    (``[(client, reason)]``: raised), ``rejected`` (``[(client, reason)]``: bad
    update), ``accuracy``/``loss`` on ``eval_data`` (when given), ``seconds``."""

    algorithm: str
    rounds: list[dict] = field(default_factory=list)
    explored: list[int] = field(default_factory=list)

    def accuracy(self) -> list[float]:
        return [r.get("accuracy", float("nan")) for r in self.rounds]


def build_guidance(base: Mapping[str, Tensor], scouts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """FedLEx's global guidance ``{name: M}`` from the scouts' trained parameters."""
    if not scouts:
        raise ValueError("scouts: expected at least one scout, got none")
    return {n: guidance_matrix(base[n], torch.stack([s[n] for s in scouts])) for n in scouts[0]}


def _as_client(c: Any, i: int) -> Any:
    if hasattr(c, "update"):
        return c
    if isinstance(c, (tuple, list)) and len(c) == 2:
        return LocalClient(c[0], c[1], name=i)
    raise TypeError(f"clients[{i}]: expected an (x, y) pair or an object with update(), got {type(c).__name__}")


def _save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def run_federated(model: nn.Module, clients: Sequence[Any], *, algorithm: str = "fedavg", rounds: int = 10,
                  fraction: float = 1.0, local: LocalConfig | None = None, lr_decay: float = 1.0,
                  k_proportion: float = 0.8, eps: float = 1e-12, server_momentum: float = 0.0,
                  explore_epochs: int = 5, explore_fraction: float = 1.0, seed: int = 0,
                  eval_data: tuple[Tensor, Tensor] | None = None, checkpoint: str | os.PathLike | None = None,
                  on_round: Callable[[dict], None] | None = None) -> FederatedHistory:
    """Run ``rounds`` rounds of ``algorithm`` over ``clients`` and load the final
    global weights into ``model``.

    ``local`` is the clients' :class:`LocalConfig` (the algorithm sets its
    loss: FedLD the margin-control loss, FedProx needs ``local.mu > 0``);
    the round-``r`` local lr is ``local.lr * lr_decay**r``.  FedLEx first runs
    its exploration phase (``explore_fraction`` of the clients, ``explore_epochs``
    epochs each, from the initial weights) and then trains with the guidance.
    ``checkpoint``: a file written after every round; when it exists the run
    resumes after its last saved round.  ``on_round`` is called with each
    round's record (raise in it to stop).
    """
    check_choice("algorithm", algorithm, ALGORITHMS)
    rounds = check_int("rounds", rounds, low=0)
    fraction = check_hparam("fraction", fraction, low=0, high=1, low_open=True)
    lr_decay = check_hparam("lr_decay", lr_decay, low=0, high=1, low_open=True)
    explore_epochs = check_int("explore_epochs", explore_epochs, low=1)
    explore_fraction = check_hparam("explore_fraction", explore_fraction, low=0, high=1, low_open=True)
    if not clients:
        raise ValueError("clients: expected at least one client, got none")
    clients = [_as_client(c, i) for i, c in enumerate(clients)]
    local = local or LocalConfig()
    if algorithm == "fedld":
        local = replace(local, loss="margin-control")
    if algorithm == "fedprox" and local.mu <= 0:
        raise ValueError(f"local.mu: FedProx needs a proximal weight mu > 0, got {local.mu}")
    agg = make_aggregator(algorithm, k_proportion=k_proportion, eps=eps, server_momentum=server_momentum)
    global_state = state_of(model)
    history = FederatedHistory(algorithm)
    guidance = None
    start = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        if saved.get("algorithm") != algorithm:
            raise ValueError(f"checkpoint: {ckpt} was written by {saved.get('algorithm')!r}, not {algorithm!r}")
        global_state, start, guidance = saved["global"], int(saved["round"]), saved["guidance"]
        agg.load_state_dict(saved["aggregator"])
        history.rounds, history.explored = list(saved["history"]), list(saved["explored"])
        log.info("resuming %s from %s after round %d", algorithm, ckpt, start)
    work = model
    work.load_state_dict(global_state)

    if algorithm == "fedlex" and guidance is None:
        ids = sample_clients(len(clients), explore_fraction, seed, -1)
        xcfg = replace(local, epochs=explore_epochs)
        scouts = []
        for i in ids:
            work.load_state_dict(global_state)
            try:
                scouts.append(clients[i].explore(work, xcfg, generator=torch.Generator().manual_seed(
                    client_seed(seed, -1, i))))
            except Exception as e:  # a scout that fails is left out
                log.warning("fedlex exploration: client %s failed: %r", i, e)
        history.explored = ids
        guidance = build_guidance(global_state, scouts) if scouts else None

    for r in range(start, rounds):
        t0 = time.perf_counter()
        ids = sample_clients(len(clients), fraction, seed, r)
        cfg = local.with_lr(local.lr * lr_decay ** r)
        updates, failures, rejected = [], [], []
        for i in ids:
            work.load_state_dict(global_state)
            gen = torch.Generator().manual_seed(client_seed(seed, r, i))
            try:
                upd = clients[i].update(work, cfg, generator=gen, guidance=guidance)
            except Exception as e:
                failures.append((i, f"{type(e).__name__}: {e}"))
                log.warning("round %d: client %s failed: %r", r, i, e)
                continue
            try:
                validate_update(global_state, upd.state, who=f"client {i}")
                if not (isinstance(upd.num_examples, (int, np.integer)) and upd.num_examples > 0):
                    raise UpdateRejected(f"client {i}: num_examples must be a positive integer, "
                                         f"got {upd.num_examples!r}")
            except UpdateRejected as e:
                rejected.append((i, str(e)))
                log.warning("round %d: rejected update: %s", r, e)
                continue
            updates.append(upd)
        if updates:
            global_state = agg.aggregate(global_state, [u.state for u in updates],
                                         [float(u.num_examples) for u in updates])
        record: dict[str, Any] = {"round": r, "clients": ids, "accepted": [u.client for u in updates],
                                  "failures": failures, "rejected": rejected,
                                  "train_loss": float(np.mean([u.metrics.get("loss_last", np.nan) for u in updates]))
                                  if updates else float("nan")}
        if eval_data is not None:
            work.load_state_dict(global_state)
            record["accuracy"], record["loss"] = evaluate_accuracy(work, *eval_data)
        record["seconds"] = time.perf_counter() - t0
        history.rounds.append(record)
        if ckpt is not None:
            _save(ckpt, {"algorithm": algorithm, "round": r + 1, "global": global_state, "guidance": guidance,
                         "aggregator": agg.state_dict(), "history": history.rounds, "explored": history.explored})
        if on_round is not None:
            on_round(record)
    model.load_state_dict(global_state)
    return history
