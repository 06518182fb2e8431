"""The collectives every distributed objective uses, defined once.

All take an optional ``group`` (default the world) and work with unequal
row counts across ranks.  Without an initialised process group they are the
identity (one process *is* the concatenated batch).

Gradient convention (docs/design.md, "Distributed"): :func:`all_gather_with_grad`
returns every rank's rows; its backward **sums** over ranks the gradients
computed for each slice and hands each rank its own slice.  A loss whose
per-rank value is the mean over that rank's rows (scored against the
gathered batch) then gives, after DistributedDataParallel's gradient
average, the single-process gradient of the concatenated batch -- no
multiply by the world size anywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world", "require_world", "gather_sizes", "all_gather_no_grad", "all_gather_with_grad",
           "all_reduce_sum"]


def world(group=None) -> tuple[int, int]:
    """``(world_size, rank)`` in ``group``; ``(1, 0)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def require_world(group=None, what: str = "this objective") -> tuple[int, int]:
    """Like :func:`world` but refuses to run without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what} needs torch.distributed initialised (dist.init_process_group) first")
    return dist.get_world_size(group), dist.get_rank(group)


def gather_sizes(n: int, device, group=None) -> list[int]:
    """Every rank's row count (one small all-gather)."""
    w, _ = world(group)
    if w == 1:
        return [n]
    t = torch.tensor([n], device=device, dtype=torch.long)
    out = [torch.zeros_like(t) for _ in range(w)]
    dist.all_gather(out, t, group=group)
    return [int(x) for x in out]


def all_gather_no_grad(t: Tensor, group=None, sizes: list[int] | None = None) -> Tensor:
    """Concatenate ``t`` from every rank along dim 0 (row counts may differ)."""
    w, _ = world(group)
    if w == 1:
        return t
    sizes = sizes if sizes is not None else gather_sizes(t.shape[0], t.device, group)
    mx = max(sizes)
    t = t.detach().contiguous()
    buf = torch.cat([t, t.new_zeros((mx - t.shape[0],) + tuple(t.shape[1:]))]) if mx > t.shape[0] else t
    outs = [torch.empty_like(buf) for _ in range(w)]
    dist.all_gather(outs, buf, group=group)
    return torch.cat([o[:n] for o, n in zip(outs, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, group, sizes: list[int]) -> Tensor:
        ctx.group, ctx.sizes = group, sizes
        return all_gather_no_grad(t, group, sizes)

    @staticmethod
    def backward(ctx, g: Tensor):
        _, rank = world(ctx.group)
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[:rank])
        return g[start:start + ctx.sizes[rank]], None, None


def all_gather_with_grad(t: Tensor, group=None, sizes: list[int] | None = None) -> Tensor:
    """All-gather along dim 0 whose backward returns to each rank the sum over
    ranks of the gradients of its slice.  Identity in one process."""
    w, _ = world(group)
    if w == 1:
        return t
    sizes = sizes if sizes is not None else gather_sizes(t.shape[0], t.device, group)
    return _AllGatherWithGrad.apply(t, group, sizes)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def all_reduce_sum(x: Tensor, group=None) -> Tensor:
    """Sum over ranks; backward sums the gradients over ranks too (each rank's
    output feeds each rank's loss).  Identity in one process."""
    w, _ = world(group)
    if w == 1:
        return x
    return _AllReduceSum.apply(x, group)
