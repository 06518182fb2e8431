"""A distributed wrapper for pair losses: the local anchors scored against the
gathered global batch.

The convention of every distributed objective (docs/design.md,
"Distributed"; collectives in :mod:`losskit.distributed.collectives`):

* every rank gathers every rank's embeddings with
  ``all_gather_with_grad`` (its backward sums over ranks the gradients of
  each slice and returns each rank its own);
* anchor ``i`` is scored against the global batch, with pair counts summed
  over ranks and pair-average shares taken over the *global* batch size, so
  its per-anchor loss (``reduction='none'``) is exactly its single-process
  value on the concatenated batch;
* each rank's loss is the mean over *its own* anchors (``'mean'``).  With
  equal local batches the average of the rank losses is the single-process
  loss, and DistributedDataParallel's gradient average gives the
  single-process gradient: the same optimiser step, no multiply by the world
  size.  (With unequal local batches each rank's mean weighs its own rows,
  as for any per-sample loss under DDP.)  ``'sum'``: the sum over own
  anchors (the rank losses add up to the single-process sum).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from losskit.core.checks import check_embeddings, check_labels
from losskit.core.context import PairReference
from losskit.distributed.collectives import all_gather_no_grad, all_gather_with_grad, all_reduce_sum, \
    gather_sizes, world
from losskit.losses.pair import PairLoss

__all__ = ["DistributedPairLoss"]


class DistributedPairLoss(nn.Module):
    """Wrap a losskit pair loss for data-parallel training (see the module doc).

    ``reduction`` is the wrapped loss's.  Without an initialised process
    group it is the wrapped loss itself.  ``group``: the process group
    (default the world).
    """

    def __init__(self, loss: PairLoss, group=None, *, scale_by_world_size: bool | None = None):
        super().__init__()
        if scale_by_world_size is not None:
            raise TypeError("scale_by_world_size: removed; each rank's loss is now the mean over its own anchors, "
                            "so DistributedDataParallel's gradient average already equals the single-process "
                            "gradient (drop the argument)")
        if not isinstance(loss, PairLoss):
            raise TypeError(f"loss: expected a losskit pair loss (a PairLoss), got {type(loss).__name__}")
        self.loss = loss
        self.group = group

    def _count_reduce(self, n: Tensor) -> Tensor:
        return all_reduce_sum(n.detach(), self.group)

    def forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        w, rank = world(self.group)
        if w == 1:
            return self.loss(embeddings, labels, sample_weight)
        # shapes before the collectives; the loss checks the values (once)
        check_embeddings(embeddings, finite=False)
        check_labels(labels, embeddings.shape[0], device=embeddings.device)
        sizes = gather_sizes(embeddings.shape[0], embeddings.device, self.group)
        start = sum(sizes[:rank])
        ref = PairReference(all_gather_with_grad(embeddings, self.group, sizes),
                            all_gather_no_grad(labels, self.group, sizes),
                            self_index=torch.arange(start, start + embeddings.shape[0], device=labels.device),
                            batch_size=sum(sizes), count_reduce=self._count_reduce)
        return self.loss(embeddings, labels, sample_weight, reference=ref)
