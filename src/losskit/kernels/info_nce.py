"""Chunked log-sum-exps of a similarity matrix, for InfoNCE at any batch size.

``pair_lse(q, k, scale, chunk, cols=True)`` returns, for ``z = scale * q k^T``
(``[Nq, Nk]``),

* ``row_i = log sum_j exp(z_ij)`` (each query against every key), and
* with ``cols``, ``col_j = log sum_i exp(z_ij)`` (each key against every query),

without ever holding the ``Nq x Nk`` matrix: the query rows are visited in
blocks of ``chunk``; a block's row log-sum-exp is complete, the column one is
accumulated.  Only the two vectors are saved; backward recomputes each block,
so the cost is 1 product forward and 3 backward (recompute, ``dq``, ``dk``)
against a dense implementation's 1 + 2, and the extra memory is
``O(chunk x Nk)`` plus ``O((Nq + Nk) D)``.

Two paths.  When the logits are bounded, ``|z| <= ref`` with ``2 ref`` below
the dtype's limit (normalised rows and ``s <= 40`` in float32, or a bound
measured from the largest norms: :func:`logit_bound`), no maximum is needed:
per block one product, one in-place ``exp2`` (the scale and ``log2 e`` ride in
``q``) and two matrix-vector products for the row and column sums; backward
per block one product, one ``exp2``, one in-place scaling by the outer sum
``gr_i exp(-row_i) + gc_j exp(-col_j)`` and the two gradient products.
Otherwise (any scale, unbounded inputs, or tensor checks off) an online
maximum is carried for the columns and subtracted per row.

The symmetric CLIP loss of one process needs both vectors of the same matrix
(``row`` for image -> text, ``col`` for text -> image), hence one kernel for
both.  ``scale`` is a 0-dim tensor (a learnable logit scale gets its gradient,
``dL/ds = sum_i q_i . dL/dq_i / s``, with no extra pass).  Half-precision
inputs are computed in float32.  The only host synchronisation is the read
of a tensor scale (and, when measured, of the largest norms) that chooses the
path; none with ``losskit.tensor_checks(False)``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from losskit.core.checks import tensor_checks_enabled
from losskit.kernels.constants import LOG2E

__all__ = ["pair_lse", "PairLSE", "BLOCK_ELEMENTS", "auto_chunk", "logit_bound", "unit_rows"]

#: values per block of the similarity matrix when no chunk size is given (16 MiB in float32)
BLOCK_ELEMENTS = 1 << 22


def auto_chunk(n_keys: int) -> int:
    """Query rows per block so that a block holds about :data:`BLOCK_ELEMENTS` values with one
    intra-op thread, twice that with more (fewer, longer parallel regions: at B = 8192 on two
    threads 1024-row blocks ran at 1.8x the floor where 512-row blocks ran at 2.3x,
    benchmarks/info_nce.py, docs/contrastive.md)."""
    per = BLOCK_ELEMENTS if torch.get_num_threads() == 1 else 2 * BLOCK_ELEMENTS
    return max(1, per // max(1, n_keys))


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    dt = torch.promote_types(ts[0].dtype, ts[1].dtype)
    return torch.float32 if dt in (torch.float16, torch.bfloat16) else dt


#: with |z| <= ref and 2 ref below this (per dtype), exp(z), its sums over a block and the gradient
#: factors gr exp(-row) stay normal numbers: the one-exp2 path needs no maximum
_FIXED_REF_LIMIT = {torch.float32: 80.0, torch.float64: 700.0}


def _forward_fixed(q: Tensor, k: Tensor, s: Tensor, chunk: int, cols: bool):
    """Bounded logits (``|z| <= ref`` with ``2 ref`` below the dtype's limit, so every ``exp(z)``
    and every sum of ``N`` of them is a normal number): one ``exp2`` per similarity, no reference
    subtracted (the scale and the change of base ride in ``q``); row and column sums as
    matrix-vector products of the same block."""
    nq, nk = q.shape[0], k.shape[0]
    qs = q * (s * LOG2E)
    kt = k.t()
    rsum = torch.empty(nq, dtype=q.dtype, device=q.device)
    csum = torch.zeros(nk, dtype=q.dtype, device=q.device)
    ones_k = torch.ones(nk, dtype=q.dtype, device=q.device)
    ones_q = torch.ones(min(chunk, nq), dtype=q.dtype, device=q.device)
    buf = torch.empty(min(chunk, nq) * nk, dtype=q.dtype, device=q.device)
    for a in range(0, nq, chunk):
        b = min(a + chunk, nq)
        e = torch.mm(qs[a:b], kt, out=buf[: (b - a) * nk].view(b - a, nk)).exp2_()
        torch.mv(e, ones_k, out=rsum[a:b])
        if cols:
            csum.addmv_(e.t(), ones_q[: b - a])
    row = torch.log(rsum)
    col = torch.log(csum) if cols else torch.zeros(nk, dtype=q.dtype, device=q.device)
    return row, col


def _backward_fixed(q, k, s, row, col, gr, gc, chunk):
    """``dL/dz_ij = e_ij (gr_i exp(-row_i) + gc_j exp(-col_j))`` with ``e = exp(z)``: the block is
    recomputed, scaled once by the outer sum of the two vectors, and multiplied twice."""
    nq, nk = q.shape[0], k.shape[0]
    qs = q * (s * LOG2E)
    kt = k.t()
    ks = k * s
    al = gr * torch.exp(-row)
    be = gc * torch.exp(-col) if gc is not None else None
    gq = torch.empty_like(q)
    gk = torch.zeros_like(k)
    buf = torch.empty(min(chunk, nq) * nk, dtype=q.dtype, device=q.device)
    buf2 = torch.empty_like(buf) if be is not None else None
    for a in range(0, nq, chunk):
        b = min(a + chunk, nq)
        n = (b - a) * nk
        e = torch.mm(qs[a:b], kt, out=buf[:n].view(b - a, nk)).exp2_()
        if be is None:
            g = e.mul_(al[a:b, None])
        else:
            g = e.mul_(torch.add(al[a:b, None], be[None, :], out=buf2[:n].view(b - a, nk)))
        torch.mm(g, ks, out=gq[a:b])
        gk.addmm_(g.t(), q[a:b])
    return gq, gk.mul_(s)


class PairLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: Tensor, chunk: int, cols: bool, ref: float | None):
        dt = _compute_dtype(q, k)
        fixed = ref is not None and q.shape[0] > 0 and k.shape[0] > 0
        ctx.chunk, ctx.cols, ctx.fixed, ctx.ref = chunk, cols, fixed, ref
        with torch.no_grad(), torch.autocast(device_type=q.device.type, enabled=False):
            qc, kc, s = q.to(dt), k.to(dt), scale.to(dt)
            nq, nk = qc.shape[0], kc.shape[0]
            if ctx.fixed:
                row, col = _forward_fixed(qc, kc, s, chunk, cols)
                ctx.save_for_backward(q, k, scale, row, col)
                return row.to(q.dtype), col.to(q.dtype)
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
            if ctx.fixed:
                gq, gk = _backward_fixed(qc, kc, s, row, col, gr, gc, ctx.chunk)
                gs = None
                if ctx.needs_input_grad[2]:
                    gs = (torch.linalg.vecdot(gq, qc).sum() / s).to(scale.dtype).reshape(scale.shape)
                return gq.to(q.dtype), gk.to(k.dtype), gs, None, None, None
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
        return gq.to(q.dtype), gk.to(k.dtype), gs, None, None, None


class _UnitRows(torch.autograd.Function):
    """``x / max(|x_i|, eps)`` row-wise (``F.normalize(x, dim=1)``'s values) with a three-pass
    backward ``(g - y <g, y>) / n`` (``g / eps`` for a clamped row) instead of autograd's chain
    through the norm and the division; also returns the norms (no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float):
        n_raw = torch.linalg.vector_norm(x, dim=1)
        n = n_raw.clamp_min(eps)
        y = x / n[:, None]
        ctx.save_for_backward(y, n, n_raw >= eps)
        ctx.mark_non_differentiable(n_raw)
        return y, n_raw

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor, _g_norm):
        y, n, unclamped = ctx.saved_tensors
        dot = torch.linalg.vecdot(g, y).mul_(unclamped)
        return torch.addcmul(g, y, dot[:, None], value=-1).div_(n[:, None]), None


