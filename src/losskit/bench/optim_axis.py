"""The bench's optimiser axis: ``--optimizer`` and ``--schedule``.

Every cell of a run trains with the same optimiser and learning-rate schedule
(so that objectives stay comparable); two runs that differ only in
``--optimizer``/``--schedule`` compare those on the user's data with the same
protocol (data, network, batches, seeds, budget).

* ``--optimizer``: ``adam`` (the default, torch's Adam with ``--weight-decay``
  as L2), ``adamw`` (decoupled), ``sgd`` (momentum 0.9) or ``frugal``
  (:class:`losskit.optim.FRUGAL` with its defaults; the network's Linear
  weights except the last are projectable, everything else -- including the
  objective's own parameters -- is on AdamW).
* ``--schedule``: ``constant`` (the default), ``cosine`` (to 0 at the last
  step), ``linear-decay`` (:class:`losskit.optim.LinearDecayLR`) or
  ``refined`` (:class:`losskit.optim.RefinedLR` from the gradient norms that
  a previous run, given with ``--refine-from RUN_DIR``, recorded for the same
  objective and seed; without ``--refine-from`` the bench first trains that
  previous run itself, a *pilot* with ``--schedule linear-decay`` and every
  other option the same, into ``OUT/pilot/``: twice the training time).  Every non-constant schedule records the cell's
  per-step gradient norms (``grad_norms_l1``, ``grad_norms_l2`` in the cell's
  JSON) so that its run can seed a refined one.  They are copied when the
  cell's training ends for any reason (the runner's ``on_end`` hook), so a
  cell stopped by ``--early-stop`` records the steps it trained; a refined
  cell stretches the previous cell's norms to its own length (as for any new
  run length) and records how many there were (``refined_from_steps``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import BenchConfigError

__all__ = ["OPTIMIZERS", "SCHEDULES", "PILOT_DIR", "PILOT_SCHEDULE", "OptimAxis", "build_optim_axis",
           "validate_axis", "needs_pilot"]

OPTIMIZERS = ("adam", "adamw", "sgd", "frugal")
SCHEDULES = ("constant", "cosine", "linear-decay", "refined")
#: ``--schedule refined`` without ``--refine-from``: the pilot run's folder inside the run folder, and its schedule
PILOT_DIR, PILOT_SCHEDULE = "pilot", "linear-decay"


class OptimAxis:
    """The optimiser of one cell, its scheduler (or ``None``) and its gradient-norm recorder."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler, recorder, total_steps: int):
        self.optimizer, self.scheduler, self.recorder = optimizer, scheduler, recorder
        self.total_steps = total_steps
        self.steps = 0
        self.info: dict[str, Any] = {}

    def after_step(self) -> None:
        """Advance the schedule (after each optimiser step)."""
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1

    def finish(self) -> None:
        """Copy the recorded norms into ``info``: the cell's ``on_end`` hook, called by the runner when
        training ends for any reason (the last step, ``--early-stop``, an error), so that a cell that
        stopped early still seeds a refined run (with the steps it trained)."""
        if self.recorder is not None:
            self.info["grad_norms_l1"] = self.recorder.norms("l1")
            self.info["grad_norms_l2"] = self.recorder.norms("l2")


def needs_pilot(cfg) -> bool:
    """``--schedule refined`` without ``--refine-from``: the bench trains a pilot run first."""
    return cfg.schedule == "refined" and not cfg.refine_from


def validate_axis(cfg) -> None:
    if cfg.refine_from and cfg.schedule != "refined":
        raise BenchConfigError(f"--refine-from is only used with --schedule refined (got --schedule {cfg.schedule})")
    if cfg.refine_from and not (Path(cfg.refine_from) / "cells").is_dir():
        raise BenchConfigError(f"--refine-from {cfg.refine_from}: not a bench run folder (no cells/ inside)")


def _previous_norms(run_dir: str, objective: str, seed: int, kind: str) -> list[float]:
    from .store import cell_path

    p = cell_path(Path(run_dir), objective, seed)
    if not p.is_file():
        raise BenchConfigError(f"--refine-from {run_dir}: no finished cell for {objective!r} seed {seed} ({p.name})")
    with open(p) as f:
        cell = json.load(f)
    key = f"grad_norms_{kind}"
    if key not in cell:
        raise BenchConfigError(f"--refine-from {run_dir}: the cell {p.name} has no {key} (it ran with --schedule "
                               f"{cell.get('schedule', 'constant')}; run it with a non-constant schedule first)")
    return cell[key]


def _optimizer(cfg, model: nn.Module, extra: list[Tensor]) -> torch.optim.Optimizer:
    params = list(model.parameters()) + list(extra)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    from losskit.optim import FRUGAL, frugal_param_groups

    groups = frugal_param_groups(model)
    if extra:
        groups.append({"params": list(extra), "projectable": False})
    return FRUGAL(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_optim_axis(cfg, model: nn.Module, extra: list[Tensor], total_steps: int, objective: str,
                     seed: int) -> OptimAxis:
    """The optimiser, schedule and recorder of one cell (``total_steps`` optimiser steps)."""
    from losskit.optim import GradNormRecorder, LinearDecayLR, RefinedLR

    opt = _optimizer(cfg, model, extra)
    sched = None
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps - 1))
    elif cfg.schedule == "linear-decay":
        sched = LinearDecayLR(opt, total_steps=max(2, total_steps))
    elif cfg.schedule == "refined":
        base = "sgd" if cfg.optimizer == "sgd" else "adam"
        norms = _previous_norms(cfg.refine_from, objective, seed, "l2" if base == "sgd" else "l1")
        sched = RefinedLR(opt, norms, total_steps=max(2, total_steps), base=base)
    rec = GradNormRecorder(opt) if cfg.schedule != "constant" else None
    axis = OptimAxis(opt, sched, rec, total_steps)
    axis.info.update({"optimizer": cfg.optimizer, "schedule": cfg.schedule})
    if cfg.schedule == "refined":
        axis.info["refined_from_steps"] = len(norms)
    return axis

