"""Chunked log-sum-exps of a similarity matrix, for InfoNCE at any batch size.

``pair_lse(q, k, scale, chunk, cols=True)`` returns, for ``z = scale * q k^T``
(``[Nq, Nk]``),

* ``row_i = log sum_j exp(z_ij)`` (each query against every key), and
* with ``cols``, ``col_j = log sum_i exp(z_ij)`` (each key against every query),

without ever holding the ``Nq x Nk`` matrix: the query rows are visited in
blocks of ``chunk``; a block's row log-sum-exp is complete, the column one is
carried with an online maximum.  Only the two vectors are saved; backward
recomputes each block, so the cost is 1 product forward and 3 backward
(recompute, ``dq``, ``dk``) against a dense implementation's 1 + 2, and the
extra memory is ``O(chunk x Nk)`` plus ``O((Nq + Nk) D)``.

The symmetric CLIP loss of one process needs both vectors of the same matrix
(``row`` for image -> text, ``col`` for text -> image), hence one kernel for
both.  ``scale`` is a 0-dim tensor (a learnable logit scale gets its gradient,
``dL/ds = sum_i q_i . dL/dq_i / s``, with no extra pass).  Half-precision
inputs are computed in float32.  No host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["pair_lse", "PairLSE", "BLOCK_ELEMENTS", "auto_chunk"]

#: values per block of the similarity matrix when no chunk size is given (16 MiB in float32)
BLOCK_ELEMENTS = 1 << 22


def auto_chunk(n_keys: int) -> int:
    """Query rows per block so that a block holds about :data:`BLOCK_ELEMENTS` values."""
    return max(1, BLOCK_ELEMENTS // max(1, n_keys))


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    dt = torch.promote_types(ts[0].dtype, ts[1].dtype)
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


class PairLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: Tensor, chunk: int, cols: bool):
        dt = _compute_dtype(q, k)
        with torch.no_grad(), torch.autocast(device_type=q.device.type, enabled=False):
            qc, kc, s = q.to(dt), k.to(dt), scale.to(dt)
            nq, nk = qc.shape[0], kc.shape[0]
            row = torch.empty(nq, dtype=dt, device=q.device)
            cmax = torch.full((nk,), float("-inf"), dtype=dt, device=q.device)
            csum = torch.zeros(nk, dtype=dt, device=q.device)
            kt = (kc * s).t()  # the scale rides in the product (O(Nk D), not O(chunk Nk))
            buf = torch.empty(min(chunk, max(nq, 1)) * nk, dtype=dt, device=q.device)
            if nk == 0:
                row.fill_(float("-inf"))
            for a in range(0, nq if nk else 0, chunk):
                b = min(a + chunk, nq)
                z = torch.mm(qc[a:b], kt, out=buf[: (b - a) * nk].view(b - a, nk))
                rmax = z.amax(dim=1)
                if cols:
                    new = torch.maximum(cmax, z.amax(dim=0))
                    csum.mul_(torch.exp(cmax - new)).add_(torch.exp(z - new).sum(dim=0))
                    cmax = new
                row[a:b] = torch.log(torch.exp(z.sub_(rmax[:, None])).sum(dim=1)).add_(rmax)
            col = torch.log(csum).add_(cmax) if cols else torch.zeros(nk, dtype=dt, device=q.device)
        ctx.save_for_backward(q, k, scale, row, col)
        ctx.chunk, ctx.cols = chunk, cols
        return row.to(q.dtype), col.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_row: Tensor | None, g_col: Tensor | None):
        q, k, scale, row, col = ctx.saved_tensors
        dt = row.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            qc, kc, s = q.to(dt), k.to(dt), scale.to(dt)
            nq, nk = qc.shape[0], kc.shape[0]
            gr = g_row.to(dt) if g_row is not None else torch.zeros(nq, dtype=dt, device=q.device)
            gc = g_col.to(dt) if (g_col is not None and ctx.cols) else None
            ks = kc * s
            kt = ks.t()
            gq = torch.zeros_like(qc) if nk == 0 else torch.empty_like(qc)
            gk = torch.zeros_like(kc)
            buf = torch.empty(min(ctx.chunk, max(nq, 1)) * nk, dtype=dt, device=q.device)
            for a in range(0, nq if nk else 0, ctx.chunk):
                b = min(a + ctx.chunk, nq)
                z = torch.mm(qc[a:b], kt, out=buf[: (b - a) * nk].view(b - a, nk))
                if gc is None:
                    # dL/dz_ij = g_i softmax_ij, in place
                    p = z.sub_(row[a:b, None]).exp_().mul_(gr[a:b, None])
                else:
                    pc = torch.exp(z - col[None, :]).mul_(gc[None, :])
                    p = z.sub_(row[a:b, None]).exp_().mul_(gr[a:b, None]).add_(pc)
                torch.mm(p, ks, out=gq[a:b])             # dq = s * G k
                gk.addmm_(p.t(), qc[a:b])                # dk / s = G^T q
            gk.mul_(s)
            gs = None
            if ctx.needs_input_grad[2]:
                gs = (torch.linalg.vecdot(gq, qc).sum() / s).to(scale.dtype).reshape(scale.shape)
        return gq.to(q.dtype), gk.to(k.dtype), gs, None, None


def pair_lse(q: Tensor, k: Tensor, scale: Tensor | float, chunk: int | None = None, cols: bool = True):
    """``(row [Nq], col [Nk])`` log-sum-exps of ``scale * q k^T`` (see the module doc);
    ``col`` is zeros when ``cols=False``.  ``chunk``: query rows per block (default
    :func:`auto_chunk`)."""
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), dtype=q.dtype, device=q.device)
    chunk = auto_chunk(k.shape[0]) if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk}")
    return PairLSE.apply(q, k, scale, chunk, bool(cols))
