"""Training and evaluating one (objective, seed) cell of any task.

The task builds the cell (:meth:`Task.setup`: model, objective, optimiser,
batches, one training step) and scores it (:meth:`Task.evaluate`); this
module runs the epochs in between, the same way for every task: torch's
global generator seeded from the seed, the steps timed, the memory measured,
a NaN or infinite loss reported as :class:`CellDiverged`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from .errors import CellDiverged
from .labels import base_name
from .measure import measure_step_memory, param_bytes

__all__ = ["run_cell", "CellDiverged", "STEP_SEED_OFFSET"]

#: Before the first step, ``torch.manual_seed(seed + STEP_SEED_OFFSET)``: objectives that draw
#: random numbers (sampled heads, random margins) draw the same ones whatever ran before the
#: cell, so a resumed cell equals an uninterrupted one.
STEP_SEED_OFFSET = 15485863


def _plain_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)) for k, v in hparams.items()}


def _early_stopper(task, cfg):
    """``--early-stop EPS``: a learning-curve forecaster over the held-out metric (docs/theory.md), or None."""
    eps = float(getattr(cfg, "early_stop", 0.0) or 0.0)
    if eps <= 0:
        return None
    from losskit.metrics.learning_curves import LearningCurveForecaster

    f = LearningCurveForecaster(target_x=float(cfg.epochs), epsilon=eps, upper=None)
    # the pattern is increasing: a lower-is-better primary metric is fed negated
    f.sign = -1.0 if any(m.key == task.primary and m.lower_is_better for m in task.metrics) else 1.0
    return f


def _should_stop(forecaster, epoch: int, value: float) -> bool:
    if not math.isfinite(value):
        return False
    forecaster.update(epoch, forecaster.sign * value)
    return forecaster.should_stop


def run_cell(task, cfg, data: Any, objective: str, hparams: dict[str, Any], seed: int, device: torch.device,
             on_step: Callable[[], None] | None = None, split: int = 0,
             keep: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Train ``objective`` (a label; ``hparams`` already holds its variant's params) from ``seed``
    for ``cfg.epochs`` epochs and evaluate it.  Returns the cell's record (JSON-plain): metrics,
    loss per epoch, the held-out metric over training (``epoch_metric``, when the task tracks
    one), time, memory, and the task's own fields.  ``keep(trainer)`` is called after the
    evaluation (``--save-models``)."""
    trainer = task.setup(cfg, data, objective, hparams, seed, device)
    trainer.label, trainer.seed = objective, seed
    torch.manual_seed(seed + STEP_SEED_OFFSET)
    for m in trainer.modules:
        m.train()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    per_epoch = trainer.steps_per_epoch
    epoch_loss: list[float] = []
    total_steps = cfg.epochs * per_epoch
    train_time = 0.0
    memory_mb = float("nan")
    memory_kind = "cuda_max_allocated" if cuda else "cpu_profiler_step"
    n = 0
    every = int(getattr(cfg, "track_every", 0) or 0)
    tracked: list[list[float]] = []  # [epoch, value]
    track_time = 0.0
    forecaster = _early_stopper(task, cfg) if every else None
    stopped_at = None
    try:
        for epoch in range(cfg.epochs):
            losses = []
            t0 = time.perf_counter()
            for _ in range(per_epoch):
                if n == 0 and not cuda:
                    # the first step is profiled for memory and left out of the timing
                    tp = time.perf_counter()
                    memory_mb, loss = measure_step_memory(trainer.step, param_bytes(*trainer.modules))
                    t0 += time.perf_counter() - tp
                else:
                    loss = trainer.step()
                n += 1
                losses.append(loss)
                if on_step is not None:
                    on_step()
            values = torch.stack(losses).float().cpu()  # one device sync per epoch
            train_time += time.perf_counter() - t0
            if not torch.isfinite(values).all():
                first = int((~torch.isfinite(values)).nonzero()[0])
                raise CellDiverged(f"{objective} (seed {seed}): loss became {float(values[first])} "
                                   f"at step {first + 1 + epoch * per_epoch} of {total_steps}")
            epoch_loss.append(float(values.mean()))
            if every and ((epoch + 1) % every == 0 or epoch + 1 == cfg.epochs):
                t1 = time.perf_counter()
                value = task.track(cfg, data, trainer, device)
                for m in trainer.modules:
                    m.train()
                track_time += time.perf_counter() - t1
                if value is None:
                    every = 0
                else:
                    tracked.append([epoch + 1, float(value)])
                    if (forecaster is not None and epoch + 1 < cfg.epochs
                            and _should_stop(forecaster, epoch + 1, value)):
                        stopped_at = epoch + 1
                        break
    finally:  # the last step, an early stop or an error: the task records what it kept
        if trainer.on_end is not None:
            trainer.on_end()
    if cuda:
        memory_mb = torch.cuda.max_memory_allocated(device) / 2**20

    t0 = time.perf_counter()
    scores = task.evaluate(cfg, data, trainer, device)
    eval_time = time.perf_counter() - t0
    if keep is not None:
        keep(trainer)

    record = {
        "objective": objective,
        "name": base_name(objective),
        "seed": seed,
        "hparams": _plain_hparams(hparams),
        "metrics": dict(scores.metrics),
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "steps": n,
        "timed_steps": n if cuda else n - 1,
        "peak_memory_mb": memory_mb,
        "memory_kind": memory_kind,
        "epoch_loss": epoch_loss,
        **({"epoch_metric": tracked, "tracked_metric": task.primary, "track_time_s": track_time} if tracked else {}),
        **({"stopped_at_epoch": stopped_at} if stopped_at is not None else {}),
        **trainer.info,
        **scores.extras,
        "device": str(device),
    }
    record["split"] = split
    return record
