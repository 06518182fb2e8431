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

from losskit.core.checks import tensor_checks_enabled
from losskit.kernels.constants import FIXED_REF_MAX_SCALE, LOG2E, NORM_EPS, UNDERFLOW

__all__ = ["nontarget_lse", "NonTargetLSE", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 8192


class _Plan:
    """Per-call precomputation shared by the chunk loops: the inverse row
    norms of the weight (one pass), the target column of every row per chunk
    (an index and a hit mask over the ``B`` rows, O(B) per chunk, built once
    and reused: no host synchronisation, so a chunk with no target costs the
    same as one with targets) and one reusable buffer for the normalised,
    augmented weight chunk.  Few large ops per chunk matter on a shared CPU:
    every op is a parallel region that waits for all threads."""

    def __init__(self, weight: Tensor, labels: Tensor, chunk: int, dtype: torch.dtype):
        self.weight, self.chunk, self.dtype = weight, chunk, dtype
        C, D = weight.shape
        self.C, self.D = C, D
        self.inv = torch.linalg.vector_norm(weight, dim=1, dtype=dtype).clamp_min_(NORM_EPS).reciprocal_()
        valid = (labels >= 0) & (labels < C)
        self.labels = torch.where(valid, labels, torch.full_like(labels, -1))
        self._targets: dict[int, tuple[Tensor, Tensor]] = {}
        self._buf = torch.empty(min(chunk, C), D + 1, dtype=dtype, device=weight.device)
        self._buf[:, -1] = 1.0
        self._logits: Tensor | None = None

    def chunks(self):
        for a in range(0, self.C, self.chunk):
            yield a, min(a + self.chunk, self.C)

    def target(self, a: int, b: int) -> tuple[Tensor, Tensor]:
        """``(idx [B, 1], hit [B, 1])``: the target column of each row inside
        the chunk ``[a, b)`` (0 where the target is elsewhere) and whether it
        is inside."""
        t = self._targets.get(a)
        if t is None:
            loc = self.labels - a
            hit = (loc >= 0) & (loc < b - a)
            t = self._targets[a] = (torch.where(hit, loc, torch.zeros_like(loc))[:, None], hit[:, None])
        return t

    def wa(self, a: int, b: int) -> Tensor:
        """``[w_hat_j, 1]`` rows for ``j`` in ``[a, b)`` (a view of the buffer)."""
        out = self._buf[: b - a]
        torch.mul(self.weight[a:b], self.inv[a:b, None], out=out[:, :-1])
        return out

    def wa_view(self, a: int, b: int) -> Tensor:
        """The rows ``[a, b)`` that :meth:`wa` wrote last (no recomputation)."""
        return self._buf[: b - a]

    def logits(self, xa: Tensor, a: int, b: int) -> Tensor:
        """``xa [w_hat, 1]^T`` for the chunk ``[a, b)`` into one ``[B, chunk]``
        buffer reused by every chunk (a fresh block per chunk is mapped and
        page-faulted anew by glibc above its mmap threshold)."""
        n = xa.shape[0] * (b - a)
        if self._logits is None:
            self._logits = torch.empty(xa.shape[0] * min(self.chunk, self.C), dtype=self.dtype, device=xa.device)
        out = self._logits[:n].view(xa.shape[0], b - a)
        return torch.mm(xa, self.wa(a, b).t(), out=out)

    def mask(self, p: Tensor, a: int, value: float) -> None:
        """Set each row's target column inside the chunk to ``value`` (a
        gather and a scatter over the ``B`` rows)."""
        idx, hit = self.target(a, a + p.shape[1])
        p.scatter_(1, idx, torch.where(hit, value, p.gather(1, idx)))


@torch.no_grad()
def _forward_online(xn: Tensor, weight: Tensor, labels: Tensor, scale: float, chunk: int) -> Tensor:
    """Online log-sum-exp with a running row maximum (any scale)."""
    B = xn.shape[0]
    plan = _Plan(weight, labels, chunk, xn.dtype)
    xa = torch.empty(B, xn.shape[1] + 1, dtype=xn.dtype, device=xn.device)
    torch.mul(xn, scale, out=xa[:, :-1])
    xa[:, -1] = 0.0
    m = torch.full((B,), float("-inf"), dtype=xn.dtype, device=xn.device)
    s = torch.zeros(B, dtype=xn.dtype, device=xn.device)
    for a, b in plan.chunks():
        logit = plan.logits(xa, a, b)
        plan.mask(logit, a, float("-inf"))
        m_new = torch.maximum(m, logit.amax(dim=1))
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
    GEMM as an extra column, and exp2 (faster than exp on CPU, docs/margin.md) with
    log2(e) folded into the same GEMM.  Rows whose sum underflows (all
    non-target cosines far below 1) are recomputed with an online maximum."""
    B, C = xn.shape[0], weight.shape[0]
    if scale > FIXED_REF_MAX_SCALE or B == 0 or C == 0:
        return _forward_online(xn, weight, labels, scale, chunk)
    plan = _Plan(weight, labels, chunk, xn.dtype)
    xa = torch.empty(B, xn.shape[1] + 1, dtype=xn.dtype, device=xn.device)
    torch.mul(xn, scale * LOG2E, out=xa[:, :-1])
    xa[:, -1] = -scale * LOG2E
    s = torch.zeros(B, dtype=xn.dtype, device=xn.device)
    ones = torch.ones(min(chunk, C), dtype=xn.dtype, device=xn.device)
    for a, b in plan.chunks():
        p = plan.logits(xa, a, b).exp2_()
        plan.mask(p, a, 0.0)
        s.addmv_(p, ones[: b - a])
    out = torch.log(s).add_(scale)
    n_classes = torch.full_like(s, C) - ((labels >= 0) & (labels < C)).to(s.dtype)
    bad = ((s < UNDERFLOW) & (n_classes > 0)).nonzero().squeeze(1)
    if bad.numel():
        out[bad] = _forward_online(xn[bad], weight, labels[bad], scale, chunk)
    return out


# ----------------------------------------------------------------------------- no host synchronisation
# With ``tensor_checks(False)`` or under ``torch.compile``: the online log-sum-exp (a running per-row
# maximum, so no row can underflow and nothing is recomputed), target columns masked per chunk with a
# gather/scatter over the B rows, and only out-of-place ops (dynamo refuses ``out=`` into the strided
# views the buffered path uses).  Same numbers as the path above; tested against dense.

def _target_cols(ly: Tensor, a: int, b: int) -> tuple[Tensor, Tensor]:
    """``(idx [B, 1], hit [B, 1])`` of the target columns inside ``[a, b)``."""
    loc = ly - a
    hit = (loc >= 0) & (loc < b - a)
    return torch.where(hit, loc, torch.zeros_like(loc))[:, None], hit[:, None]


def _masked(z: Tensor, idx: Tensor, hit: Tensor, value: float) -> Tensor:
    return z.scatter(1, idx, torch.where(hit, value, z.gather(1, idx)))


def _inv_norms(weight: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.linalg.vector_norm(weight, dim=1, dtype=dtype).clamp_min(NORM_EPS).reciprocal()


@torch.no_grad()
def _forward_nosync(xn: Tensor, weight: Tensor, labels: Tensor, scale: float, chunk: int) -> Tensor:
    B, C = xn.shape[0], weight.shape[0]
    ly = torch.where((labels >= 0) & (labels < C), labels, torch.full_like(labels, -1))
    inv = _inv_norms(weight, xn.dtype)
    xs = xn * scale
    m = torch.full((B,), float("-inf"), dtype=xn.dtype, device=xn.device)
    s = torch.zeros(B, dtype=xn.dtype, device=xn.device)
    for a in range(0, C, chunk):
        b = min(a + chunk, C)
        z = _masked(torch.mm(xs, (weight[a:b].to(xn.dtype) * inv[a:b, None]).t()), *_target_cols(ly, a, b),
                    float("-inf"))
        m_new = torch.maximum(m, z.amax(dim=1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        s = s * torch.exp(m - m_safe) + torch.exp(z - m_safe[:, None]).sum(dim=1)
        m = m_new
    return torch.log(s) + torch.where(torch.isinf(m), torch.zeros_like(m), m)


def _backward_nosync(x: Tensor, weight: Tensor, labels: Tensor, n_safe: Tensor, g: Tensor, gc: Tensor | None,
                     scale: float, chunk: int, need_x: bool, need_w: bool):
    """``(grad x, grad W)``; ``g`` is ``scale * dL/dN`` (0 on rows without a
    non-target class), ``gc`` ``dL/dcos_y`` (0 on ignored rows)."""
    B, D = x.shape
    C = weight.shape[0]
    ly = torch.where((labels >= 0) & (labels < C), labels, torch.full_like(labels, -1))
    inv = _inv_norms(weight, x.dtype)
    xs = x * scale
    xg = x * g[:, None]
    tgt = x * gc[:, None] if gc is not None and need_w else None
    gx = torch.zeros_like(x) if need_x else None
    gws = []
    for a in range(0, C, chunk):
        b = min(a + chunk, C)
        wn = weight[a:b].to(x.dtype) * inv[a:b, None]
        idx, hit = _target_cols(ly, a, b)
        p = _masked(torch.exp(torch.mm(xs, wn.t()) - n_safe[:, None]), idx, hit, 0.0)
        if need_x:
            gx = gx + torch.mm(p, wn)
        if need_w:
            gwc = torch.mm(p.t(), xg)
            if tgt is not None:
                gwc = gwc.index_put((idx[:, 0],), torch.where(hit, tgt, 0.0), accumulate=True)
            radial = torch.linalg.vecdot(gwc, wn)
            gws.append((gwc - wn * radial[:, None]) * inv[a:b, None])
    if need_x:
        gx = gx * g[:, None]
        if gc is not None and C > 0:
            gx = gx + _target_rows_normalised(weight, labels, x) * gc[:, None]
    gw = None
    if need_w:
        gw = (torch.cat(gws) if gws else torch.zeros(C, D, dtype=x.dtype, device=x.device)).to(weight.dtype)
    return gx, gw


def _may_sync() -> bool:
    """Whether a data-dependent branch (a host read) is allowed: tensor checks
    on and not tracing for ``torch.compile``."""
    return tensor_checks_enabled() and not torch.compiler.is_compiling()


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
            nosync = not _may_sync()
            fwd = _forward_nosync if nosync else _forward
            out = fwd(x, weight, labels, float(scale), int(chunk))
            cos_y = torch.linalg.vecdot(x, _target_rows_normalised(weight, labels, x))
        ctx.save_for_backward(xn, weight, labels, out)
        ctx.scale = float(scale)
        ctx.chunk = int(chunk)
        ctx.nosync = nosync
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
            C = weight.shape[0]
            finite = torch.isfinite(out)
            n_safe = torch.where(finite, out, torch.zeros_like(out))
            if grad_out is None:
                grad_out = torch.zeros_like(out)
            # dN_i/dcos_ij = scale * softmax_ij; the row factor g_i * scale is
            # applied to x (for grad W) and to grad x afterwards, not to B x C
            g = torch.where(finite, grad_out.to(dtype), torch.zeros_like(out)) * scale
            valid = (labels >= 0) & (labels < C)
            gc = None
            if grad_cos is not None:
                gc = torch.where(valid, grad_cos.to(dtype), torch.zeros_like(out))
            if ctx.nosync or not _may_sync():
                gx, gw = _backward_nosync(x, weight, labels, n_safe, g, gc, scale, chunk, need_x, need_w)
                if gx is not None:
                    gx = gx.to(xn.dtype)
                return gx, gw, None, None, None
            plan = _Plan(weight, labels, chunk, dtype)
            xa = torch.empty(B, D + 1, dtype=dtype, device=x.device)
            torch.mul(x, scale * LOG2E, out=xa[:, :-1])
            torch.mul(n_safe, -LOG2E, out=xa[:, -1])
            xg = x * g[:, None] if need_w else None
            gx = torch.zeros_like(x) if need_x else None
            gw = torch.empty(C, D, dtype=dtype, device=weight.device) if need_w else None
            tgt_rows_w = None
            if gc is not None and need_w:
                tgt_rows_w = x * gc[:, None]                     # target cosine's grad w.r.t. w_hat_y
            for a, b in plan.chunks():
                p = plan.logits(xa, a, b).exp2_()               # softmax over non-targets
                wn = plan.wa_view(a, b)[:, :-1]
                plan.mask(p, a, 0.0)     # a row with no non-target class (C = 1) is all 0 now
                if need_x:
                    gx.addmm_(p, wn)
                if need_w:
                    gwc = gw[a:b]
                    torch.mm(p.t(), xg, out=gwc)                 # grad w.r.t. normalised rows
                    if tgt_rows_w is not None:
                        # every row, with 0 where its target is in another chunk (O(B D),
                        # no host read); index_put_(accumulate) is much faster than index_add_ on CPU
                        idx, hit = plan.target(a, b)
                        gwc.index_put_((idx[:, 0],), torch.where(hit, tgt_rows_w, 0.0), accumulate=True)
                    # through w / ||w||: (g - (g . w_hat) w_hat) / ||w||
                    radial = torch.einsum("ij,ij->i", gwc, wn)
                    gwc.addcmul_(wn, radial[:, None], value=-1.0).mul_(plan.inv[a:b, None])
            if need_x:
                gx.mul_(g[:, None])
                if gc is not None and C > 0:
                    gx.addcmul_(_target_rows_normalised(weight, labels, x), gc[:, None])
            if need_w:
                gw = gw.to(weight.dtype)
        if gx is not None:
            gx = gx.to(xn.dtype)
        return gx, gw, None, None, None


def _target_rows_normalised(weight: Tensor, labels: Tensor, like: Tensor) -> Tensor:
    """``w_hat[y_i]`` per row (zeros for label -1 or a class outside ``weight``)."""
    C = weight.shape[0]
    valid = (labels >= 0) & (labels < C)
    if C == 0:
        return torch.zeros_like(like)
    w = weight[labels.clamp(0, C - 1)].to(like.dtype)
    w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(NORM_EPS)
    return w * valid[:, None].to(like.dtype)


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
