"""All-gather with gradient and a distributed wrapper for pair losses.

Each rank gathers every rank's embeddings; the gathered tensor carries
gradient, and its backward sums (all-reduce) the gradients that all ranks
computed for each slice and returns its own slice to each rank.  The
wrapper scores the local anchors against the whole global batch and
divides by the *global* batch size (and global pair counts), so each
rank's loss is its true share: the losses summed over ranks equal the
single-process loss on the concatenated batch, and so do the embedding
gradients (each rank gets exactly the single-process gradient of its rows).

With DistributedDataParallel, which *averages* parameter gradients over
ranks, pass ``scale_by_world_size=True`` to make the averaged gradient equal
the single-process one (the loss value is then ``world_size`` times the share).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from losskit._checks import check_embeddings, check_labels, check_sample_weight

__all__ = ["all_gather_with_grad", "all_gather_no_grad", "DistributedPairLoss"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _sizes(n: int, device) -> list[int]:
    world, _ = _world()
    t = torch.tensor([n], device=device, dtype=torch.long)
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [int(x) for x in out]


def all_gather_no_grad(t: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate ``t`` from every rank along dim 0 (sizes may differ)."""
    world, _ = _world()
    if world == 1:
        return t
    sizes = sizes or _sizes(t.shape[0], t.device)
    mx = max(sizes)
    pad = t.new_zeros((mx - t.shape[0],) + tuple(t.shape[1:]))
    buf = torch.cat([t, pad]) if mx > t.shape[0] else t.contiguous()
    outs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(outs, buf)
    return torch.cat([o[:n] for o, n in zip(outs, sizes)])


class _AllGatherGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, sizes):
        ctx.sizes = sizes
        return all_gather_no_grad(t.detach(), sizes)

    @staticmethod
    def backward(ctx, grad):
        _, rank = _world()
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[:rank])
        return grad[start:start + ctx.sizes[rank]], None


def all_gather_with_grad(t: Tensor, sizes: list[int] | None = None) -> Tensor:
    """All-gather whose backward returns to each rank the sum over ranks of
    the gradients for its slice.  Identity without an initialised process group."""
    world, _ = _world()
    if world == 1:
        return t
    sizes = sizes or _sizes(t.shape[0], t.device)
    return _AllGatherGrad.apply(t, sizes)


class DistributedPairLoss(nn.Module):
    """Wrap a losskit pair loss for data-parallel training (see the module doc).

    ``reduction`` is the wrapped loss's: 'mean' divides by the global batch,
    'sum' sums the local share, 'none' gives the local anchors' losses.
    Without an initialised process group it is the wrapped loss itself.
    """

    def __init__(self, loss, scale_by_world_size: bool = False):
        super().__init__()
        if not hasattr(loss, "compute"):
            raise TypeError(f"loss: expected a losskit pair loss (with .compute), got {type(loss).__name__}")
        self.loss = loss
        self.scale_by_world_size = scale_by_world_size

    def forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        world, rank = _world()
        if world == 1:
            return self.loss(embeddings, labels, sample_weight)
        check_embeddings(embeddings)
        check_labels(labels, embeddings.shape[0], device=embeddings.device)
        check_sample_weight(sample_weight, embeddings.shape[0], embeddings)
        sizes = _sizes(embeddings.shape[0], embeddings.device)
        all_emb = all_gather_with_grad(embeddings, sizes)
        all_labels = all_gather_no_grad(labels, sizes)
        start = sum(sizes[:rank])
        self_index = torch.arange(start, start + embeddings.shape[0], device=labels.device)

        def count_reduce(n: Tensor) -> Tensor:
            n = n.detach().clone()
            dist.all_reduce(n, op=dist.ReduceOp.SUM)
            return n

        out = self.loss.compute(embeddings, labels, sample_weight, ref_embeddings=all_emb, ref_labels=all_labels,
                                self_index=self_index, batch_size=sum(sizes), count_reduce=count_reduce)
        return out * world if self.scale_by_world_size else out
