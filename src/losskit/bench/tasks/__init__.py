"""The bench's tasks, by name (``losskit bench --task NAME``; default ``embedding``).

A task is a :class:`~losskit.bench.tasks.base.Task`: data, model, training
step, metrics and leaderboard columns.  The runner, the run folder, resume,
seeds, leaderboard and plots are shared by every task.
"""

from __future__ import annotations

import difflib

from ..errors import BenchConfigError
from .base import CellTrainer, Evaluation, Metric, Task
from .classification import ClassificationTask
from .embedding import EmbeddingTask
from .paired import PairedTask

__all__ = ["Task", "Metric", "CellTrainer", "Evaluation", "TASKS", "DEFAULT_TASK", "register_task", "get_task",
           "names"]

#: name -> task instance
TASKS: dict[str, Task] = {}
DEFAULT_TASK = "embedding"


def register_task(task: Task) -> Task:
    """Make ``task`` selectable by its name (``--task``)."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a Task instance; got {type(task).__name__}")
    if task.name in TASKS and type(TASKS[task.name]) is not type(task):
        raise ValueError(f"bench task {task.name!r} is already registered by {type(TASKS[task.name]).__name__}")
    TASKS[task.name] = task
    return task


def names() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name is a BenchConfigError naming the closest."""
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), list(TASKS), n=3, cutoff=0.4)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise BenchConfigError(f"--task: unknown task {name!r}.{hint} Tasks: {', '.join(TASKS)}.")
    return TASKS[name]


register_task(EmbeddingTask())
register_task(PairedTask())
register_task(ClassificationTask())
