"""Machine unlearning: DMM (datamodel matching), oracle matching and baselines.

Georgiev et al., "Attribute-to-Delete: Machine Unlearning via Datamodel
Matching" (ICLR 2025, arXiv:2410.23232).  Evaluate with
:func:`losskit.metrics.klom`.  See docs/unlearning.md.
"""

from losskit.recipes.unlearning.data import UnlearningData, forget_indices, predict_logits, train_classifier
from losskit.recipes.unlearning.datamodels import (Datamodels, fit_datamodels, ridge_datamodels, subset_masks,
                                                   trak_datamodels)
from losskit.recipes.unlearning.methods import (UnlearningLog, run_dmm, run_gradient_ascent,
                                                run_gradient_difference, run_oracle_matching, run_retain_finetune)

__all__ = ["UnlearningData", "forget_indices", "predict_logits", "train_classifier", "Datamodels", "fit_datamodels",
           "ridge_datamodels", "subset_masks", "trak_datamodels", "UnlearningLog", "run_dmm", "run_gradient_ascent",
           "run_gradient_difference", "run_oracle_matching", "run_retain_finetune"]