def unit_rows(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(F.normalize(x, dim=1, eps=eps), |x_i|)`` for a ``[N, D]`` tensor, with a cheaper backward."""
    return _UnitRows.apply(x, eps)


def _may_sync() -> bool:
    return tensor_checks_enabled() and not torch.compiler.is_compiling()


def logit_bound(q: Tensor, k: Tensor, scale: Tensor | float, bounded: bool | None = False) -> float | None:
    """A bound ``ref >= max |z_ij|`` that allows the one-``exp2`` path, or ``None`` for the
    online-maximum path.  ``bounded=True``: the rows have norm <= 1 (normalised), ``ref = s``;
    ``None``: measured, ``ref = s max_i |q_i| max_j |k_j|`` (one host read of the two largest
    norms); ``False``: the online path.  The one-``exp2`` path needs ``2 ref`` below the dtype's
    limit (80 in float32: every ``exp(z)`` lies in ``[e^-40, e^40]``), and reading a tensor
    ``scale`` or the norms is a host synchronisation, skipped (online path) with
    ``losskit.tensor_checks(False)``."""
    if bounded is False:
        return None
    if isinstance(scale, Tensor):
        if not _may_sync():
            return None
        s = float(scale.detach())
    else:
        s = float(scale)
    if bounded is None:
        if not _may_sync() or q.shape[0] == 0 or k.shape[0] == 0:
            return None
        with torch.no_grad():
            nq = torch.linalg.vector_norm(q.detach(), dim=1, dtype=_compute_dtype(q, k)).amax()
            nk = torch.linalg.vector_norm(k.detach(), dim=1, dtype=_compute_dtype(q, k)).amax()
            ref = s * float(nq * nk)
    else:
        ref = s
    limit = _FIXED_REF_LIMIT.get(_compute_dtype(q, k), 0.0)
    return ref if 0 < s and 0 <= 2 * ref <= limit else None


def pair_lse(q: Tensor, k: Tensor, scale: Tensor | float, chunk: int | None = None, cols: bool = True,
             bounded: bool | None = False):
    """``(row [Nq], col [Nk])`` log-sum-exps of ``scale * q k^T`` (see the module doc);
    ``col`` is zeros when ``cols=False``.  ``chunk``: query rows per block (default
    :func:`auto_chunk`).  ``bounded``: ``True`` when the rows of ``q`` and ``k`` have norm <= 1
    (normalised), so ``|z| <= s``; ``None`` to measure the bound from the largest norms; when the
    bound ``ref`` is small enough for the dtype (``ref <= 40`` in float32) every block needs one
    ``exp2`` and no maximum (:func:`logit_bound`)."""
    chunk = auto_chunk(k.shape[0]) if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk}")
    ref = logit_bound(q, k, scale, bounded)
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), dtype=q.dtype, device=q.device)
    return PairLSE.apply(q, k, scale, chunk, bool(cols), ref)
