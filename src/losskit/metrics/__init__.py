"""losskit.metrics: open-set retrieval and verification metrics; closed-set
classification metrics (accuracy, macro-F1, NLL, ECE, robust accuracy) and
linear evaluation of frozen embeddings (logistic regression, Gaussian naive Bayes).

All functions take torch tensors (numpy accepted) and return python floats or
dicts.  ``metric`` takes the distance vocabulary of :mod:`losskit.distances`
through the same resolver as the losses (:func:`losskit.distances.get_distance`):
``"cosine"`` (default), ``"dot"``, ``"euclidean"``, ``"squared-euclidean"`` or a
distance object; distances rank by their negative (higher = closer).  Retrieval is leave-one-out.  Definitions, tie
handling and the OPIS protocol: docs/metrics.md.
"""

from losskit.metrics.classification import (accuracy, classification_summary, expected_calibration_error, macro_f1,
                                            nll, robust_accuracy)
from losskit.metrics.entanglement import (
    EntanglementStats,
    gradient_entanglement,
    pairwise_normalized_loss,
    per_pair_grad_norms,
)
from losskit.metrics.evaluate import evaluate_embeddings
from losskit.metrics.flips import FlipCounter, flip_summary, negative_flip_rate, relative_negative_flip_rate
from losskit.metrics.klom import KLoMAccumulator, binned_kl, klom, klom_summary, margins_from_logits
from losskit.metrics.knn import knn
from losskit.metrics.learning_curves import LearningCurveForecaster, fit_accuracy_pattern, fit_power_law
from losskit.metrics.linear_probe import (GaussianNaiveBayes, LogisticRegressionProbe, crossover, linear_probe,
                                          sample_curve)
from losskit.metrics.opis import calibration_thresholds, class_utilities, epsilon_opis, opis
from losskit.metrics.stream import AnytimeAccuracy, a_auc
from losskit.metrics.retrieval import RetrievalMetrics, map_at_r, precision_at_1, recall_at_k, retrieval_summary
from losskit.metrics.verification import (
    VerificationMetrics,
    eer,
    histogram_error_bound,
    pair_histograms,
    pair_scores,
    roc_curve,
    roc_from_histograms,
    tar_at_far,
)

__all__ = [
    "knn", "recall_at_k", "precision_at_1", "map_at_r", "pair_scores", "roc_curve", "tar_at_far", "eer",
    "opis", "epsilon_opis", "calibration_thresholds", "class_utilities", "pair_histograms",
    "roc_from_histograms", "histogram_error_bound", "retrieval_summary", "RetrievalMetrics", "VerificationMetrics",
    "evaluate_embeddings", "EntanglementStats", "gradient_entanglement", "pairwise_normalized_loss",
    "per_pair_grad_norms", "klom", "klom_summary", "binned_kl", "margins_from_logits", "KLoMAccumulator",
    "LearningCurveForecaster", "fit_accuracy_pattern", "fit_power_law",
    "negative_flip_rate", "relative_negative_flip_rate", "flip_summary", "FlipCounter", "AnytimeAccuracy", "a_auc",
    "accuracy", "macro_f1", "nll", "expected_calibration_error", "robust_accuracy", "classification_summary",
    "GaussianNaiveBayes", "LogisticRegressionProbe", "linear_probe", "sample_curve", "crossover",
]
