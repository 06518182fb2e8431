"""Fused margin cross-entropy: gradients computed during forward (3 GEMMs).

``fused_margin_ce(xn, weight, labels, coef, scale, target_fn, extra_fn)``
returns the *reduced* (scalar) loss

    L = sum_i coef_i * l_i,   l_i = log(sum_{j != y_i} e^{s cos_ij} + e^{t_i} + e^{E}) - t_i

with ``cos_ij = xn_i . w_j / ||w_j||``, ``t_i = target_fn(cos_{i y_i})`` the
margin target logit (``s * psi``), ``E = extra_fn(xn)`` an optional scalar
(UNPG's in-batch negatives) and ``coef_i`` the row weight of the reduction
(``w_i / B`` for 'mean', ``w_i`` for 'sum', 0 for label -1).

The batch is visited in ROW chunks (Liger Kernel's approach): for ``b`` rows
the full ``[b, C]`` logit block is one GEMM; its exact row log-sum-exp gives
the softmax at once, hence ``dL/dcos`` for those rows, and the two gradient
GEMMs follow immediately (``grad x_b = P W_hat``, ``G += P^T x_b``,
accumulated into one ``[C, D]`` buffer).  Nothing is recomputed: 3 GEMMs in
all, the matmul floor of a linear layer.  The chain rule through the weight
normalisation is applied once to the accumulated buffer, the target-logit
chain rule (``psi'``, via autograd on ``target_fn`` at forward time) and
UNPG's extra term once per batch.  Backward only scales the stored gradients
by ``grad_output`` (a scalar), so calling backward twice (``retain_graph``)
or with any ``grad_output`` is exact.

Valid only for a scalar output whose row weights are known at forward
('mean' or 'sum', sample weights without gradient); the head falls back to
:mod:`losskit.heads.chunked` otherwise.  Memory: one ``[b, C]`` block (``b`` from
:func:`auto_row_chunk`), the normalised weight ``[C, D+1]`` (freed after
forward) and the ``[C, D]`` gradient, stored until backward (backward
returns ``grad_output`` times it, a second ``[C, D]`` tensor while both
live).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["fused_margin_ce", "FusedMarginCE", "auto_row_chunk", "AUTO_ROW_ELEMS"]

_NORM_EPS = 1e-12
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
#: rows of a block whose sum of exp(logit - reference) falls below this are
#: recomputed with their row maximum as the reference
_UNDERFLOW = 1e-25
#: the fixed reference max(s, t_i, E) is used up to this scale; beyond it
#: (CFCD's adaptive scale can reach hundreds) every block uses row maxima
_FIXED_REF_MAX_SCALE = 80.0
#: automatic row chunk: at least this many logits per block (16 MiB in fp32)
AUTO_ROW_ELEMS = 2 ** 22


def auto_row_chunk(batch: int, num_classes: int, dim: int) -> int:
    """Rows per block: ``max(2**22 // C, D // 4)`` (at most ``B``).  Each
    block re-reads ``W_hat`` twice and reads+writes the ``[C, D]`` gradient
    buffer once, so short blocks are memory-bound: on the project's CPU
    (B = 1024, C = 100k, D = 512, one thread) 16 rows took 10.4 s, 41 rows
    6.3-7.1 s, 64 rows 5.4-5.6 s, 128 rows 4.6-5.3 s, 256 rows 4.4-4.8 s
    (matmul floor 3.6-4.5 s).  ``D // 4`` rows keep the block at a quarter
    of the weight's size."""
    return max(1, min(batch, max(AUTO_ROW_ELEMS // max(num_classes, 1), dim // 4)))


def _block(xa: Tensor, wa: Tensor, ly: Tensor, t2: Tensor, e2: Tensor | None, ref2: Tensor | None):
    """Unnormalised softmax of one row block in base 2.

    ``xa``: ``[b, D+1]`` rows ``[log2e * s * x, 0]``; ``wa``: ``[C, D+1]``
    rows ``[w_hat, 1]``; ``t2``/``e2``: target / extra logits times log2e;
    ``ref2``: the per-row reference (``None``: the row maximum).  Returns
    ``(P, S, ref2)`` with ``P_ij = 2^(z_ij - ref_i)`` for non-target ``j``
    (0 in the target column and for label -1 rows' nothing masked) and
    ``S_i`` the full row sum including target and extra terms."""
    b = xa.shape[0]
    rows = torch.arange(b, device=xa.device)
    has_t = ly >= 0
    if ref2 is None:
        z = torch.mm(xa, wa.t())
        z[rows[has_t], ly[has_t]] = float("-inf")
        ref2 = z.amax(dim=1)
        ref2 = torch.maximum(ref2, torch.where(has_t, t2, torch.full_like(t2, float("-inf"))))
        if e2 is not None:
            ref2 = torch.maximum(ref2, e2)
        ref2 = torch.where(torch.isfinite(ref2), ref2, torch.zeros_like(ref2))
        p = z.sub_(ref2[:, None]).exp2_()
    else:
        xa[:, -1] = -ref2
        p = torch.mm(xa, wa.t()).exp2_()
        xa[:, -1] = 0.0
        p[rows[has_t], ly[has_t]] = 0.0
    s = p.sum(dim=1)
    s = s + torch.where(has_t, torch.exp2(t2 - ref2), torch.zeros_like(s))
    if e2 is not None:
        s = s + torch.exp2(e2 - ref2)
    return p, s, ref2


class FusedMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xn: Tensor, weight: Tensor, labels: Tensor, coef: Tensor, scale: float,
                target_fn: Callable[[Tensor], Tensor], extra_fn: Callable[[Tensor], Tensor] | None,
                row_chunk: int):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = torch.promote_types(xn.dtype, weight.dtype)
        dev = xn.device
        with torch.autocast(device_type=dev.type, enabled=False):
            x = xn.detach().to(dtype)
            B, D = x.shape
            C = weight.shape[0]
            valid = (labels >= 0) & (labels < C)
            ly = torch.where(valid, labels, torch.full_like(labels, -1))
            coef = torch.where(valid, coef.to(dtype), torch.zeros((), dtype=dtype, device=dev))
            w = weight.detach()
            inv = torch.linalg.vector_norm(w, dim=1, dtype=dtype).clamp_min_(_NORM_EPS).reciprocal_()
            wa = torch.empty(C, D + 1, dtype=dtype, device=dev)
            torch.mul(w, inv[:, None], out=wa[:, :-1])
            wa[:, -1] = 1.0
            wy = wa[ly.clamp_min(0), :-1] * valid[:, None].to(dtype)          # w_hat[y_i]  [B, D]

            # target logits and d t / d cos_y (autograd on the policy, at forward time)
            with torch.enable_grad():
                cy = torch.linalg.vecdot(x, wy).detach().requires_grad_(True)
                t = target_fn(cy.clamp(-1.0, 1.0)).to(dtype)
                dt = torch.autograd.grad(t.sum(), cy, allow_unused=True)[0] if need_x or need_w else None
            t = t.detach()
            if dt is None:
                dt = torch.zeros_like(cy)
            xe = None
            if extra_fn is not None:
                with torch.enable_grad():
                    xe = x.clone().requires_grad_(True)
                    e = extra_fn(xe)
                if e is None:
                    xe = None
            e2 = (e.detach().to(dtype) * _LOG2E).expand(B) if xe is not None else None

            t2 = torch.where(valid, t, torch.zeros_like(t)) * _LOG2E
            fixed = scale <= _FIXED_REF_MAX_SCALE
            xa = torch.empty(B, D + 1, dtype=dtype, device=dev)
            torch.mul(x, scale * _LOG2E, out=xa[:, :-1])
            xa[:, -1] = 0.0
            loss_rows = torch.zeros(B, dtype=dtype, device=dev)
            g_t = torch.zeros(B, dtype=dtype, device=dev)          # dL/dt_i
            g_e = torch.zeros((), dtype=dtype, device=dev)         # dL/dE
            gx = torch.empty(B, D, dtype=dtype, device=dev) if need_x else None
            gw = torch.zeros(C, D, dtype=dtype, device=dev) if need_w else None
            wn = wa[:, :-1]
            for r0 in range(0, B, row_chunk):
                r1 = min(B, r0 + row_chunk)
                xb, lb, tb = xa[r0:r1], ly[r0:r1], t2[r0:r1]
                eb = e2[r0:r1] if e2 is not None else None
                if fixed:
                    ref = torch.full_like(tb, scale * _LOG2E)
                    ref = torch.maximum(ref, tb)
                    if eb is not None:
                        ref = torch.maximum(ref, eb)
                    p, s, ref = _block(xb, wa, lb, tb, eb, ref)
                    bad = (s < _UNDERFLOW).nonzero().squeeze(1)
                    if bad.numel():
                        pb, sb, rb = _block(xb[bad], wa, lb[bad], tb[bad], eb[bad] if eb is not None else None, None)
                        p[bad], s[bad], ref[bad] = pb, sb, rb
                else:
                    p, s, ref = _block(xb, wa, lb, tb, eb, None)
                lse2 = torch.log2(s) + ref                           # base-2 log-sum-exp
                vb = lb >= 0
                loss_rows[r0:r1] = torch.where(vb, (lse2 - tb) * _LN2, torch.zeros_like(s))
                cb = coef[r0:r1]
                g_t[r0:r1] = cb * (torch.exp2(tb - lse2) - 1.0) * vb
                if eb is not None:
                    g_e = g_e + (cb * torch.exp2(eb - lse2)).sum()
                if need_x or need_w:
                    c = cb * scale / s                                # dL/dcos_ij = c_i P_ij
                    if need_x:
                        torch.mm(p, wn, out=gx[r0:r1])
                        gx[r0:r1].mul_(c[:, None])
                    if need_w:
                        gw.addmm_(p.t(), x[r0:r1] * c[:, None])
                del p
            del xa
            loss = (coef * loss_rows).sum()
            gcy = g_t * dt                                             # dL/dcos_y
            if need_x:
                gx.addcmul_(wy, gcy[:, None])
                if xe is not None:
                    gx.add_(torch.autograd.grad(e, xe, grad_outputs=g_e.to(e.dtype))[0].to(dtype))
            if need_w:
                gw.index_put_((ly.clamp_min(0),), x * (gcy * valid)[:, None], accumulate=True)
                # through w / ||w||: (g - (g . w_hat) w_hat) / ||w||, in class chunks
                step = 8192
                for a in range(0, C, step):
                    g_, w_ = gw[a:a + step], wn[a:a + step]
                    radial = torch.einsum("ij,ij->i", g_, w_)
                    g_.addcmul_(w_, radial[:, None], value=-1.0).mul_(inv[a:a + step, None])
                if gw.dtype != weight.dtype:
                    gw = gw.to(weight.dtype)
            del wa, wn
        if gx is not None and gx.dtype != xn.dtype:
            gx = gx.to(xn.dtype)
        ctx.save_for_backward(gx, gw)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        gx, gw = ctx.saved_tensors
        gxo = gwo = None
        if gx is not None:
            gxo = gx * grad_out.to(gx.dtype)
        if gw is not None:
            gwo = gw * grad_out.to(gw.dtype)
        return gxo, gwo, None, None, None, None, None, None


def fused_margin_ce(xn: Tensor, weight: Tensor, labels: Tensor, coef: Tensor, scale: float,
                    target_fn: Callable[[Tensor], Tensor], extra_fn: Callable[[Tensor], Tensor] | None = None,
                    row_chunk: int | None = None) -> Tensor:
    """The scalar ``sum_i coef_i l_i`` (see module doc).  ``coef`` must not
    require gradient; ``target_fn`` maps target cosines to target logits
    ``s * psi``; ``extra_fn`` maps ``xn`` to UNPG's scalar log-sum-exp (or
    ``None``)."""
    if coef.requires_grad:
        raise ValueError("coef: the fused head needs row weights without gradient (use head='chunked')")
    if row_chunk is None:
        row_chunk = auto_row_chunk(xn.shape[0], weight.shape[0], weight.shape[1])
    if row_chunk < 1:
        raise ValueError(f"row_chunk: expected an integer >= 1, got {row_chunk}")
    return FusedMarginCE.apply(xn, weight, labels, coef.detach(), float(scale), target_fn, extra_fn, int(row_chunk))
