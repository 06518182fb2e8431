"""Training recipes built on losskit's objectives (DRIFT, ...).

Each recipe lives in its own module (``losskit.recipes.drift``) and is
registered with ``kind="recipe"``; its function is ``run_<name>``.
"""

from losskit.recipes.drift import DSATRecord, SamplingPolicy, run_drift
from losskit.recipes.linear_mdp import LayeredLinearMDP, run_policy_optimization
from losskit.recipes.unfolded import SparseProblem, UnfoldedIHT, UnfoldedISTA, train_unfolded

__all__ = ["DSATRecord", "SamplingPolicy", "run_drift", "SparseProblem", "UnfoldedISTA", "UnfoldedIHT", "train_unfolded",
           "LayeredLinearMDP", "run_policy_optimization"]
