"""Unlearning by output matching (DMM, oracle matching) and the baselines.

Georgiev et al., "Attribute-to-Delete: Machine Unlearning via Datamodel
Matching" (ICLR 2025, arXiv:2410.23232), Algorithm 1 (DMM) and Section 4's
baselines; official code RoyRin/data-unlearning-bench (``unlearning.py``:
``ascent_forget``, ``ascent_descent``).

Every recipe modifies ``model`` in place and returns an :class:`UnlearningLog`
with the compute it took (optimiser steps, examples through the network,
seconds).

* ``dmm``: targets ``f_hat(x) = f(x) - sum_{i in F} beta_i(x)`` from datamodels
  (:mod:`~losskit.recipes.unlearning.datamodels`); fine-tune on the mean
  squared error to the targets over the forget set and ``retain_multiplier``
  (3) times as many retain points, drawn afresh each epoch.  The defaults are
  the paper's CIFAR-10 ones: Adam, lr 5e-4, 5 epochs, batch 512, ExponentialLR
  0.95 per epoch.
* ``oracle-matching``: the same fine-tuning with the outputs of a model
  actually retrained without ``F`` (the paper's upper bound, OM).
* ``gradient-ascent``: SGD ascent on the forget set's cross-entropy.
* ``gradient-difference``: each step, ascent on a forget batch plus descent on
  a retain batch (``CE(retain) - CE(forget)``).  The official
  ``ascent_descent`` alternates whole epochs instead; the per-step sum is the
  usual "gradient difference" of the unlearning literature.
* ``retain-finetune``: SGD descent on the retain set only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from losskit.core.checks import check_hparam, check_int, shape_str
from losskit.core.registry import Paper, register
from losskit.metrics.klom import margins_from_logits
from losskit.recipes.unlearning.data import UnlearningData, predict_logits
from losskit.recipes.unlearning.datamodels import Datamodels

__all__ = ["UnlearningLog", "run_dmm", "run_oracle_matching", "run_gradient_ascent", "run_gradient_difference",
           "run_retain_finetune", "DMM_PAPER"]

DMM_PAPER = Paper("Attribute-to-Delete: Machine Unlearning via Datamodel Matching", 2024, "2410.23232")


@dataclass
class UnlearningLog:
    method: str
    steps: int
    examples: int  # examples through the network (forward + backward)
    seconds: float
    loss_first: float
    loss_last: float


def _check_model_data(model, data) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(data, UnlearningData):
        raise TypeError(f"data: expected an UnlearningData(x, y, forget), got {type(data).__name__}")


def _outputs(model: nn.Module, x: Tensor, y: Tensor, margins: bool) -> Tensor:
    z = model(x)
    return margins_from_logits(z, y) if margins else z


def _match(model: nn.Module, data: UnlearningData, targets: Tensor, name: str, *, epochs: int, lr: float,
           batch_size: int, retain_multiplier: float, lr_decay: float, seed: int) -> UnlearningLog:
    epochs = check_int("epochs", epochs, low=1)
    lr = check_hparam("lr", lr, low=0.0, low_open=True)
    batch_size = check_int("batch_size", batch_size, low=1)
    retain_multiplier = check_hparam("retain_multiplier", retain_multiplier, low=0.0)
    lr_decay = check_hparam("lr_decay", lr_decay, low=0.0, high=1.0, low_open=True)
    margins = targets.dim() == 1
    gen = torch.Generator().manual_seed(check_int("seed", seed))
    n_ret = min(data.retain.numel(), int(round(retain_multiplier * data.forget.numel())))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay)
    steps = examples = 0
    first = last = float("nan")
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        ret = data.retain[torch.randperm(data.retain.numel(), generator=gen)[:n_ret]]
        pool = torch.cat([data.forget, ret])
        pool = pool[torch.randperm(pool.numel(), generator=gen)]
        for s in range(0, pool.numel(), batch_size):
            b = pool[s:s + batch_size]
            out = _outputs(model, data.x[b], data.y[b], margins)
            loss = nn.functional.mse_loss(out, targets[b].to(out))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            examples += b.numel()
            first = float(loss.detach()) if steps == 1 else first
            last = float(loss.detach())
        sched.step()
    return UnlearningLog(name, steps, examples, time.perf_counter() - t0, first, last)


def _check_targets(targets: Tensor, data: UnlearningData, name: str) -> Tensor:
    targets = torch.as_tensor(targets)
    if targets.dim() < 1 or targets.shape[0] < data.n or not targets.is_floating_point():
        raise ValueError(f"{name}: expected floating outputs [T >= n_train={data.n}, ...] whose first n_train "
                         f"rows are the training points, got {targets.dtype} {shape_str(targets)}")
    if not torch.isfinite(targets).all():
        raise ValueError(f"{name}: expected finite outputs")
    return targets[:data.n].detach()


@register("dmm", family="unlearning", kind="recipe", paper=DMM_PAPER,
          summary="Datamodel matching: fine-tune to outputs predicted by datamodels for the model retrained "
                  "without the forget set.")
def run_dmm(model: nn.Module, data: UnlearningData, datamodels: Datamodels, *, epochs: int = 5, lr: float = 5e-4,
            batch_size: int = 512, retain_multiplier: float = 3.0, lr_decay: float = 0.95,
            seed: int = 0) -> UnlearningLog:
    """DMM in place on ``model``.

    ``datamodels`` cover targets ``T >= n_train`` whose first ``n_train`` are
    the training points in order: per-logit weights ``[n, T, C]`` (the model is
    matched on its logits) or per-margin ``[n, T]`` (TRAK; matched on margins).
    The trained model's own outputs ``f(x)`` are read first, so the datamodels
    enter only through ``sum_{i in F} beta_i``.
    """
    _check_model_data(model, data)
    if not isinstance(datamodels, Datamodels):
        raise TypeError(f"datamodels: expected a Datamodels, got {type(datamodels).__name__}")
    if datamodels.n_train != data.n:
        raise ValueError(f"datamodels: fitted for {datamodels.n_train} training points, the data has {data.n}")
    t0 = time.perf_counter()
    logits = predict_logits(model, data.x)
    full = margins_from_logits(logits, data.y) if datamodels.weights.dim() == 2 else logits
    eff = datamodels.removal_effect(data.forget)
    targets = _check_targets(full - eff[:data.n].to(full), data, "datamodels")
    log = _match(model, data, targets, "dmm", epochs=epochs, lr=lr, batch_size=batch_size,
                 retain_multiplier=retain_multiplier, lr_decay=lr_decay, seed=seed)
    log.seconds = time.perf_counter() - t0
    log.examples += data.n  # the forward pass that read f(x)
    return log


@register("oracle-matching", family="unlearning", kind="recipe", paper=DMM_PAPER,
          summary="Oracle matching: fine-tune to the outputs of a model retrained without the forget set.")
def run_oracle_matching(model: nn.Module, data: UnlearningData, oracle_outputs: Tensor, *, epochs: int = 5,
                        lr: float = 5e-4, batch_size: int = 512, retain_multiplier: float = 3.0,
                        lr_decay: float = 0.95, seed: int = 0) -> UnlearningLog:
    """OM in place: ``oracle_outputs`` are a retrained model's logits ``[T >= n, C]`` (or margins ``[T]``)."""
    _check_model_data(model, data)
    targets = _check_targets(oracle_outputs, data, "oracle_outputs")
    return _match(model, data, targets, "oracle-matching", epochs=epochs, lr=lr, batch_size=batch_size,
                  retain_multiplier=retain_multiplier, lr_decay=lr_decay, seed=seed)


