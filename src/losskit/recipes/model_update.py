"""Train a model update end to end with few negative flips (Margin Preserving Training).

Ricci et al., "Mitigating Negative Flips via Margin Preserving Training"
(AAAI 2026, arXiv:2511.08322); code miccunifi/negative_flip_MPT.

``old_model`` was trained on the first ``C_old`` classes; the update
``model`` predicts all ``C`` classes (old classes first).  ``method``:

* ``"ce"``: plain cross-entropy (training from scratch, or fine-tuning when
  ``model`` starts from the old weights: the caller's choice);
* ``"calibration"``: CE on ``z + b 1[new class]`` only (the paper's
  "no distillation" ablation);
* ``"focal-distillation"``: CE + focal distillation from the old model on the
  old classes (PCT-style, no bias);
* ``"mpt-no-bias"``: CE + both focal distillation terms;
* ``"mpt"``: the full method, margin-calibrated CE + focal distillation from
  the old model (old classes) and from an independently trained new model
  (all classes).

The methods that need ``new_model`` train one first when it is not given: a
copy of ``model``'s initial weights trained with CE on the same data, same
schedule (the paper's "independently trained new model").

Registered as the recipe ``model-update``: ``losskit.get("model-update",
method="mpt", epochs=30)`` then ``recipe(model, x, y, old_model=old)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losskit.core.checks import check_choice, check_hparam, check_int, shape_str
from losskit.core.registry import register
from losskit.functional.negative_flips import margin_preserving_loss
from losskit.losses.negative_flips import MPT_PAPER

__all__ = ["ModelUpdateResult", "run_model_update", "train_classifier", "UPDATE_METHODS"]

UPDATE_METHODS = ("ce", "calibration", "focal-distillation", "mpt-no-bias", "mpt")


@dataclass
class ModelUpdateResult:
    model: nn.Module
    new_model: nn.Module | None       # the independent reference (given or trained here), if the method used one
    epoch_losses: list[float] = field(default_factory=list)


def _default_opt(params, lr: float, weight_decay: float):
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _loop(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
          epochs: int, batch_size: int, opt: torch.optim.Optimizer, gen: torch.Generator) -> list[float]:
    losses = []
    n = x.shape[0]
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        tot, cnt = 0.0, 0
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            xb, yb = x[idx], y[idx]
            loss = loss_fn(model(xb), yb, xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
        losses.append(tot / max(cnt, 1))
    model.eval()
    return losses


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 30, lr: float = 1e-3,
                     batch_size: int = 128, weight_decay: float = 5e-4, seed: int = 0) -> list[float]:
    """Plain cross-entropy training in place (the old model, the independent new model, the baselines)."""
    gen = torch.Generator().manual_seed(seed)
    opt = _default_opt(model.parameters(), lr, weight_decay)
    return _loop(model, x, y, lambda z, yb, xb: F.cross_entropy(z, yb), epochs, batch_size, opt, gen)


@torch.no_grad()
def _logits(m: nn.Module, x: Tensor) -> Tensor:
    was = m.training
    m.eval()
    out = m(x)
    m.train(was)
    return out


@register("model-update", family="continual", kind="recipe", paper=MPT_PAPER,
          summary="Model update with few negative flips: CE, calibration, focal distillation or full MPT "
                  "(margin calibration + double-source focal distillation).")
def run_model_update(model: nn.Module, x: Tensor, y: Tensor, old_model: nn.Module,
                     new_model: nn.Module | None = None, *, method: str = "mpt", num_old_classes: int | None = None,
                     bias: float = 4.0, alpha: float = 1.0, beta: float = 5.0, temperature: float = 5.0,
                     epochs: int = 30, lr: float = 1e-3, batch_size: int = 128, weight_decay: float = 5e-4,
                     seed: int = 0) -> ModelUpdateResult:
    """Train ``model`` in place on ``(x, y)`` (labels over all ``C`` classes).

    ``old_model`` (and ``new_model``) are references: they are put in eval
    mode and their parameters set to ``requires_grad=False``."""
    if not isinstance(model, nn.Module) or not isinstance(old_model, nn.Module):
        raise TypeError("model and old_model: expected nn.Modules that output logits")
    check_choice("method", method, UPDATE_METHODS)
    bias = check_hparam("bias", bias)
    alpha = check_hparam("alpha", alpha, low=0.0)
    beta = check_hparam("beta", beta, low=0.0)
    temperature = check_hparam("temperature", temperature, low=0.0, low_open=True)
    epochs = check_int("epochs", epochs, low=1)
    lr = check_hparam("lr", lr, low=0.0, low_open=True)
    batch_size = check_int("batch_size", batch_size, low=1)
    weight_decay = check_hparam("weight_decay", weight_decay, low=0.0)
    seed = check_int("seed", seed)
    if not isinstance(x, Tensor) or x.shape[0] == 0:
        raise ValueError(f"x: expected a non-empty tensor with one row per sample, got "
                         f"{shape_str(x) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
        raise ValueError(f"y: expected [{x.shape[0]}] integer labels, got "
                         f"{shape_str(y) if isinstance(y, Tensor) else type(y).__name__}")
    probe = x[: min(2, x.shape[0])]
    C = _logits(model, probe).shape[1]
    c_old = _logits(old_model, probe).shape[1]
    if num_old_classes is not None:
        num_old_classes = check_int("num_old_classes", num_old_classes, low=1)
        if c_old != num_old_classes:
            raise ValueError(f"old_model: the old model's classes do not match: it outputs {c_old} classes, "
                             f"num_old_classes is {num_old_classes}")
    if c_old > C:
        raise ValueError(f"old_model: the old model's classes do not match: it outputs {c_old} classes, the "
                         f"updated model {C} (the old classes must be the first columns of the update)")
    if int(y.min()) < 0 or int(y.max()) >= C:
        raise ValueError(f"y: expected labels in [0, {C - 1}] (the model's {C} classes), got "
                         f"[{int(y.min())}, {int(y.max())}]")
    for p in old_model.parameters():
        p.requires_grad_(False)
    old_model.eval()

    needs_new = method in ("mpt", "mpt-no-bias")
    if needs_new and new_model is None:
        new_model = copy.deepcopy(model)
        train_classifier(new_model, x, y, epochs=epochs, lr=lr, batch_size=batch_size,
                         weight_decay=weight_decay, seed=seed + 1)
    if needs_new:
        c_new = _logits(new_model, probe).shape[1]
        if c_new != C:
            raise ValueError(f"new_model: expected {C} classes (as model), it outputs {c_new}")
        for p in new_model.parameters():
            p.requires_grad_(False)
        new_model.eval()

    b = bias if method in ("mpt", "calibration") else 0.0

    def loss_fn(z: Tensor, yb: Tensor, xb: Tensor) -> Tensor:
        if method == "ce":
            return F.cross_entropy(z, yb)
        with torch.no_grad():
            zo = old_model(xb)
            zn = new_model(xb) if needs_new else None
        if method == "calibration":
            # margin calibration without distillation: a zero-weight old-model term keeps one code path
            return margin_preserving_loss(z, yb, zo, None, b, 0.0, 0.0, temperature)
        return margin_preserving_loss(z, yb, zo, zn, b, alpha, beta, temperature)

    gen = torch.Generator().manual_seed(seed)
    opt = _default_opt(model.parameters(), lr, weight_decay)
    losses = _loop(model, x, y, loss_fn, epochs, batch_size, opt, gen)
    return ModelUpdateResult(model, new_model if needs_new else None, losses)
