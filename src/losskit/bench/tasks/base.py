"""What a bench task is: the interface the shared runner drives.

The runner owns everything that is the same for every task: the run folder
and its files, ``--resume``, the seeds, the grid of (objective, seed) cells,
the epoch loop with its timing, memory measure and divergence check, the
leaderboard and the plots.  A :class:`Task` owns what differs: the data, the
model, one training step, the metrics, and how the leaderboard names them.
docs/bench.md, "Writing a task", walks through a new one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from losskit.core import registry

if TYPE_CHECKING:  # pragma: no cover
    from losskit.bench.config import BenchConfig

__all__ = ["Task", "Metric", "CellTrainer", "Evaluation", "OBJECTIVE_SEED_OFFSET", "check_scalar_loss"]

#: An objective is built under ``torch.manual_seed(seed + OBJECTIVE_SEED_OFFSET)`` (its own
#: parameters, such as class weights or proxies, are then the same for a seed whatever ran before).
OBJECTIVE_SEED_OFFSET = 7919


def check_scalar_loss(loss: Any, objective: str) -> Tensor:
    """A training step's loss must be a scalar tensor: else a TypeError naming the objective and what it gave."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(f"objective {objective!r} must return a scalar loss tensor; got {shape}")
    return loss


@dataclass(frozen=True)
class Metric:
    """A leaderboard column: the key in a cell's ``metrics``, its short label, how it prints."""

    key: str
    label: str
    #: printed as a percentage (x100, header ``"LABEL %"``); otherwise 3 significant digits
    percent: bool = True
    lower_is_better: bool = False


@dataclass
class CellTrainer:
    """One cell, ready to train: what :meth:`Task.setup` returns to the runner.

    The runner seeds torch's global generator, puts ``modules`` in training mode,
    calls ``step()`` ``epochs * steps_per_epoch`` times (timing it; on CPU it
    profiles the first step for memory) or fewer (``--early-stop``), calls
    ``on_end()`` once training ends for any reason, then hands the trainer to
    :meth:`Task.evaluate`.
    """

    #: one optimisation step; returns the batch's loss, detached (a 0-dim tensor; not synced)
    step: Callable[[], Tensor]
    steps_per_epoch: int
    #: the trained modules (network, objective): set to train mode; their bytes count in memory
    modules: list[nn.Module]
    #: what :meth:`Task.evaluate` needs (usually the network)
    model: Any = None
    #: extra JSON-plain fields of the cell record (after ``epoch_loss``)
    info: dict[str, Any] = field(default_factory=dict)
    #: called once when training ends -- after the last step, an early stop or an error -- before
    #: the evaluation; it may add fields to ``info`` (the optimiser axis copies its gradient norms)
    on_end: Callable[[], None] | None = None
    #: the cell's objective label and seed (set by the runner before training; for messages)
    label: str = ""
    seed: int = 0


