"""Closed-set classification metrics on logits: accuracy, macro-F1, NLL,
expected calibration error and robust accuracy under PGD.

* ``accuracy``: fraction of rows whose arg-max logit is the label.
* ``macro_f1``: the unweighted mean over the classes present in the labels or
  the predictions of ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)`` (scikit-learn's
  ``f1_score(average='macro')``; a class with no support and no prediction
  does not enter the mean).
* ``nll``: mean ``-log softmax(logits)[y]`` (natural log).
* ``expected_calibration_error``: Guo et al. (2017): confidences
  ``max softmax`` in ``bins`` equal-width bins of ``(0, 1]``;
  ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``.
* ``robust_accuracy``: accuracy on ``x'`` from PGD maximising the
  cross-entropy in the ``radius`` ball (:func:`losskit.functional.pgd_perturb`),
  run in batches with the model in eval mode (its mode is restored).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit.core.checks import check_embeddings, check_int, check_labels
from losskit.functional.adversarial import pgd_perturb

__all__ = ["accuracy", "macro_f1", "nll", "expected_calibration_error", "robust_accuracy", "classification_summary"]


def _check(logits, labels) -> tuple[Tensor, Tensor]:
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels)
    check_embeddings(logits, "logits")
    check_labels(labels, logits.shape[0], device=logits.device, num_classes=logits.shape[1])
    return logits.double(), labels.long()


def accuracy(logits, labels) -> float:
    z, y = _check(logits, labels)
    return float((z.argmax(1) == y).double().mean()) if y.numel() else 0.0


def macro_f1(logits, labels) -> float:
    z, y = _check(logits, labels)
    pred = z.argmax(1)
    c = z.shape[1]
    tp = torch.zeros(c, dtype=torch.float64).index_add_(0, y[pred == y], torch.ones(int((pred == y).sum()),
                                                                                     dtype=torch.float64))
    n_pred = torch.bincount(pred, minlength=c).double()
    n_true = torch.bincount(y, minlength=c).double()
    present = (n_pred + n_true) > 0
    f1 = 2 * tp / (n_pred + n_true).clamp_min(1)
    return float(f1[present].mean()) if bool(present.any()) else 0.0


def nll(logits, labels) -> float:
    z, y = _check(logits, labels)
    return float(F.cross_entropy(z, y)) if y.numel() else 0.0


def expected_calibration_error(logits, labels, bins: int = 15) -> float:
    z, y = _check(logits, labels)
    bins = check_int("bins", bins, low=1)
    if y.numel() == 0:
        return 0.0
    p = torch.softmax(z, 1)
    conf, pred = p.max(1)
    correct = (pred == y).double()
    idx = torch.clamp(torch.ceil(conf * bins).long() - 1, 0, bins - 1)
    n = torch.bincount(idx, minlength=bins).double()
    s_conf = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, conf)
    s_acc = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, correct)
    return float(((s_acc - s_conf).abs()).sum() / y.numel())


def robust_accuracy(model: Callable[[Tensor], Tensor], x: Tensor, labels: Tensor, radius: float, steps: int = 10,
                    step_size: float | None = None, norm: str = "linf", clip: tuple[float, float] | None = (0.0, 1.0),
                    batch_size: int = 512, generator: torch.Generator | None = None) -> float:
    """Accuracy under a PGD attack on the cross-entropy (``step_size`` default
    ``2.5 radius / steps``, Madry et al.'s rule)."""
    labels = torch.as_tensor(labels).long()
    if x.shape[0] != labels.shape[0]:
        raise ValueError(f"labels: expected shape [{x.shape[0]}] (one per input), got {list(labels.shape)}")
    step = 2.5 * radius / max(steps, 1) if step_size is None else step_size
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    dev = next(model.parameters()).device if hasattr(model, "parameters") else x.device
    correct = 0
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(dev)
            yb = labels[i:i + batch_size].to(dev)
            xa = pgd_perturb(lambda t: F.cross_entropy(model(t), yb, reduction="sum"), xb, radius, steps, step, norm,
                             clip, generator=generator)
            with torch.no_grad():
                correct += int((model(xa).argmax(1) == yb).sum())
    finally:
        if was_training:
            model.train()
    return correct / max(x.shape[0], 1)


def classification_summary(logits, labels, bins: int = 15) -> dict[str, float]:
    """``{'accuracy', 'macro-f1', 'nll', 'ece'}`` of one set of logits."""
    return {"accuracy": accuracy(logits, labels), "macro-f1": macro_f1(logits, labels), "nll": nll(logits, labels),
            "ece": expected_calibration_error(logits, labels, bins)}
