"""Training recipes built on losskit's objectives (DRIFT, IGNITE, model updates, MVP, self-training, ...).

Each recipe lives in its own module (``losskit.recipes.drift``) and is
registered with ``kind="recipe"``; its function is ``run_<name>``.
"""

from losskit.recipes.drift import DSATRecord, SamplingPolicy, run_drift
from losskit.recipes.ignite import IGNITE, run_ignite
from losskit.recipes.linear_mdp import LayeredLinearMDP, run_policy_optimization
from losskit.recipes.model_update import run_model_update
from losskit.recipes.mvp import run_online_continual
from losskit.recipes.prompt_vit import MVPModel, TinyViT
from losskit.recipes.self_training import TorchClassifier, run_self_training
from losskit.recipes.unfolded import SparseProblem, UnfoldedIHT, UnfoldedISTA, train_unfolded

__all__ = ["DSATRecord", "SamplingPolicy", "run_drift", "SparseProblem", "UnfoldedISTA", "UnfoldedIHT", "train_unfolded",
           "LayeredLinearMDP", "run_policy_optimization", "run_model_update", "run_self_training", "TorchClassifier",
           "run_online_continual", "MVPModel", "TinyViT", "IGNITE", "run_ignite"]
