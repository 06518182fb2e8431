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


def _chunk_weight(weight: Tensor, a: int, b: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    wc = weight[a:b].to(dtype)
    inv = 1.0 / torch.linalg.vector_norm(wc, dim=1).clamp_min(_NORM_EPS)
    return wc * inv[:, None], inv


def _target_rows(labels: Tensor, a: int, b: int) -> tuple[Tensor, Tensor]:
    hit = (labels >= a) & (labels < b)
    rows = hit.nonzero().squeeze(1)
    return rows, labels[rows] - a


@torch.no_grad()
def _forward(xn: Tensor, weight: Tensor, labels: Tensor, scale: float, chunk: int) -> Tensor:
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


class NonTargetLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xn: Tensor, weight: Tensor, labels: Tensor, scale: float, chunk: int) -> Tensor:
        dtype = torch.promote_types(xn.dtype, weight.dtype)
        with torch.autocast(device_type=xn.device.type, enabled=False):
            x = xn.to(dtype)
            out = _forward(x, weight, labels, float(scale), int(chunk))
        ctx.save_for_backward(xn, weight, labels, out)
        ctx.scale = float(scale)
        ctx.chunk = int(chunk)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        xn, weight, labels, out = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = out.dtype
        scale, chunk = ctx.scale, ctx.chunk
        with torch.autocast(device_type=xn.device.type, enabled=False):
            x = xn.to(dtype)
            finite = torch.isfinite(out)
            n_safe = torch.where(finite, out, torch.zeros_like(out))
            g = torch.where(finite, grad_out.to(dtype), torch.zeros_like(out)) * scale
            xs = x * scale
            gx = torch.zeros_like(x) if need_x else None
            gw = torch.zeros_like(weight) if need_w else None
            C = weight.shape[0]
            for a in range(0, C, chunk):
                b = min(a + chunk, C)
                wn, inv = _chunk_weight(weight, a, b, dtype)
                p = torch.mm(xs, wn.t())
                rows, cols = _target_rows(labels, a, b)
                if rows.numel():
                    p[rows, cols] = float("-inf")
                # p <- dN/dcos * g = scale * softmax * g
                p.sub_(n_safe[:, None]).exp_().mul_(g[:, None])
                if need_x:
                    gx.addmm_(p, wn)
                if need_w:
                    gwn = torch.mm(p.t(), x)                      # grad w.r.t. normalised rows
                    radial = (gwn * wn).sum(dim=1, keepdim=True)
                    gwn.sub_(radial * wn).mul_(inv[:, None])      # through w / ||w||
                    gw[a:b] = gwn.to(gw.dtype)
        if gx is not None:
            gx = gx.to(xn.dtype)
        return gx, gw, None, None, None


def nontarget_lse(xn: Tensor, weight: Tensor, labels: Tensor, scale: float, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """``log sum_{j != y_i} exp(scale * cos_ij)`` per row, chunked (see module doc)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk_size}")
    return NonTargetLSE.apply(xn, weight, labels, float(scale), int(chunk_size))


@torch.no_grad()
def nontarget_lse_nograd(xn: Tensor, weight: Tensor, labels: Tensor, scale: float,
                         chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    dtype = torch.promote_types(xn.dtype, weight.dtype)
    with torch.autocast(device_type=xn.device.type, enabled=False):
        return _forward(xn.detach().to(dtype), weight.detach(), labels, float(scale), int(chunk_size))
