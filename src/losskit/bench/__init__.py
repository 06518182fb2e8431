"""losskit.bench: the ``losskit bench`` main job (comparing objectives on a task).

    >>> from losskit.bench import BenchConfig, run_bench
    >>> run = run_bench(BenchConfig(objectives=["softmax"], seeds=1, epochs=2), "runs/example")
    >>> print(run.leaderboard)

A task (:mod:`losskit.bench.tasks`; default ``embedding``: open-set retrieval
on held-out classes) defines the data, model, training step and metrics; the
runner, run folder, resume, seeds, leaderboard and plots are shared.  See
docs/bench.md for the protocol, the run folder's contents and how to write a task.
"""

from losskit.bench.config import BenchConfig
from losskit.bench.errors import BenchConfigError
from losskit.bench.runner import BenchRun, run_bench
from losskit.bench.tasks import Task, get_task, register_task

__all__ = ["BenchConfig", "BenchConfigError", "BenchRun", "run_bench", "Task", "get_task", "register_task"]
