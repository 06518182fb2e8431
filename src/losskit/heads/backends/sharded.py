"""``head='sharded'``: class-sharded (model-parallel) margin softmax over
``torch.distributed``, with the collectives of
:mod:`losskit.distributed.collectives` only.

Each rank of ``process_group`` owns a contiguous slice of the classes
(:func:`shard_range`, ``head.weight`` is that slice).  The normalised
embeddings and labels of every rank are all-gathered (rows per rank may
differ); each rank computes, for every gathered row, the non-target
log-sum-exp over its classes with the chunked kernel; those are combined
across ranks (a max, then a sum of exponentials) and the target cosine is
summed from the rank that owns the class.  CFCD's batch statistics use the
same combined values; ElasticFace's draws come from the group's first rank;
UNPG's in-batch negatives are computed on the gathered rows.

**The loss of a rank is the loss of its own rows** (``[B_local]`` for
``reduction='none'``; ``'mean'`` divides by ``B_local``): the distributed
convention of docs/design.md.  Gradients: each rank's embeddings receive,
through the all-gather's backward, the sum over ranks of the gradients of
their losses, and DistributedDataParallel's average over ranks then gives
the backbone the single-process gradient of the concatenated batch (equal
``B_local`` on every rank).  The weight slice is not replicated, so DDP does
not average it; the backend averages its gradient over ranks itself (the
sum of every rank's contribution divided by the world size), which is the
single-process gradient of that slice.  Nobody multiplies by the world size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losskit.distributed.collectives import (all_gather_no_grad, all_gather_with_grad, all_reduce_sum,
                                             gather_sizes, require_world)
from losskit.heads.backends.base import HeadBackend, prepare_policy, row_loss, target_logits
from losskit.kernels.chunked_lse import nontarget_lse, nontarget_lse_nograd
from losskit.kernels.constants import NORM_EPS

__all__ = ["ShardedBackend", "shard_range", "logsumexp_over_ranks"]

_WHAT = "head='sharded' (use head='chunked' in a single process)"


def shard_range(num_classes: int, group=None) -> tuple[int, int]:
    """``[start, end)`` of the classes owned by this rank (contiguous split,
    the first ``C % world`` ranks get one more)."""
    world, rank = require_world(group, _WHAT)
    base, rem = divmod(num_classes, world)
    start = rank * base + min(rank, rem)
    return start, start + base + (1 if rank < rem else 0)


def logsumexp_over_ranks(n_local: Tensor, group=None) -> Tensor:
    """``log sum_r exp(n_local^r)`` elementwise over ranks, with gradient
    (the backward of the sum is the collectives' all-reduce)."""
    world, _ = require_world(group, _WHAT)
    with torch.no_grad():
        m = all_gather_no_grad(n_local.detach()[None], group, [1] * world).amax(0)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    s = all_reduce_sum(torch.exp(n_local - m), group)
    pos = s > 0
    out = torch.log(torch.where(pos, s, torch.ones_like(s))) + m
    return torch.where(pos, out, torch.full_like(out, float("-inf")))


class _AverageGradOverRanks(torch.autograd.Function):
    """Identity forward; backward divides by the world size (what DDP does
    to a replicated parameter's gradient, for a parameter DDP does not see)."""

    @staticmethod
    def forward(ctx, w: Tensor, world: int) -> Tensor:
        ctx.world = world
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g / ctx.world, None


class ShardedBackend(HeadBackend):
    name = "sharded"
    collective = True

    def per_row(self, head, xn: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        group = head.process_group
        world, rank = require_world(group, _WHAT)
        B = xn.shape[0]
        sizes = gather_sizes(B, xn.device, group)
        start = sum(sizes[:rank])
        X = all_gather_with_grad(xn, group, sizes)
        Y = all_gather_no_grad(labels, group, sizes)
        if X.shape[0] == 0:
            return xn.sum(dim=1) * 0 + weight.sum() * 0
        w = _AverageGradOverRanks.apply(weight, world) if weight.requires_grad else weight
        lo = head.class_offset
        valid = Y >= 0
        owned = valid & (Y >= lo) & (Y < lo + weight.shape[0])
        ly = torch.where(owned, Y - lo, torch.full_like(Y, -1))
        chunk = head.chunk_for(X.shape[0], weight.shape[0])
        with torch.no_grad():   # phase 1: detached target cosines, the owner's value summed over ranks
            if weight.shape[0]:
                w0 = weight[ly.clamp_min(0)].to(X.dtype)
                w0 = w0 / torch.linalg.vector_norm(w0, dim=1, keepdim=True).clamp_min(NORM_EPS)
                c0 = torch.where(owned, torch.linalg.vecdot(X, w0), torch.zeros((), dtype=X.dtype, device=X.device))
            else:
                c0 = torch.zeros(X.shape[0], dtype=X.dtype, device=X.device)
            c0 = all_reduce_sum(c0, group)

        def nt_lse(rows: Tensor, s: float) -> Tensor:
            with torch.no_grad():
                loc = nontarget_lse_nograd(X[rows], weight, ly[rows], s, chunk)
                return logsumexp_over_ranks(loc, group)

        def sync(t: Tensor) -> Tensor:
            with torch.no_grad():   # broadcast from the group's first rank
                return all_reduce_sum(t if rank == 0 else torch.zeros_like(t), group)

        batch = prepare_policy(head, c0, valid, nt_lse, sync)
        n_local, c_part = nontarget_lse(X, w, ly, batch.scale, chunk, return_target=True)
        cos_y = all_reduce_sum(c_part, group).clamp(-1.0, 1.0)
        n = logsumexp_over_ranks(n_local, group)
        t = target_logits(head.policy, cos_y, valid, batch)
        per = row_loss(n, t, head.policy.extra_lse(X, Y, batch), valid)
        return per[start:start + B]