def _sgd(model, lr, momentum):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)


def _batches(idx: Tensor, batch_size: int, gen: torch.Generator):
    perm = idx[torch.randperm(idx.numel(), generator=gen)]
    return [perm[s:s + batch_size] for s in range(0, perm.numel(), batch_size)]


def _sgd_loop(model, data, idx, name: str, batch_loss, epochs, lr, batch_size, momentum, seed) -> UnlearningLog:
    """SGD over shuffled batches of ``idx``: ``batch_loss(b, gen) -> (objective, logged loss, examples)``."""
    _check_model_data(model, data)
    epochs = check_int("epochs", epochs, low=1)
    lr = check_hparam("lr", lr, low=0.0, low_open=True)
    batch_size = check_int("batch_size", batch_size, low=1)
    momentum = check_hparam("momentum", momentum, low=0.0, high=1.0, high_open=True)
    gen = torch.Generator().manual_seed(check_int("seed", seed))
    opt = _sgd(model, lr, momentum)
    steps = examples = 0
    first = last = float("nan")
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for b in _batches(idx, batch_size, gen):
            objective, logged, n = batch_loss(b, gen)
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            steps += 1
            examples += n
            first = float(logged.detach()) if steps == 1 else first
            last = float(logged.detach())
    return UnlearningLog(name, steps, examples, time.perf_counter() - t0, first, last)


