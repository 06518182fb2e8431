"""Class-sharded (model-parallel) margin softmax over ``torch.distributed``.

Each rank of the process group owns a contiguous slice of the classes
(``shard_range``); the batch's embeddings and labels are all-gathered (with
gradient); every rank computes the loss of the *global* batch:

* target cosine: computed by the rank owning the class, summed across ranks;
* non-target log-sum-exp: each rank's chunked log-sum-exp over its classes,
  combined by an all-reduce of the max and of the sum of exponentials;
* margins that need batch statistics (CFCD) use the same all-reduced values;
  random margins (ElasticFace) are broadcast from the group's first rank;
  UNPG's in-batch negatives are computed on every rank with their gradient
  divided by the world size, so the summed gradient counts them once.

Gradients: the weight slice of each rank gets its exact gradient of the
global loss; each rank's embeddings get the sum over ranks of the
contributions (all-reduce in the all-gather's backward), i.e. the exact
gradient of the global loss.  A DDP-wrapped backbone *averages* gradients
over ranks, so multiply the loss by the world size if the backbone must see
the gradient of the global mean (Partial FC has the same convention).

All ranks must pass the same number of rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as Fn
from torch import Tensor

from losskit.functional import margins as FM
from losskit.heads.chunked import nontarget_lse, nontarget_lse_nograd

__all__ = ["shard_range", "all_gather_with_grad", "all_reduce_sum", "distributed_logsumexp",
           "sharded_margin_loss"]


def _world(group=None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("head='sharded' needs torch.distributed initialised (dist.init_process_group); "
                           "use head='chunked' in a single process")
    return dist.get_world_size(group), dist.get_rank(group)


def shard_range(num_classes: int, group=None) -> tuple[int, int]:
    """``[start, end)`` of the classes owned by this rank (contiguous split,
    the first ``C % world`` ranks get one more)."""
    world, rank = _world(group)
    base, rem = divmod(num_classes, world)
    start = rank * base + min(rank, rem)
    return start, start + base + (1 if rank < rem else 0)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        world, rank = _world(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.n = group, rank, x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        # every rank holds the same (replicated) loss, so the local part's
        # gradient is the incoming gradient itself
        return g, None


class _DistLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n_local: Tensor, group) -> Tensor:
        m = n_local.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        s = torch.exp(n_local - m_safe)
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
        out = torch.log(s) + m_safe
        ctx.save_for_backward(n_local, out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        n_local, out = ctx.saved_tensors
        out_safe = torch.where(torch.isinf(out), torch.zeros_like(out), out)
        return g * torch.exp(n_local - out_safe), None


def all_gather_with_grad(x: Tensor, group=None) -> Tensor:
    """Concatenate equal-sized ``x`` from all ranks; backward sums the
    gradients of all ranks and returns this rank's slice."""
    return _AllGather.apply(x, group)


def all_reduce_sum(x: Tensor, group=None) -> Tensor:
    """Sum over ranks; backward passes the (replicated) gradient through."""
    return _AllReduceSum.apply(x, group)


def distributed_logsumexp(n_local: Tensor, group=None) -> Tensor:
    """``log sum_r exp(n_local^r)`` elementwise over ranks (max and sum all-reduce)."""
    return _DistLSE.apply(n_local, group)


def _check_equal_rows(n: int, device, group) -> None:
    world, _ = _world(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device), group=group)
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"embeddings: head='sharded' needs the same batch size on every rank, got {sizes}")


def sharded_margin_loss(head, embeddings: Tensor, labels: Tensor,
                        sample_weight: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Per-sample losses of the global batch (``[world * B]``, identical on
    every rank) and the gathered sample weights."""
    group = head.process_group
    world, _ = _world(group)
    _check_equal_rows(embeddings.shape[0], embeddings.device, group)
    dtype = torch.promote_types(embeddings.dtype, head.weight.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    X = all_gather_with_grad(embeddings.to(dtype), group)
    Y = torch.cat(_gather_plain(labels, group))
    W_all = None
    if sample_weight is not None:
        W_all = torch.cat(_gather_plain(sample_weight.to(dtype), group))
    B = X.shape[0]
    if B == 0:
        z = X.sum() * 0 + head.weight.sum() * 0
        return z.reshape(0), W_all
    xn = Fn.normalize(X, dim=1)
    weight = head.weight
    lo, hi = head.class_offset, head.class_offset + weight.shape[0]
    valid = Y >= 0
    owned = valid & (Y >= lo) & (Y < hi)
    ly = torch.where(owned, Y - lo, torch.full_like(Y, -1))
    with torch.no_grad():   # phase 1: detached target cosines, owner's value summed over ranks
        w0 = weight[ly.clamp_min(0)].to(dtype) if weight.shape[0] else torch.zeros_like(xn)
        w0 = w0 / torch.linalg.vector_norm(w0, dim=1, keepdim=True).clamp_min(1e-12)
        c0 = torch.where(owned, torch.linalg.vecdot(xn, w0), torch.zeros((), dtype=dtype, device=X.device))
        dist.all_reduce(c0, op=dist.ReduceOp.SUM, group=group)
    vrows = valid.nonzero().squeeze(1)

    def nt_lse(rows: Tensor, s: float) -> Tensor:
        r = vrows[rows]
        with torch.no_grad():
            loc = nontarget_lse_nograd(xn[r], weight, ly[r], s, head._chunk(B))
            return _DistLSE.apply(loc, group)

    def sync(t: Tensor) -> Tensor:
        t = t.contiguous().clone()
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(t, src=src, group=group)
        return t

    scale = float(head.policy.prepare(c0[valid].clamp(-1.0, 1.0), training=head.training, nontarget_lse=nt_lse,
                                      sync=sync))
    n_local, c_part = nontarget_lse(xn, weight, ly, scale, head._chunk(B), return_target=True)
    cos_y = all_reduce_sum(c_part, group).clamp(-1.0, 1.0)
    psi_v = head.policy.target(cos_y[valid])
    psi = torch.zeros_like(cos_y).masked_scatter(valid, psi_v.to(cos_y.dtype))
    n = distributed_logsumexp(n_local, group)
    if head.unpg_whisker is not None:
        xr = xn / world + (xn - xn / world).detach()      # replicated term: gradient counted once overall
        neg = FM.unpg_negatives(xr, Y, head.unpg_whisker)
        if neg.numel():
            n = torch.logaddexp(n, torch.logsumexp(neg * scale, 0))
    t = psi * scale
    lse = torch.logaddexp(n, t)
    return torch.where(valid, lse - t, torch.zeros_like(lse)), W_all


def _gather_plain(t: Tensor, group) -> list[Tensor]:
    world, _ = _world(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts
