"""losskit.bench: the ``losskit bench`` main job (open-set comparison of objectives).

    >>> from losskit.bench import BenchConfig, run_bench
    >>> run = run_bench(BenchConfig(objectives=["softmax"], seeds=1, epochs=2), "runs/example")
    >>> print(run.leaderboard)

See docs/bench.md for the protocol and the run folder's contents.
"""

from losskit.bench.config import BenchConfig, BenchConfigError
from losskit.bench.runner import BenchRun, run_bench

__all__ = ["BenchConfig", "BenchConfigError", "BenchRun", "run_bench"]
