"""Client-side local training: FedAvg's epochs, FedProx's proximal term, FedLD's
margin-control loss, FedLEx's masked (guided) gradient step and its scouts.

One function, :func:`train_local`, runs every variant on a model in place; the
in-process loop and the Flower ClientApp both call it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losskit.core.checks import check_choice, check_hparam, check_int
from losskit.functional.federated import margin_control_loss, proximal_term

__all__ = ["LocalConfig", "train_local", "explore_scout", "evaluate_accuracy"]


@dataclass(frozen=True)
class LocalConfig:
    """Local training options (one object; the recipes and the Flower app build it)."""

    epochs: int = 5
    batch_size: int = 50
    lr: float = 0.01
    optimizer: str = "sgd"  # 'sgd' or 'adam'
    momentum: float = 0.5
    weight_decay: float = 5e-4
    loss: str = "ce"  # 'ce' or 'margin-control' (FedLD)
    lam: float = 0.03  # FedLD's margin-control weight
    mu: float = 0.0  # FedProx's proximal weight (0: none)

    def __post_init__(self):
        check_int("epochs", self.epochs, low=0)
        check_int("batch_size", self.batch_size, low=1)
        check_hparam("lr", self.lr, low=0, low_open=True)
        check_choice("optimizer", self.optimizer, ("sgd", "adam"))
        check_hparam("momentum", self.momentum, low=0, high=1, high_open=True)
        check_hparam("weight_decay", self.weight_decay, low=0)
        check_choice("loss", self.loss, ("ce", "margin-control"))
        check_hparam("lam", self.lam, low=0)
        check_hparam("mu", self.mu, low=0)

    def with_lr(self, lr: float) -> "LocalConfig":
        return replace(self, lr=lr)


def _optimizer(model: nn.Module, cfg: LocalConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _loss_fn(cfg: LocalConfig) -> Callable[[Tensor, Tensor], Tensor]:
    if cfg.loss == "margin-control":
        return lambda z, y: margin_control_loss(z, y, cfg.lam)
    return lambda z, y: F.cross_entropy(z, y)


def train_local(model: nn.Module, x: Tensor, y: Tensor, cfg: LocalConfig, *, generator: torch.Generator | None = None,
                guidance: Mapping[str, Tensor] | None = None) -> dict[str, float]:
    """Train ``model`` in place on ``(x, y)`` for ``cfg.epochs`` shuffled epochs.

    * ``cfg.mu > 0`` adds FedProx's ``mu/2 ||w - w_start||^2`` (``w_start``:
      the weights the call started from, i.e. the global model);
    * ``cfg.loss='margin-control'`` uses FedLD's loss;
    * ``guidance`` (FedLEx): ``{parameter name: M}``; each gradient becomes
      ``M * g`` before the optimiser step (the paper's order; the official
      ``update()`` reads the mask from disk at every step).

    A trailing batch of one row is skipped (BatchNorm cannot train on it).
    Returns ``{"loss_first", "loss_last", "steps"}``.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x, y: expected the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    model.train()
    opt = _optimizer(model, cfg)
    loss_fn = _loss_fn(cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params] if cfg.mu > 0 else None
    masks = None
    if guidance is not None:
        missing = [n for n in names if n not in guidance]
        if missing:
            raise ValueError(f"guidance: no matrix for parameter(s) {missing[:3]}")
        masks = [guidance[n].to(device=p.device, dtype=p.dtype) for n, p in zip(names, params)]
    n = x.shape[0]
    first = last = float("nan")
    steps = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            if idx.numel() == 1 and n > 1:  # a trailing one-row batch (BatchNorm cannot train on it)
                continue
            loss = loss_fn(model(x[idx]), y[idx])
            if start is not None:
                loss = loss + proximal_term(params, start, cfg.mu)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if masks is not None:
                for p, m in zip(params, masks):
                    if p.grad is not None:
                        p.grad.mul_(m)
            opt.step()
            last = float(loss.detach())
            if steps == 0:
                first = last
            steps += 1
    return {"loss_first": first, "loss_last": last, "steps": float(steps)}


def explore_scout(model: nn.Module, x: Tensor, y: Tensor, cfg: LocalConfig, *,
                  generator: torch.Generator | None = None) -> "dict[str, Tensor]":
    """FedLEx exploration: train an **independent copy** of ``model`` (theta_base)
    on ``(x, y)`` and return its trained parameters (the official code trains
    one shared model object for every scout and returns an all-ones tensor
    as the "scout"; here each scout starts from theta_base)."""
    scout = copy.deepcopy(model)
    train_local(scout, x, y, cfg, generator=generator)
    return {n: p.detach().clone() for n, p in scout.named_parameters() if p.requires_grad}


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on ``(x, y)``."""
    was = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    for i in range(0, x.shape[0], batch_size):
        z = model(x[i:i + batch_size])
        correct += int((z.argmax(1) == y[i:i + batch_size]).sum())
        total_loss += float(F.cross_entropy(z, y[i:i + batch_size], reduction="sum"))
    model.train(was)
    n = max(int(x.shape[0]), 1)
    return correct / n, total_loss / n
