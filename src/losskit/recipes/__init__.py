"""Training recipes built on losskit's objectives (DRIFT, ...).

Each recipe lives in its own module (``losskit.recipes.drift``) and is
registered with ``kind="recipe"``; its function is ``run_<name>``.
"""

from losskit.recipes.drift import DSATRecord, SamplingPolicy, run_drift

__all__ = ["DSATRecord", "SamplingPolicy", "run_drift"]
