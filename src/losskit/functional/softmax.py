"""Plain softmax cross-entropy on logits, with losskit's reduction rules."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from losskit.core.checks import check_labels
from losskit.core.reduction import reduce_loss


def softmax_cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean",
                          sample_weight: Tensor | None = None) -> Tensor:
    """``-log softmax(logits)[y]`` per row, then ``sample_weight`` and ``reduction``."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [B, C], got {list(logits.shape)}")
    check_labels(labels, logits.shape[0], device=logits.device, num_classes=logits.shape[1])
    per = F.cross_entropy(logits, labels, reduction="none")
    return reduce_loss(per, reduction, sample_weight)
