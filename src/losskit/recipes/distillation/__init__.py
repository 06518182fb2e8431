"""Dataset distillation: AST on trajectory matching (MTT).  See docs/unlearning.md."""

from losskit.recipes.distillation.ast import (DistilledSet, ParamLayout, balanced_inner_weight, clipping_coefficient,
                                              evaluate_synthetic, flatten_params, input_gradient_penalty, kmeans,
                                              perturb_weights, representative_init, run_ast, run_mtt, train_expert)

__all__ = ["DistilledSet", "ParamLayout", "balanced_inner_weight", "clipping_coefficient", "evaluate_synthetic",
           "flatten_params", "input_gradient_penalty", "kmeans", "perturb_weights", "representative_init", "run_ast",
           "run_mtt", "train_expert"]
