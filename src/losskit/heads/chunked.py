"""Chunked non-target log-sum-exp over normalised class centres.

``NonTargetLSE(xn, weight, labels, scale)`` returns, for each row ``i``,

    N_i = log sum_{j != y_i} exp(scale * xn_i . w_j / ||w_j||)

without ever building the ``B x C`` matrix: classes are visited in chunks
with an online log-sum-exp; only ``N`` is saved; backward recomputes each
chunk's logits.  The weight rows are normalised chunk by chunk (no ``C x D``
normalised copy) and the gradient goes to the raw weight through the
normalisation.  Rows with label -1 mask no column.

Every margin in :mod:`losskit.heads` only changes the target logit, so the
per-row loss is ``logaddexp(N_i, t_i) - t_i`` with ``t_i`` the target logit;
autograd composes that with any reduction and sample weights, so the kernel
is exact for all of them (it receives an arbitrary ``dL/dN`` per row).

Cost: forward 1 GEMM, backward 3 (recompute, grad of input, grad of weight),
i.e. 4 GEMMs against a linear layer's 3.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["nontarget_lse", "NonTargetLSE", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 8192
_NORM_EPS = 1e-12  # as torch.nn.functional.normalize
_LOG2E = 1.4426950408889634


def _chunk_weight(weight: Tensor, a: int, b: int, dtype: torch.dtype, aug: float | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Normalised rows ``[a, b)`` (a fresh ``[b-a, D]`` copy; with ``aug`` an
    extra last column holding ``aug``, so that one GEMM against
    ``[x, r]`` gives ``x . w_hat + aug * r``).  Returns (rows, 1/||w||)."""
    wc = weight[a:b]
    inv = torch.linalg.vector_norm(wc, dim=1, dtype=dtype).clamp_min_(_NORM_EPS).reciprocal_()
    if aug is None:
        return torch.mul(wc, inv[:, None]).to(dtype), inv
    out = torch.empty(b - a, wc.shape[1] + 1, dtype=dtype, device=wc.device)
    torch.mul(wc, inv[:, None], out=out[:, :-1])
    out[:, -1] = aug
    return out, inv


def _target_rows(labels: Tensor, a: int, b: int) -> tuple[Tensor, Tensor]:
    hit = (labels >= a) & (labels < b)
    rows = hit.nonzero().squeeze(1)
    return rows, labels[rows] - a


#: below this sum of exp(logit - scale) the fixed reference may have lost
#: precision; such rows are recomputed with an online maximum
_UNDERFLOW = 1e-25
#: the fixed reference (the logits' upper bound ``scale``) is used up to this
#: scale; beyond it (CFCD can reach hundreds) the online maximum is used
_FIXED_REF_MAX_SCALE = 80.0


@torch.no_grad()
def _forward_online(xn: Tensor, weight: Tensor, labels: Tensor, scale: float, chunk: int) -> Tensor:
    """Online log-sum-exp with a running row maximum (any scale)."""
    B = xn.shape[0]
    C = weight.shape[0]
    xs = xn * scale
    m = torch.full((B,), float("-inf"), dtype=xn.dtype, device=xn.device)
    s = torch.zeros(B, dtype=xn.dtype, device=xn.device)
    for a in range(0, C, chunk):
        b = min(a + chunk, C)
        wn, _ = _chunk_weight(weight, a, b, xn.dtype)
        logit = torch.mm(xs, wn.t())
        rows, cols = _target_rows(labels, a, b)
        if rows.numel():
            logit[rows, cols] = float("-inf")
        cmax = logit.amax(dim=1)
        m_new = torch.maximum(m, cmax)
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        s.mul_(torch.exp(m - m_safe))
        logit.sub_(m_safe[:, None]).exp_()
        s.add_(logit.sum(dim=1))
        m = m_new
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return torch.log(s) + m_safe


@torch.no_grad()
def _forward(xn: Tensor, weight: Tensor, labels: Tensor, scale: float, chunk: int) -> Tensor:
    """Sum of ``exp(scale * cos - scale)`` (the logits are bounded by
    ``scale``, so no running maximum is needed); the subtraction rides in the
    GEMM as an extra column.  Rows whose sum underflows are recomputed."""
    B, C = xn.shape[0], weight.shape[0]
    if scale > _FIXED_REF_MAX_SCALE or B == 0 or C == 0:
        return _forward_online(xn, weight, labels, scale, chunk)
    # exp2 is ~3x faster than exp on CPU: log2(e) rides in the GEMM too
    xa = torch.empty(B, xn.shape[1] + 1, dtype=xn.dtype, device=xn.device)
    torch.mul(xn, scale * _LOG2E, out=xa[:, :-1])
    xa[:, -1] = -scale * _LOG2E
    s = torch.zeros(B, dtype=xn.dtype, device=xn.device)
    for a in range(0, C, chunk):
        b = min(a + chunk, C)
        wa, _ = _chunk_weight(weight, a, b, xn.dtype, aug=1.0)
        p = torch.mm(xa, wa.t()).exp2_()
        rows, cols = _target_rows(labels, a, b)
        if rows.numel():
            p[rows, cols] = 0.0
        s.add_(p.sum(dim=1))
    out = torch.log(s).add_(scale)
    n_classes = torch.full_like(s, C) - ((labels >= 0) & (labels < C)).to(s.dtype)
    bad = ((s < _UNDERFLOW) & (n_classes > 0)).nonzero().squeeze(1)
    if bad.numel():
        out[bad] = _forward_online(xn[bad], weight, labels[bad], scale, chunk)
    return out


