"""Training recipes built on losskit's objectives (DRIFT, IGNITE, ...).

Each recipe lives in its own module (``losskit.recipes.drift``) and is
registered with ``kind="recipe"``; its function is ``run_<name>``.
"""

from losskit.recipes.drift import DSATRecord, SamplingPolicy, run_drift
from losskit.recipes.ignite import IGNITE, run_ignite

__all__ = ["DSATRecord", "SamplingPolicy", "run_drift", "IGNITE", "run_ignite"]
