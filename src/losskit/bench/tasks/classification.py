"""The ``classification`` task: closed-set classification, optionally with
label noise and class imbalance, scored on clean, balanced test images.

Data.  The loader's images of *every* class (digits: all ten; an image
folder or Omniglot: the loader's train and test classes together) are split
per class: ``--test-fraction`` of each class's images (a fixed draw, the
same for every run and seed) are the test set, the rest train.  Then, on the
training part only, in this order and with fixed draws:

* ``--imbalance rho`` keeps ``n_max * rho^(-c / (C - 1))`` images of class
  ``c`` (the long-tail profile of Cao et al. 2019; class 0 keeps all);
* ``--label-noise eta`` corrupts ``eta`` of the training labels:
  ``--noise symmetric`` draws a uniform *other* class, ``pair`` maps class
  ``c`` to ``c + 1 mod C`` (Han et al. 2018's pair flip).  The test labels
  are never corrupted.

Training.  Every objective trains the same network (the bench's MLP or CNN
embedder plus a linear layer to ``C`` logits, initialised from the seed
alone) with the same shuffled batches of ``--batch-size`` images, the same
augmentation draws and the bench's optimiser axis (``--optimizer``, default
Adam, and ``--schedule``, default constant: :mod:`losskit.bench.optim_axis`)
on the network's parameters and the objective's own, if it has any; a
non-constant schedule records the cell's gradient norms, so a later
``--schedule refined --refine-from RUN_DIR`` run can use them.  An objective is a
registered ``logits`` objective called ``loss(logits, labels)``;
``adversarial-comp-sum`` is called ``loss.from_model(net, x, labels)`` (its
PGD inner maximisation runs on the network in training mode) and
``reweighted`` ``loss(logits, labels, sample_ids=...)`` with the training
image indices (GLOW's history), its weighter stepped after each optimiser
step and told each epoch's end.  The bench fills ``burn_in`` of the
``reweighted`` objectives: 10% of the cell's steps (the paper uses 1000 steps
of its pretraining runs; a short bench run would otherwise never reweight).

Metrics, on the test images: accuracy, macro-F1, NLL, expected calibration
error (15 bins) and robust accuracy under an l_inf PGD attack on the
cross-entropy at ``--pgd-radius`` (``--pgd-steps`` steps of
``2.5 radius / steps``, random start, pixels kept in [0, 1]; the network in
eval mode).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from losskit.core import registry

from ..errors import BenchConfigError, CellDiverged
from ..labels import base_name
from ..model import build_model, choose_model
from ..optim_axis import build_optim_axis
from .base import CellTrainer, Evaluation, Metric, Task, check_scalar_loss
from .embedding import affine, shift

__all__ = ["ClassificationTask", "ClosedSetData", "closed_set", "corrupt_labels", "imbalance_indices"]

#: the fixed seed of the data's draws (test split, imbalance, noise): the same data for every cell
DATA_SEED = 20240611
#: the seed offsets of a cell's batch order and augmentation
SHUFFLE_SEED_OFFSET = 7907
AUGMENT_SEED_OFFSET = 104729
#: the share of a cell's steps the bench gives the weighters' burn-in
BURN_IN_SHARE = 0.1


@dataclass
class ClosedSetData:
    name: str
    train_x: Tensor
    train_y: Tensor          # possibly noisy
    clean_train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def imbalance_indices(y: Tensor, rho: float, num_classes: int, gen: torch.Generator) -> Tensor:
    """Row indices keeping ``n_max * rho^(-c / (C - 1))`` rows of class ``c`` (at least 1)."""
    if rho <= 1.0 or num_classes < 2:
        return torch.arange(y.shape[0])
    counts = torch.bincount(y, minlength=num_classes)
    n_max = int(counts.max())
    keep = []
    for c in range(num_classes):
        rows = (y == c).nonzero().squeeze(1)
        n = max(1, int(n_max * rho ** (-c / (num_classes - 1))))
        keep.append(rows[torch.randperm(rows.shape[0], generator=gen)[:n]])
    return torch.cat(keep).sort().values


def corrupt_labels(y: Tensor, rate: float, kind: str, num_classes: int, gen: torch.Generator) -> Tensor:
    """``rate`` of the labels (a fixed random subset of that size) replaced: ``symmetric`` by a
    uniform other class, ``pair`` by ``c + 1 mod C``."""
    if rate <= 0 or num_classes < 2:
        return y.clone()
    n = y.shape[0]
    flip = torch.randperm(n, generator=gen)[: int(round(rate * n))]
    out = y.clone()
    if kind == "pair":
        out[flip] = (y[flip] + 1) % num_classes
    else:
        shift_ = torch.randint(1, num_classes, (flip.shape[0],), generator=gen)
        out[flip] = (y[flip] + shift_) % num_classes
    return out


def closed_set(split, test_fraction: float, imbalance: float = 1.0, label_noise: float = 0.0,
               noise: str = "symmetric") -> ClosedSetData:
    """The closed-set data of an open-set split (see the module docstring)."""
    x = torch.cat([split.train_x, split.test_x])
    y = torch.cat([split.train_y, split.test_y + len(split.train_classes)])
    classes = list(split.train_classes) + list(split.test_classes)
    gen = torch.Generator().manual_seed(DATA_SEED)
    tr, te = [], []
    for c in range(len(classes)):
        rows = (y == c).nonzero().squeeze(1)
        rows = rows[torch.randperm(rows.shape[0], generator=gen)]
        n_test = int(round(test_fraction * rows.shape[0]))
        if rows.shape[0] - n_test < 1 or n_test < 1:
            raise BenchConfigError(f"--test-fraction {test_fraction}: class {classes[c]!r} has {rows.shape[0]} "
                                   "images, too few for a train and a test image")
        te.append(rows[:n_test])
        tr.append(rows[n_test:])
    tr_idx, te_idx = torch.cat(tr).sort().values, torch.cat(te).sort().values
    train_x, train_y = x[tr_idx], y[tr_idx]
    keep = imbalance_indices(train_y, imbalance, len(classes), gen)
    train_x, train_y = train_x[keep].contiguous(), train_y[keep]
    noisy = corrupt_labels(train_y, label_noise, noise, len(classes), gen)
    return ClosedSetData(split.name, train_x, noisy, train_y, x[te_idx].contiguous(), y[te_idx], classes)


class _Net(nn.Module):
    """The bench's embedder and a linear layer to the class logits."""

    def __init__(self, embedder: nn.Module, embedding_dim: int, num_classes: int):
        super().__init__()
        self.embedder = embedder
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embedder(x))


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, device: torch.device, chunk: int = 1024) -> Tensor:
    model.eval()
    return torch.cat([model(x[i:i + chunk].to(device)).double().cpu() for i in range(0, len(x), chunk)])