class NonTargetLSE(torch.autograd.Function):
    """Outputs ``(N, cos_y)``: the non-target log-sum-exp and the target
    cosine (0 for label -1), so that the weight gets ONE dense gradient (a
    separate gather ``weight[labels]`` would allocate a second ``C x D``
    gradient in backward)."""

    @staticmethod
    def forward(ctx, xn: Tensor, weight: Tensor, labels: Tensor, scale: float, chunk: int):
        dtype = torch.promote_types(xn.dtype, weight.dtype)
        with torch.autocast(device_type=xn.device.type, enabled=False):
            x = xn.to(dtype)
            out = _forward(x, weight, labels, float(scale), int(chunk))
            valid = (labels >= 0) & (labels < weight.shape[0])
            if weight.shape[0] == 0:
                wy = torch.zeros_like(x)
            else:
                wy = weight[labels.clamp(0, weight.shape[0] - 1)].to(dtype)
            wy = wy / torch.linalg.vector_norm(wy, dim=1, keepdim=True).clamp_min(_NORM_EPS)
            cos_y = torch.where(valid, torch.linalg.vecdot(x, wy), torch.zeros((), dtype=dtype, device=x.device))
        ctx.save_for_backward(xn, weight, labels, out)
        ctx.scale = float(scale)
        ctx.chunk = int(chunk)
        return out, cos_y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, grad_cos: Tensor):
        xn, weight, labels, out = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = out.dtype
        scale, chunk = ctx.scale, ctx.chunk
        with torch.autocast(device_type=xn.device.type, enabled=False):
            x = xn.to(dtype)
            B, D = x.shape
            finite = torch.isfinite(out)
            n_safe = torch.where(finite, out, torch.zeros_like(out))
            # dN_i/dcos_ij = scale * softmax_ij; the row factor g_i * scale is
            # applied to x (for grad W) and to grad x afterwards, not to B x C
            if grad_out is None:
                grad_out = torch.zeros_like(out)
            g = torch.where(finite, grad_out.to(dtype), torch.zeros_like(out)) * scale
            gc = None
            if grad_cos is not None:
                gc = torch.where(labels >= 0, grad_cos.to(dtype), torch.zeros_like(out))
            xa = torch.empty(B, D + 1, dtype=dtype, device=x.device)
            torch.mul(x, scale * _LOG2E, out=xa[:, :-1])
            torch.mul(n_safe, -_LOG2E, out=xa[:, -1])
            empty_rows = (~finite).nonzero().squeeze(1)        # no non-target class (C = 1)
            xg = x * g[:, None] if need_w else None
            gx = torch.zeros_like(x) if need_x else None
            gxt = torch.zeros_like(x) if (need_x and gc is not None) else None
            gw = torch.empty_like(weight) if need_w else None
            C = weight.shape[0]
            for a in range(0, C, chunk):
                b = min(a + chunk, C)
                wa, inv = _chunk_weight(weight, a, b, dtype, aug=1.0)
                wn = wa[:, :-1]
                p = torch.mm(xa, wa.t()).exp2_()                # softmax over non-targets
                rows, cols = _target_rows(labels, a, b)
                if rows.numel():
                    p[rows, cols] = 0.0
                if empty_rows.numel():
                    p[empty_rows] = 0.0
                if need_x:
                    gx.addmm_(p, wn)
                    if gxt is not None and rows.numel():
                        gxt.index_add_(0, rows, wn[cols] * gc[rows, None])
                if need_w:
                    gwn = torch.mm(p.t(), xg)                    # grad w.r.t. normalised rows
                    if gc is not None and rows.numel():
                        gwn.index_add_(0, cols, x[rows] * gc[rows, None])
                    radial = torch.linalg.vecdot(gwn, wn)
                    # through w / ||w||: (gwn - (gwn . w_hat) w_hat) / ||w||
                    gwn.addcmul_(wn, radial[:, None], value=-1.0).mul_(inv[:, None])
                    gw[a:b] = gwn
            if need_x:
                gx.mul_(g[:, None])
                if gxt is not None:
                    gx.add_(gxt)
        if gx is not None:
            gx = gx.to(xn.dtype)
        return gx, gw, None, None, None


def nontarget_lse(xn: Tensor, weight: Tensor, labels: Tensor, scale: float, chunk_size: int = DEFAULT_CHUNK,
                  return_target: bool = False):
    """``log sum_{j != y_i} exp(scale * cos_ij)`` per row, chunked (see module
    doc); with ``return_target`` also the target cosines ``cos_y``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk_size}")
    n, c = NonTargetLSE.apply(xn, weight, labels, float(scale), int(chunk_size))
    return (n, c) if return_target else n


@torch.no_grad()
def nontarget_lse_nograd(xn: Tensor, weight: Tensor, labels: Tensor, scale: float,
                         chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    dtype = torch.promote_types(xn.dtype, weight.dtype)
    with torch.autocast(device_type=xn.device.type, enabled=False):
        return _forward(xn.detach().to(dtype), weight.detach(), labels, float(scale), int(chunk_size))