@dataclass
class Evaluation:
    """A trained cell's scores: ``metrics`` (name -> float) and extra JSON-plain record fields."""

    metrics: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A bench task.  Subclass, fill the class attributes, implement the abstract methods,
    and add it to :data:`losskit.bench.tasks.TASKS` (``register_task``)."""

    #: the name ``--task`` selects
    name: ClassVar[str]
    #: the registry ``task`` of the objectives it trains: ``registry.specs(kind="objective", task=...)``
    objective_task: ClassVar[str]
    #: hyperparameters the task fills from the data and model (users cannot ``--set`` them)
    filled: ClassVar[tuple[str, ...]] = ()
    #: objectives placed first in the default list, when registered
    default_first: ClassVar[tuple[str, ...]] = ()
    #: variants added to the default list right after their base objective
    default_variants: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: leaderboard columns, in order (bar plots too); those absent from every cell are not shown
    metrics: ClassVar[tuple[Metric, ...]]
    #: the metric the leaderboard is sorted by (best first)
    primary: ClassVar[str]
    #: said after "sorted by ..." under the leaderboard, e.g. where the metrics are measured
    leaderboard_note: ClassVar[str] = ""
    #: whether :meth:`load_split` honours ``--splits``/``--split-seed`` (else they are refused)
    supports_splits: ClassVar[bool] = False
    #: reference rows of the leaderboard (:meth:`evaluate_baseline`), e.g. the raw input
    baselines: ClassVar[tuple[str, ...]] = ()
    #: what each baseline row is, for the leaderboard's footer
    baseline_notes: ClassVar[dict[str, str]] = {}

    # ------------------------------------------------------------------ configuration

    def validate(self, cfg: "BenchConfig") -> None:
        """Refuse a configuration this task cannot run (raise BenchConfigError); field ranges
        and choices are already checked by ``BenchConfig.validate``."""

    def check_hparams(self, label: str, hparams: dict[str, Any]) -> None:
        """Refuse resolved hyperparameters this task cannot train (raise BenchConfigError)."""

    # ------------------------------------------------------------------ data

    @abstractmethod
    def load_data(self, cfg: "BenchConfig") -> Any:
        """The data every cell trains and evaluates on (loaded once per run; a bad path or
        malformed data is a BenchConfigError)."""

    @abstractmethod
    def describe_data(self, data: Any) -> str:
        """One line about the data for the run's log, e.g. ``"digits: 5 train classes (...)"``."""

    @abstractmethod
    def steps_per_epoch(self, cfg: "BenchConfig", data: Any) -> int:
        """Training steps per epoch (the same for every objective)."""

    def load_split(self, cfg: "BenchConfig", split: int) -> Any:
        """The data of class split ``split`` (0-based; its seed is ``cfg.split_seed + split``).
        Default: :meth:`load_data` (a task without :attr:`supports_splits` has one split)."""
        return self.load_data(cfg)

    def split_classes(self, data: Any) -> dict[str, list[str]] | None:
        """The class names of a split (saved in the run folder): default the data's
        ``train_classes``/``test_classes`` when it has them."""
        if hasattr(data, "train_classes") and hasattr(data, "test_classes"):
            return {"train_classes": [str(c) for c in data.train_classes],
                    "test_classes": [str(c) for c in data.test_classes]}
        return None

    def check_data(self, cfg: "BenchConfig", data: Any) -> list[str]:
        """Checked once per split before any training: raise BenchConfigError when a metric
        would be undefined; return warnings (logged, and kept in the run folder)."""
        return []

    def data_name(self, cfg: "BenchConfig", data: Any) -> str:
        """The data set's name for titles."""
        return str(getattr(data, "name", None) or getattr(cfg, "dataset", self.name))

    def check_objective(self, cfg: "BenchConfig", data: Any, label: str, hparams: dict[str, Any],
                        device: torch.device) -> None:
        """Called for every objective before any training, so that a bad value is an error at
        the start naming the objective.  Default: :meth:`setup` once (builds the objective)."""
        self.setup(cfg, data, label, hparams, 0, device)

    def describe_steps(self, cfg: "BenchConfig", data: Any) -> str:
        """What one cell trains, for the run's log."""
        return f"{cfg.epochs} epochs = {cfg.epochs * self.steps_per_epoch(cfg, data)} steps"

    # ------------------------------------------------------------------ model, step, metrics

    @abstractmethod
    def setup(self, cfg: "BenchConfig", data: Any, objective: str, hparams: dict[str, Any], seed: int,
              device: torch.device) -> CellTrainer:
        """Build the model (from ``seed`` alone), the objective (:meth:`build_objective`), the
        optimiser and the seeded batches of one cell, and return its training step."""

    @abstractmethod
    def evaluate(self, cfg: "BenchConfig", data: Any, trainer: CellTrainer, device: torch.device) -> Evaluation:
        """Score the trained cell (raise CellDiverged when its output is not finite)."""

    def evaluate_baseline(self, cfg: "BenchConfig", data: Any, name: str, seed: int,
                          device: torch.device) -> Evaluation:
        """Score baseline ``name`` (one of :attr:`baselines`) for ``seed`` on ``data``."""
        raise NotImplementedError(f"task {self.name!r} lists baseline {name!r} but does not evaluate it")

    def track(self, cfg: "BenchConfig", data: Any, trainer: CellTrainer, device: torch.device) -> float | None:
        """The held-out :attr:`primary` metric of the model as it trains (called after an epoch
        every ``--track-every`` epochs; it must not change the training).  Default: None (no curve)."""
        return None

    def model_record(self, cfg: "BenchConfig", data: Any, trainer: CellTrainer) -> dict[str, Any] | None:
        """What ``--save-models`` keeps of a trained cell (``torch.save``-able), or None.
        Default: the state_dict of ``trainer.model`` when it is an nn.Module."""
        if isinstance(trainer.model, nn.Module):
            return {"state_dict": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}}
        return None

    def build_objective(self, name: str, kwargs: dict[str, Any], seed: int) -> Any:
        """``registry.get(name, **kwargs)`` under the seed convention (:data:`OBJECTIVE_SEED_OFFSET`),
        leaving torch's global generator as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + OBJECTIVE_SEED_OFFSET)
            return registry.get(name, **kwargs)

    def build_trainable_objective(self, name: str, kwargs: dict[str, Any], seed: int,
                                  device: Any) -> tuple[Any, list[Tensor]]:
        """:meth:`build_objective` moved to ``device``, with the objective's own trainable
        parameters (a margin head's weights; empty for a plain function) for the optimiser."""
        loss_fn = self.build_objective(name, kwargs, seed)
        if not isinstance(loss_fn, nn.Module):
            return loss_fn, []
        loss_fn = loss_fn.to(device)
        return loss_fn, [p for p in loss_fn.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ report

    def title(self, cfg: "BenchConfig", n_objectives: int) -> str:
        """The leaderboard's first line."""
        return f"losskit bench: {self.name}, {n_objectives} objectives x {cfg.seeds} seeds"

    def plot_title(self, cfg: "BenchConfig", data_name: str | None = None) -> str:
        return f"losskit bench: {self.name}" + (f" on {data_name}" if data_name else "")

    def plots(self, plt: Any, run: Any, rows: list[dict[str, Any]], folder: Path, title: str) -> list[Path]:
        """Task-specific PNGs in ``folder`` (the shared metric bars, training curves and cost
        plots are drawn for every task); ``plt`` is matplotlib.pyplot (Agg)."""
        return []

    # ------------------------------------------------------------------ helpers for the shared code

    def metric(self, key: str) -> Metric:
        for m in self.metrics:
            if m.key == key:
                return m
        return Metric(key, key)

    def __repr__(self) -> str:
        return f"<bench task {self.name!r}>"
