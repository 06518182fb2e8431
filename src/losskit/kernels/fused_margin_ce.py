"""Fused margin cross-entropy: gradients computed during forward (3 GEMMs).

``fused_margin_ce(xn, weight, labels, coef, scale, target_fn, extra_fn)``
returns the *reduced* (scalar) loss

    L = sum_i coef_i * l_i,   l_i = log(sum_{j != y_i} e^{s cos_ij} + e^{t_i} + e^{E}) - t_i

with ``cos_ij = xn_i . w_j / ||w_j||``, ``t_i = target_fn(cos_{i y_i})`` the
margin target logit (``s * psi``), ``E = extra_fn(xn)`` an optional scalar
(UNPG's in-batch negatives) and ``coef_i`` the row weight of the reduction
(``w_i / B`` for 'mean', ``w_i`` for 'sum', 0 for label -1).

The batch is visited in ROW chunks (Liger Kernel's approach): for ``b`` rows
the full ``[b, C]`` logit block is computed; its exact row log-sum-exp gives
the softmax at once, hence ``dL/dcos`` for those rows, and the two gradient
GEMMs follow immediately (``grad x_b = P W_hat``, ``G += P^T x_b``,
accumulated into one ``[C, D]`` buffer).  Nothing is recomputed: 3 GEMMs in
all, the matmul floor of a linear layer.  With the fixed reference (scale
<= 80, every logit bounded by the scale) the softmax numerators of a class
tile are final as soon as the tile's logits are, so the block is computed
in tiles of ``_TILE`` classes and ``grad x_b`` is accumulated tile by tile
while that tile of ``W`` is in cache; the row factor ``1 / S_i`` is applied
once the full row sum is known.  The chain rule through the weight
normalisation is applied once to the accumulated buffer, the target-logit
chain rule (``psi'``, via autograd on ``target_fn`` at forward time) and
UNPG's extra term once per batch.  Backward only scales the stored gradients
by ``grad_output`` (a scalar), so calling backward twice (``retain_graph``)
or with any ``grad_output`` is exact.

Valid only for a scalar output whose row weights are known at forward
('mean' or 'sum', sample weights without gradient); the head falls back to
:mod:`losskit.kernels.chunked_lse` otherwise.  Memory: one ``[b, C]`` block (tile-major with
the fixed reference; ``b``
from :func:`auto_row_chunk`) and the ``[C, D]`` weight gradient, stored
until backward.  The weight normalisation is applied to the logit columns
(``z_ij * inv_j``) and to the softmax block (``P_ij * inv_j``) rather than
to a normalised ``C x D`` copy.  With ``grad_output == 1`` backward returns
the stored tensors themselves: without ``retain_graph`` autograd frees the
saved reference before accumulating, so ``weight.grad`` takes the storage
without a copy; with ``retain_graph`` autograd copies it into ``.grad``
(``torch.autograd.grad(..., retain_graph=True)`` hands back the stored
tensor itself: do not modify it in place if you call backward again).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from losskit.kernels.constants import FIXED_REF_MAX_SCALE, LN2, LOG2E, NORM_EPS, UNDERFLOW

__all__ = ["fused_margin_ce", "FusedMarginCE", "auto_row_chunk", "AUTO_ROW_ELEMS"]

#: ``ce [b] -> (phi(ce) [b], phi'(ce) [b])``: a per-row function of the cross-entropy (comp-sum)
RowFn = Callable[[Tensor], "tuple[Tensor, Tensor]"]

#: automatic row chunk: at least this many logits per block (16 MiB in fp32)
AUTO_ROW_ELEMS = 2 ** 22
#: classes per slice when the last block finishes the weight gradient (4 MiB at D = 512)
_CLASS_STEP = 2048
#: classes per tile of the fixed-reference path: a 512 x 512 fp32 weight tile (1 MiB) stays
#: in cache between the logit product and the input-gradient product (measured: docs/margin.md,
#: "Heads", the fused row)
_TILE = 512
#: ... and with more than one torch thread: every op on a tile is an OpenMP region ending in a
#: barrier, and with other jobs on the cores each barrier waits for a descheduled thread, so many
#: small tiles made the head 3x the matmul floor under contention (4096: 1.5x; quiet: +4%;
#: docs/margin.md, "Threads and contention"); the buffer is the same size either way
_TILE_THREADED = 4096


def auto_row_chunk(batch: int, num_classes: int, dim: int) -> int:
    """Rows per block: ``max(2**22 // C, D // 4)`` (at most ``B``).  Each
    block re-reads ``W_hat`` twice and reads+writes the ``[C, D]`` gradient
    buffer once, so short blocks are memory-bound (timings per block size:
    docs/margin.md, "Row block size").  ``D // 4`` rows keep the block at a
    quarter of the weight's size."""
    return max(1, min(batch, max(AUTO_ROW_ELEMS // max(num_classes, 1), dim // 4)))


def _block(xs: Tensor, w: Tensor, inv: Tensor, ly: Tensor, t2: Tensor, e2: Tensor | None, ref2: Tensor | None,
           out: Tensor | None = None):
    """Unnormalised softmax of one row block in base 2.

    ``xs``: ``[b, D]`` rows ``log2e * s * x``; ``w``: the raw ``[C, D]``
    weight and ``inv`` its inverse row norms (the normalisation is applied to
    the logit columns, so no normalised ``C x D`` copy exists);
    ``t2``/``e2``: target / extra logits times log2e; ``ref2``: the per-row
    reference (``None``: the row maximum).  Returns ``(P, S, ref2)`` with
    ``P_ij = 2^(z_ij - ref_i)`` for non-target ``j`` (0 in the target
    column) and ``S_i`` the full row sum including target and extra terms."""
    b = xs.shape[0]
    rows = torch.arange(b, device=xs.device)
    has_t = ly >= 0
    z = torch.mm(xs, w.t(), out=out)
    if ref2 is None:
        z.mul_(inv)
        z[rows[has_t], ly[has_t]] = float("-inf")
        ref2 = z.amax(dim=1)
        ref2 = torch.maximum(ref2, torch.where(has_t, t2, torch.full_like(t2, float("-inf"))))
        if e2 is not None:
            ref2 = torch.maximum(ref2, e2)
        ref2 = torch.where(torch.isfinite(ref2), ref2, torch.zeros_like(ref2))
        p = z.sub_(ref2[:, None]).exp2_()
    else:
        p = torch.addcmul(-ref2[:, None], z, inv, out=z).exp2_()      # z * inv - ref, one pass
        p[rows[has_t], ly[has_t]] = 0.0
    s = p.sum(dim=1)
    s = s + torch.where(has_t, torch.exp2(t2 - ref2), torch.zeros_like(s))
    if e2 is not None:
        s = s + torch.exp2(e2 - ref2)
    return p, s, ref2


def _tiled_block(xs: Tensor, w: Tensor, inv: Tensor, ly: Tensor, t2: Tensor, e2: Tensor | None, ref2: Tensor,
                 buf: Tensor, T: int, stride_rows: int, need_x: bool):
    """Fixed-reference block in class tiles.

    For each tile ``[a, e)`` of ``T`` classes: ``Z = xs W[a:e]^T`` into a
    contiguous view of ``buf``, ``P = 2^(Z inv - ref)`` with the target column
    zeroed, the row sums accumulated, ``P' = P inv`` in place and, with
    ``need_x``, ``G += P' W[a:e]`` while the tile of ``W`` is still in cache
    (the row factor ``c_i`` is applied by the caller: it needs the full row
    sum).  Returns ``(pieces, S, G)``: ``pieces`` the ``(a, e, P'_tile)``
    views, ``S`` the full row sums (with the target and extra terms), ``G``
    the unscaled input-gradient rows (``None`` without ``need_x``)."""
    b = xs.shape[0]
    C = w.shape[0]
    has_t = ly >= 0
    # target entries grouped by tile: one sort per block, slices per tile
    rows_t = has_t.nonzero().squeeze(1)
    lab = ly[rows_t]
    tid = torch.div(lab, T, rounding_mode="floor")
    order = torch.argsort(tid)
    rows_t, lab, tid_list = rows_t[order], lab[order], tid[order].tolist()
    targets: dict[int, tuple[Tensor, Tensor]] = {}
    i = 0
    while i < len(tid_list):
        j = i
        while j < len(tid_list) and tid_list[j] == tid_list[i]:
            j += 1
        k = tid_list[i]
        targets[k] = (rows_t[i:j], lab[i:j] - k * T)
        i = j
    s = torch.zeros(b, dtype=xs.dtype, device=xs.device)
    g = torch.zeros(b, w.shape[1], dtype=xs.dtype, device=xs.device) if need_x else None
    neg_ref = -ref2[:, None]
    pieces = []
    for k, a in enumerate(range(0, C, T)):
        e = min(C, a + T)
        off = k * stride_rows * T
        z = buf[off: off + b * (e - a)].view(b, e - a)
        wt = w[a:e]
        torch.mm(xs, wt.t(), out=z)
        p = torch.addcmul(neg_ref, z, inv[a:e], out=z).exp2_()
        t = targets.get(k)
        if t is not None:
            p[t] = 0.0
        s += p.sum(dim=1)
        p.mul_(inv[a:e])
        if g is not None:
            g.addmm_(p, wt)
        pieces.append((a, e, p))
    s = s + torch.where(has_t, torch.exp2(t2 - ref2), torch.zeros_like(s))
    if e2 is not None:
        s = s + torch.exp2(e2 - ref2)
    return pieces, s, g


class FusedMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xn: Tensor, weight: Tensor, labels: Tensor, coef: Tensor, scale: float,
                target_fn: Callable[[Tensor], Tensor], extra_fn: Callable[[Tensor], Tensor] | None,
                row_chunk: int, row_fn: RowFn | None = None):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = torch.promote_types(xn.dtype, weight.dtype)
        dev = xn.device
        with torch.autocast(device_type=dev.type, enabled=False):
            x = xn.detach().to(dtype)
            B, D = x.shape
            C = weight.shape[0]
            valid = (labels >= 0) & (labels < C)
            ly = torch.where(valid, labels, torch.full_like(labels, -1))
            yc = ly.clamp_min(0)
            coef = torch.where(valid, coef.to(dtype), torch.zeros((), dtype=dtype, device=dev))
            w = weight.detach().to(dtype)
            inv = torch.linalg.vector_norm(w, dim=1).clamp_min_(NORM_EPS).reciprocal_()
            inv2 = inv * inv
            wy = w[yc] * (inv[yc] * valid)[:, None]                         # w_hat[y_i]  [B, D]

            # target logits and d t / d cos_y (autograd on the policy, at forward time)
            with torch.enable_grad():
                cy = torch.linalg.vecdot(x, wy).detach().requires_grad_(True)
                t = target_fn(cy.clamp(-1.0, 1.0)).to(dtype)
                dt = torch.autograd.grad(t.sum(), cy, allow_unused=True)[0] if need_x or need_w else None
            t = t.detach()
            if dt is None:
                dt = torch.zeros_like(cy)
            xe = e = None
            if extra_fn is not None:
                with torch.enable_grad():
                    xe = x.clone().requires_grad_(True)
                    e = extra_fn(xe)
                if e is None:
                    xe = None
            e2 = (e.detach().to(dtype) * LOG2E).expand(B) if xe is not None else None

            t2 = torch.where(valid, t, torch.zeros_like(t)) * LOG2E
            fixed = scale <= FIXED_REF_MAX_SCALE
            xs = x * (scale * LOG2E)
            loss_rows = torch.zeros(B, dtype=dtype, device=dev)
            g_t = torch.zeros(B, dtype=dtype, device=dev)          # dL/dt_i
            g_e = torch.zeros((), dtype=dtype, device=dev)         # dL/dE
            gx = torch.empty(B, D, dtype=dtype, device=dev) if need_x else None
            # gw accumulates G' = P'^T (c x) with P' = P / ||w||, i.e. the gradient w.r.t.
            # w_hat divided by ||w||; projection at the end: G' - (G' . w) w / ||w||^2
            gw = torch.empty(C, D, dtype=dtype, device=dev) if need_w else None
            rows_max = min(row_chunk, B)
            if fixed:
                # class tiles of ``_TILE`` classes, tile-major: tile k of a block is a
                # contiguous [rows, n_k] view, so its GEMMs read W[a:e] while it is in cache
                T = max(1, min(_TILE if torch.get_num_threads() == 1 else _TILE_THREADED, C))
                n_tiles = -(-C // T)
                buf = torch.empty(n_tiles * rows_max * T, dtype=dtype, device=dev)
            else:
                # one block buffer for every block: a fresh b x C tensor each time would be
                # mapped (and page-faulted) anew by glibc above its 32 MiB mmap threshold
                buf = torch.empty(rows_max, C, dtype=dtype, device=dev)
            for r0 in range(0, B, row_chunk):
                r1 = min(B, r0 + row_chunk)
                xb, lb, tb = xs[r0:r1], ly[r0:r1], t2[r0:r1]
                eb = e2[r0:r1] if e2 is not None else None
                gxb = None
                if fixed:
                    ref = torch.full_like(tb, scale * LOG2E)
                    ref = torch.maximum(ref, tb)
                    if eb is not None:
                        ref = torch.maximum(ref, eb)
                    pieces, s, gxb = _tiled_block(xb, w, inv, lb, tb, eb, ref, buf, T, rows_max, need_x)
                    bad = (s < UNDERFLOW).nonzero().squeeze(1)
                    if bad.numel():
                        # rows whose every logit is far below the fixed reference: redo them
                        # with their own maximum (rare; allocates [bad, C])
                        pb, sb, rb = _block(xb[bad], w, inv, lb[bad], tb[bad],
                                            eb[bad] if eb is not None else None, None)
                        pb.mul_(inv)
                        for a, b_, pt in pieces:    # not ``e``: that is UNPG's extra term
                            pt[bad] = pb[:, a:b_]
                        s[bad], ref[bad] = sb, rb
                        if gxb is not None:
                            gxb[bad] = torch.mm(pb, w)
                        del pb
                else:
                    p, s, ref = _block(xb, w, inv, lb, tb, eb, None, buf[: r1 - r0])
                lse2 = torch.log2(s) + ref                           # base-2 log-sum-exp
                vb = lb >= 0
                loss_rows[r0:r1] = torch.where(vb, (lse2 - tb) * LN2, torch.zeros_like(s))
                cb = coef[r0:r1]
                if row_fn is not None:
                    # l_i = phi(ce_i): every gradient term of the row scales by phi'(ce_i)
                    val, fac = row_fn(loss_rows[r0:r1])
                    loss_rows[r0:r1] = torch.where(vb, val, torch.zeros_like(val))
                    cb = cb * fac
                g_t[r0:r1] = cb * (torch.exp2(tb - lse2) - 1.0) * vb
                if eb is not None:
                    g_e = g_e + (cb * torch.exp2(eb - lse2)).sum()
                if not (need_x or need_w):
                    continue
                c = cb * scale / s                                    # dL/dcos_ij = c_i P_ij
                if not fixed:
                    p.mul_(inv)                                       # P' = P / ||w_j||
                    pieces = [(a, min(C, a + _CLASS_STEP), p[:, a:min(C, a + _CLASS_STEP)])
                              for a in range(0, C, _CLASS_STEP)]
                if need_x:
                    if gxb is None:
                        torch.mm(p, w, out=gx[r0:r1])
                    else:
                        gx[r0:r1] = gxb
                    gx[r0:r1].mul_(c[:, None])
                if need_w:
                    xc = x[r0:r1] * c[:, None]
                    last = r1 == B
                    if not fixed and not last:
                        if r0 == 0:
                            torch.mm(p.t(), xc, out=gw)
                        else:
                            gw.addmm_(p.t(), xc)
                        continue
                    # class slice by slice; the last block finishes each slice while it is
                    # in cache, including the projection through w / ||w||
                    for a, e_, pt in pieces:
                        g_ = gw[a:e_]
                        if r0 == 0:
                            torch.mm(pt.t(), xc, out=g_)
                        else:
                            g_.addmm_(pt.t(), xc)
                        if last:
                            w_ = w[a:e_]
                            radial = torch.linalg.vecdot(g_, w_).mul_(inv2[a:e_])
                            g_.addcmul_(w_, radial[:, None], value=-1.0)
            del xs, buf
            p = pieces = None
            loss = (coef * loss_rows).sum()
            gcy = g_t * dt                                             # dL/dcos_y
            if need_x:
                gx.addcmul_(wy, gcy[:, None])
                if xe is not None:
                    gx.add_(torch.autograd.grad(e, xe, grad_outputs=g_e.to(e.dtype))[0].to(dtype))
            if need_w:
                # target rows (the projection is linear and row-wise, so each
                # contribution is projected on its own and then accumulated)
                tg = x * (gcy * valid)[:, None]
                tg = tg.addcmul_(wy, torch.linalg.vecdot(tg, wy)[:, None], value=-1.0)
                tg.mul_(inv[yc, None])
                gw.index_put_((yc,), tg, accumulate=True)
                if gw.dtype != weight.dtype:
                    gw = gw.to(weight.dtype)
        if gx is not None and gx.dtype != xn.dtype:
            gx = gx.to(xn.dtype)
        ctx.save_for_backward(gx, gw)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        gx, gw = ctx.saved_tensors
        if bool(grad_out == 1):
            # the stored tensors themselves: without retain_graph the engine frees the
            # saved ones before accumulating, so weight.grad takes this storage (no copy);
            # with retain_graph autograd copies them; they are never modified in place
            return gx, gw, None, None, None, None, None, None, None
        gxo = gx * grad_out.to(gx.dtype) if gx is not None else None
        gwo = gw * grad_out.to(gw.dtype) if gw is not None else None
        return gxo, gwo, None, None, None, None, None, None, None


def fused_margin_ce(xn: Tensor, weight: Tensor, labels: Tensor, coef: Tensor, scale: float,
                    target_fn: Callable[[Tensor], Tensor], extra_fn: Callable[[Tensor], Tensor] | None = None,
                    row_chunk: int | None = None, row_fn: RowFn | None = None) -> Tensor:
    """The scalar ``sum_i coef_i l_i`` (see module doc).  ``coef`` must not
    require gradient; ``target_fn`` maps target cosines to target logits
    ``s * psi``; ``extra_fn`` maps ``xn`` to UNPG's scalar log-sum-exp (or
    ``None``).  ``row_fn`` (optional) maps the rows' cross-entropies ``ce``
    to ``(phi(ce), phi'(ce))``: the loss becomes ``sum_i coef_i phi(ce_i)``
    (the comp-sum losses are functions of the row cross-entropy; each row's
    gradient is scaled by ``phi'(ce_i)``, known once the row's log-sum-exp is)."""
    if coef.requires_grad:
        raise ValueError("coef: the fused head needs row weights without gradient (use head='chunked')")
    if row_chunk is None:
        row_chunk = auto_row_chunk(xn.shape[0], weight.shape[0], weight.shape[1])
    if row_chunk < 1:
        raise ValueError(f"row_chunk: expected an integer >= 1, got {row_chunk}")
    return FusedMarginCE.apply(xn, weight, labels, coef.detach(), float(scale), target_fn, extra_fn, int(row_chunk),
                               row_fn)