def _descent(model, data, idx, sign: float, name: str, epochs, lr, batch_size, momentum, seed) -> UnlearningLog:
    def batch_loss(b, gen):
        loss = nn.functional.cross_entropy(model(data.x[b]), data.y[b])
        return sign * loss, loss, b.numel()

    return _sgd_loop(model, data, idx, name, batch_loss, epochs, lr, batch_size, momentum, seed)


@register("gradient-ascent", family="unlearning", kind="recipe", paper=DMM_PAPER,
          summary="Unlearning baseline: gradient ascent on the forget set's cross-entropy.")
def run_gradient_ascent(model: nn.Module, data: UnlearningData, *, epochs: int = 5, lr: float = 1e-2,
                        batch_size: int = 64, momentum: float = 0.0, seed: int = 0) -> UnlearningLog:
    """Ascent on ``CE`` over the forget set (the official ``ascent_forget``)."""
    return _descent(model, data, data.forget, -1.0, "gradient-ascent", epochs, lr, batch_size, momentum, seed)


@register("retain-finetune", family="unlearning", kind="recipe", paper=DMM_PAPER,
          summary="Unlearning baseline: keep training on the retain set only.")
def run_retain_finetune(model: nn.Module, data: UnlearningData, *, epochs: int = 5, lr: float = 1e-2,
                        batch_size: int = 64, momentum: float = 0.9, seed: int = 0) -> UnlearningLog:
    """Descent on ``CE`` over the retain set."""
    return _descent(model, data, data.retain, 1.0, "retain-finetune", epochs, lr, batch_size, momentum, seed)


@register("gradient-difference", family="unlearning", kind="recipe", paper=DMM_PAPER,
          summary="Unlearning baseline: each step descends on a retain batch and ascends on a forget batch.")
def run_gradient_difference(model: nn.Module, data: UnlearningData, *, epochs: int = 5, lr: float = 1e-2,
                            batch_size: int = 64, forget_weight: float = 1.0, momentum: float = 0.0,
                            seed: int = 0) -> UnlearningLog:
    """``CE(retain batch) - forget_weight * CE(forget batch)`` per step; an epoch is one pass over the forget set."""
    forget_weight = check_hparam("forget_weight", forget_weight, low=0.0)

    def batch_loss(fb, gen):
        rb = data.retain[torch.randint(data.retain.numel(), (fb.numel(),), generator=gen)]
        lf = nn.functional.cross_entropy(model(data.x[fb]), data.y[fb])
        lr_ = nn.functional.cross_entropy(model(data.x[rb]), data.y[rb])
        loss = lr_ - forget_weight * lf
        return loss, loss, fb.numel() + rb.numel()

    return _sgd_loop(model, data, data.forget, "gradient-difference", batch_loss, epochs, lr, batch_size, momentum,
                     seed)