class ClassificationTask(Task):
    name = "classification"
    objective_task = "logits"
    filled = ("burn_in",)
    default_first = ("cross-entropy",)
    default_variants = {"reweighted": ("reweighted[weighter=quadratic]", "reweighted[weighter=extremes]",
                                       "reweighted[weighter=glow]")}
    metrics = (
        Metric("accuracy", "acc"),
        Metric("macro-f1", "macro-F1"),
        Metric("nll", "NLL", percent=False, lower_is_better=True),
        Metric("ece", "ECE", lower_is_better=True),
        Metric("robust-accuracy", "robust acc"),
    )
    primary = "accuracy"
    leaderboard_note = "all metrics on the clean, held-out test images of the training classes"

    def validate(self, cfg) -> None:
        if cfg.dataset != "digits" and not cfg.data_dir:
            raise BenchConfigError(f"--dataset {cfg.dataset} needs --data-dir PATH")
        if not 0 < cfg.test_fraction < 1:
            raise BenchConfigError(f"--test-fraction must be in (0, 1); got {cfg.test_fraction}")
        if not 0 <= cfg.label_noise < 1:
            raise BenchConfigError(f"--label-noise must be in [0, 1); got {cfg.label_noise}")

    # ------------------------------------------------------------------ data

    def load_data(self, cfg) -> ClosedSetData:
        from losskit.data import load_dataset

        kw: dict[str, Any] = {}
        if cfg.dataset in ("folder", "omniglot"):
            kw["image_size"] = cfg.image_size
            if cfg.max_per_class is not None:
                kw["max_per_class"] = cfg.max_per_class
        try:
            split = load_dataset(cfg.dataset, cfg.data_dir, **kw)
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            raise BenchConfigError(f"--dataset {cfg.dataset} --data-dir {cfg.data_dir}: {e}") from e
        return closed_set(split, cfg.test_fraction, cfg.imbalance, cfg.label_noise, cfg.noise)

    def describe_data(self, data: ClosedSetData) -> str:
        noisy = float((data.train_y != data.clean_train_y).double().mean()) if data.train_y.numel() else 0.0
        counts = torch.bincount(data.clean_train_y, minlength=data.num_classes)
        return (f"{data.name} (closed set): {data.num_classes} classes, {len(data.train_y)} training images "
                f"({int(counts.min())}-{int(counts.max())} per class, {100 * noisy:.1f}% labels corrupted), "
                f"{len(data.test_y)} test images")

    def steps_per_epoch(self, cfg, data) -> int:
        return max(1, -(-len(data.train_y) // cfg.batch_size))

    def describe_steps(self, cfg, data) -> str:
        return f"{super().describe_steps(cfg, data)} of {cfg.batch_size} images"

    # ------------------------------------------------------------------ model, step, metrics

    def setup(self, cfg, data, objective, hparams, seed, device) -> CellTrainer:
        name = base_name(objective)
        spec = registry.spec(name, kind="objective")
        input_shape = tuple(data.train_x.shape[1:])
        embedder = build_model(cfg.model, input_shape, cfg.embedding_dim, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _Net(embedder, cfg.embedding_dim, data.num_classes).to(device)
        spe = self.steps_per_epoch(cfg, data)
        kwargs = dict(hparams)
        if "burn_in" in spec.hparams:
            kwargs["burn_in"] = int(BURN_IN_SHARE * cfg.epochs * spe)
            if kwargs.get("weighter") == "glow":
                kwargs.pop("burn_in")   # GLOW warms up for one epoch instead
        loss_fn, extra = self.build_trainable_objective(name, kwargs, seed, device)
        axis = build_optim_axis(cfg, model, extra, cfg.epochs * spe, objective, seed)
        opt = axis.optimizer
        shuffle = torch.Generator().manual_seed(seed + SHUFFLE_SEED_OFFSET)
        aug_gen = torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET)
        train_x, train_y = data.train_x.to(device), data.train_y.to(device)
        n = train_y.shape[0]
        adversarial = hasattr(loss_fn, "from_model")
        takes_ids = "sample_ids" in inspect.signature(loss_fn.forward if isinstance(loss_fn, nn.Module)
                                                      else loss_fn).parameters
        state = {"order": torch.randperm(n, generator=shuffle), "i": 0}

        def step() -> Tensor:
            if state["i"] >= spe:
                state["order"], state["i"] = torch.randperm(n, generator=shuffle), 0
                if hasattr(loss_fn, "end_epoch"):
                    loss_fn.end_epoch()
            b = state["i"]
            idx = state["order"][b * cfg.batch_size:(b + 1) * cfg.batch_size].to(device)
            state["i"] += 1
            x, y = train_x[idx], train_y[idx]
            if cfg.augment == "shift":
                x = shift(x, aug_gen)
            elif cfg.augment == "affine":
                x = affine(x, aug_gen)
            if adversarial:
                loss = loss_fn.from_model(model, x, y, generator=aug_gen)
            elif takes_ids:
                loss = loss_fn(model(x), y, sample_ids=idx)
            else:
                loss = loss_fn(model(x), y)
            check_scalar_loss(loss, objective)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            axis.after_step()
            if hasattr(loss_fn, "step"):
                loss_fn.step()
            return loss.detach()

        axis.info = {"batch_size": cfg.batch_size, "model": choose_model(cfg.model, input_shape),
                     "objective_params": sum(p_.numel() for p_ in extra),
                     **({"burn_in": kwargs["burn_in"]} if "burn_in" in kwargs else {}), **axis.info}

        return CellTrainer(
            step=step, steps_per_epoch=spe, modules=[model, *([loss_fn] if isinstance(loss_fn, nn.Module) else [])],
            model=model,
            info=axis.info,
            on_end=axis.finish,  # the optimiser axis adds the recorded gradient norms when training ends
        )

    def evaluate(self, cfg, data, trainer, device) -> Evaluation:
        from losskit.metrics.classification import classification_summary, robust_accuracy

        logits = _logits(trainer.model, data.test_x, device)
        if not torch.isfinite(logits).all():
            raise CellDiverged(f"{trainer.label} (seed {trainer.seed}): the trained network gives non-finite logits")
        scores = classification_summary(logits, data.test_y)
        if cfg.pgd_radius > 0:
            gen = torch.Generator().manual_seed(trainer.seed + DATA_SEED)
            scores["robust-accuracy"] = robust_accuracy(trainer.model, data.test_x, data.test_y, cfg.pgd_radius,
                                                        cfg.pgd_steps, norm="linf", clip=(0.0, 1.0),
                                                        generator=gen)
        train_logits = _logits(trainer.model, data.train_x, device)
        fit_noisy = float((train_logits.argmax(1) == data.train_y).double().mean())
        fit_clean = float((train_logits.argmax(1) == data.clean_train_y).double().mean())
        return Evaluation(scores, {"train_fit": {"noisy_labels": fit_noisy, "clean_labels": fit_clean}})

    def track(self, cfg, data, trainer, device) -> float | None:
        """Clean test accuracy of the network as it trains (the runner restores training mode)."""
        logits = _logits(trainer.model, data.test_x, device)
        if not torch.isfinite(logits).all():
            return float("nan")
        return float((logits.argmax(1) == data.test_y).double().mean())

    # ------------------------------------------------------------------ report

    def title(self, cfg, n_objectives: int) -> str:
        noise = f", {cfg.label_noise:g} {cfg.noise} label noise" if cfg.label_noise else ""
        imb = f", imbalance {cfg.imbalance:g}" if cfg.imbalance > 1 else ""
        return (f"losskit bench: {cfg.dataset} classification{noise}{imb}, {n_objectives} objectives x "
                f"{cfg.seeds} seeds, {cfg.epochs} epochs")

    def plot_title(self, cfg, data_name: str | None = None) -> str:
        return f"losskit bench: {data_name or cfg.dataset} classification"
