"""Training recipes built on losskit's objectives (DRIFT, ...)."""

from losskit.recipes.drift import DSATRecord, SamplingPolicy, drift

__all__ = ["DSATRecord", "SamplingPolicy", "drift"]
