"""The softmax baseline every comparison starts from."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from losskit.core.checks import check_embeddings, check_int, check_reduction, shape_str
from losskit.core.registry import register
from losskit.functional.softmax import softmax_cross_entropy


@register("softmax", family="baseline", task="embedding",
          summary="Linear classifier (with bias) on the embeddings and cross-entropy.")
class SoftmaxLoss(nn.Module):
    """Linear classifier on the embeddings, trained with cross-entropy.

    ``weight`` is the ``[C, D]`` class matrix, ``bias`` the ``[C]`` bias.
    """

    def __init__(self, num_classes: int, embedding_dim: int, reduction: str = "mean"):
        super().__init__()
        check_int("num_classes", num_classes, low=1)
        check_int("embedding_dim", embedding_dim, low=1)
        self.reduction = check_reduction(reduction)
        self.linear = nn.Linear(embedding_dim, num_classes)

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    def forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        check_embeddings(embeddings)
        if embeddings.shape[1] != self.linear.in_features:
            raise ValueError(
                f"embeddings: expected shape [B, {self.linear.in_features}] (embedding_dim), "
                f"got {shape_str(embeddings)}"
            )
        # compute in the input's dtype (a cast copy; the parameter itself is untouched)
        logits = F.linear(embeddings, self.linear.weight.to(embeddings.dtype),
                          self.linear.bias.to(embeddings.dtype))
        return softmax_cross_entropy(logits, labels, self.reduction, sample_weight)
