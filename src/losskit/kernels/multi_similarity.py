"""Multi-Similarity blocks (Wang et al., CVPR 2019, arXiv 1904.06627): the
autograd Function behind ``losskit.functional.multi_similarity_loss``.

The similarity matrix is never held whole: :class:`MultiSimilarityFunction`
walks blocks of ``chunk`` anchor rows.  Given per-row coefficients ``coef``
(``core.reduction.row_coefficients``: a scalar reduction), the gradient is
accumulated during forward (three matrix products, like ``X X^T`` and its
backward: the floor); without them (``reduction='none'``) forward keeps
per-row thresholds and normalisers and backward recomputes each block (four
products).  Extra memory is ``O(chunk x M)`` plus ``O(B x D)``.  Each
``log(1 + sum exp)`` is evaluated as a log-sum-exp that includes the 1
(``m = max(0, max z)``), so ``beta = 50`` or far larger cannot overflow.

Inputs are *prepared* (normalised for cosine); no host synchronisation
except the positive list (``torch.nonzero``, a data-dependent shape).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from losskit.distances import default_chunk_size

__all__ = ["MS_BLOCK_ELEMENTS", "OFFICIAL_SELF_THRESHOLD", "MSConfig", "MultiSimilarityFunction",
           "ms_block_loss_and_grad", "multi_similarity_rows", "compute_dtype"]

#: the official code drops positives with S >= 1 - 1e-5 (it has no self index)
OFFICIAL_SELF_THRESHOLD = 1.0 - 1e-5


class MSConfig(NamedTuple):
    """The Multi-Similarity hyperparameters a block needs (see the loss)."""

    alpha: float
    beta: float
    lam: float
    epsilon: float
    mining: bool
    official: bool
    chunk: int | None


#: values per block of the similarity matrix when no chunk size is given (16 MiB
#: in float32): few enough blocks that per-operation overheads (thread
#: start-up, synchronisation) stay small, and a fixed ~60 MiB of buffers
MS_BLOCK_ELEMENTS = 1 << 22


class _Workspace:
    """Block-sized buffers reused across blocks, so that no block allocates
    (and, with glibc's defaults, maps and faults in) fresh ``c x M`` memory."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.cols, self.dtype, self.device = rows, cols, dtype, device
        self.bufs: dict[str, Tensor] = {}

    def __call__(self, name: str, rows: int, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or self.dtype
        buf = self.bufs.get(name)
        if buf is None:
            buf = self.bufs[name] = torch.empty(self.rows, self.cols, dtype=dtype, device=self.device)
        return buf[:rows]


def _block_similarity(qb: Tensor, rc: Tensor, q_labels: Tensor, r_labels: Tensor, self_index: Tensor,
                      official: bool, ws: _Workspace | None = None) -> tuple[Tensor, Tensor]:
    """``(sim, same)`` for a block; the self pair (and, with ``official``, any
    positive with ``S >= 1 - 1e-5``) gets ``sim = +inf`` so that it is neither
    a positive (every positive test is ``S < ...``) nor a negative (``same``)."""
    c = qb.shape[0]
    if ws is None:
        sim = qb @ rc.T
        same = q_labels.unsqueeze(1) == r_labels.unsqueeze(0)
    else:
        sim = torch.mm(qb, rc.T, out=ws("sim", c))
        same = torch.eq(q_labels.unsqueeze(1), r_labels.unsqueeze(0), out=ws("same", c, torch.bool))
    # self pairs -> +inf, written without a host sync (rows without a self column keep their value)
    rows = torch.arange(c, device=qb.device)
    cols = self_index.clamp_min(0)
    sim[rows, cols] = torch.where(self_index >= 0, sim.new_full((), float("inf")), sim[rows, cols])
    if official:
        sim.masked_fill_(same & (sim >= OFFICIAL_SELF_THRESHOLD), float("inf"))
    return sim, same


def ms_block_loss_and_grad(sim: Tensor, same: Tensor, alpha: float, beta: float, lam: float,
                           epsilon: float, mining: bool, stats=None, row_scale: Tensor | None = None,
                           want_grad: bool = True, ws: _Workspace | None = None):
    """Per-row loss and ``row_scale_i * dl_i/dS_ij`` for a block from ``_block_similarity``.

    Returns ``(loss [c], grad [c, M] or None, stats)``; ``stats`` =
    ``(min_pos, max_neg, L_pos, L_neg)`` lets backward rebuild the same mined
    sets and weights without the row sums.  ``L = log(1 + sum exp z)`` uses
    the shift ``m = max(0, max z)``; the largest ``z`` of each side comes
    from the thresholds (the smallest positive and the largest negative are
    always mined when anything is), so no extra pass is needed.
    """
    c = sim.shape[0]
    if ws is None:
        ws = _Workspace(c, sim.shape[1], sim.dtype, sim.device)
    inf = float("inf")
    # Positives are few (K - 1 per row with K samples per class): keep them as
    # a sparse list (row, column, similarity); self pairs there have S = +inf.
    pr, pc = torch.nonzero(same, as_tuple=True)
    ps = sim[pr, pc]
    if stats is None:
        min_pos = sim.new_full((c,), inf).scatter_reduce_(0, pr, ps, "amin")
        max_neg = torch.where(same, sim.new_full((), -inf), sim, out=ws("tmp", c)).amax(1)
    else:
        min_pos, max_neg = stats[0], stats[1]
    mn = ws("mn", c, torch.bool)
    if mining:
        keep_p = ps < (max_neg + epsilon)[pr]
        # bool a > b is a & ~b: S above the threshold and not the same label
        torch.gt(sim, (min_pos - epsilon).unsqueeze(1), out=mn).gt_(same)
    else:
        keep_p = ps < inf
        torch.logical_not(same, out=mn)
    m_p = (-alpha * (min_pos - lam)).clamp_min(0)
    m_n = (beta * (max_neg - lam)).clamp_min(0)
    zero = sim.new_zeros(())
    e_p = torch.where(keep_p, torch.exp((ps - lam) * (-alpha) - m_p[pr]), zero)
    e_n = torch.add((-beta * lam - m_n).unsqueeze(1), sim, alpha=beta, out=ws("e_n", c)).exp_()
    e_n = torch.where(mn, e_n, zero, out=e_n)
    if stats is None:
        L_p = m_p + torch.log(torch.exp(-m_p) + sim.new_zeros(c).index_add_(0, pr, e_p))
        L_n = m_n + torch.log(torch.exp(-m_n) + e_n.sum(1))
    else:
        L_p, L_n = stats[2], stats[3]
    loss = L_p / alpha + L_n / beta
    grad = None
    if want_grad:
        # dl/dS = exp(z_n - L_n) - exp(z_p - L_p) = e_n exp(m_n - L_n) - e_p exp(m_p - L_p)
        a = torch.exp(m_n - L_n)
        b = torch.exp(m_p - L_p)
        if row_scale is not None:
            a = a * row_scale
            b = b * row_scale
        grad = e_n.mul_(a.unsqueeze(1))
        grad.index_put_((pr, pc), -(e_p * b[pr]))  # positives are never negatives: those entries were 0
    return loss, grad, (min_pos, max_neg, L_p, L_n)


def compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _grad_buffers(qc: Tensor, rc: Tensor, need_q: bool, need_r: bool, self_ref: bool):
    """Gradient accumulators; one shared buffer when the reference is the batch itself."""
    if self_ref:
        g = torch.zeros_like(qc) if need_q else None
        return g, g
    return (torch.zeros_like(qc) if need_q else None), (torch.zeros_like(rc) if need_r else None)


def _walk_blocks(qc: Tensor, rc: Tensor, q_labels: Tensor, r_labels: Tensor, self_index: Tensor, cfg: MSConfig,
                 gq: Tensor | None, gr: Tensor | None, *, row_scale: Tensor | None = None,
                 stats_in=None, stats_out=None, losses: Tensor | None = None, want_grad: bool = True) -> None:
    """Walk blocks of ``cfg.chunk`` anchor rows: per-row losses into ``losses``,
    thresholds/normalisers into ``stats_out`` (or taken from ``stats_in``),
    ``dL/dq`` into ``gq`` and ``dL/dr`` into ``gr`` (``gq is gr``: one buffer)."""
    B, M = qc.shape[0], rc.shape[0]
    step = cfg.chunk or default_chunk_size(B, M, MS_BLOCK_ELEMENTS)
    ws = _Workspace(min(step, B), M, qc.dtype, qc.device)
    for s in range(0, B, step):
        e = min(B, s + step)
        qb = qc[s:e]
        sim, same = _block_similarity(qb, rc, q_labels[s:e], r_labels, self_index[s:e], cfg.official, ws)
        loss, grad, st = ms_block_loss_and_grad(
            sim, same, cfg.alpha, cfg.beta, cfg.lam, cfg.epsilon, cfg.mining,
            stats=None if stats_in is None else tuple(t[s:e] for t in stats_in),
            row_scale=None if row_scale is None else row_scale[s:e], want_grad=want_grad, ws=ws)
        if losses is not None:
            losses[s:e] = loss
        if stats_out is not None:
            for dst, src in zip(stats_out, st):
                dst[s:e] = src
        if want_grad:
            if gq is not None and gq is gr:
                gq[s:e].addmm_(grad, rc)
            elif gq is not None:
                torch.mm(grad, rc, out=gq[s:e])
            if gr is not None:
                gr.addmm_(grad.T, qb)
        del sim, grad, same


class MultiSimilarityFunction(torch.autograd.Function):
    """Inputs: prepared anchors ``q`` [B, D] and references ``r`` [M, D]
    (``r``/``r_labels`` None: the batch itself), labels, ``self_index`` [B]
    (``-1``: none), ``coef`` and an :class:`MSConfig`.

    ``coef is None``: output the per-anchor loss [B] (backward recomputes).
    ``coef`` [B]: output ``sum_i coef_i l_i`` (gradients built in forward).
    """

    @staticmethod
    def forward(ctx, q, r, q_labels, r_labels, self_index, coef, cfg):
        self_ref = r is None
        out_dtype, cd = q.dtype, compute_dtype(q)
        with torch.autocast(q.device.type, enabled=False):
            qc = q.to(cd)
            rc, rl = (qc, q_labels) if self_ref else (r.to(cd), r_labels)
            need_q = ctx.needs_input_grad[0]
            need_r = need_q if self_ref else ctx.needs_input_grad[1]
            eager = coef is not None and (need_q or need_r)
            gq, gr = _grad_buffers(qc, rc, eager and need_q, eager and need_r, self_ref)
            losses = qc.new_empty(qc.shape[0])
            stats = [qc.new_empty(qc.shape[0]) for _ in range(4)] if coef is None else None
            _walk_blocks(qc, rc, q_labels, rl, self_index, cfg, gq, gr, row_scale=coef.to(cd) if eager else None,
                         stats_out=stats, losses=losses, want_grad=eager)
        ctx.cfg, ctx.eager, ctx.self_ref = cfg, coef is not None, self_ref
        if coef is not None:
            ctx.grads = (gq, None if self_ref else gr)
            return (losses * coef.to(cd)).sum().to(out_dtype)
        ctx.save_for_backward(q, r, q_labels, r_labels, self_index, *stats)
        return losses.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.eager:
            gq, gr = ctx.grads
            out_q = None if gq is None else gq * grad_out.to(gq.dtype)
            out_r = None if gr is None else gr * grad_out.to(gr.dtype)
            return out_q, out_r, None, None, None, None, None
        q, r, q_labels, r_labels, self_index, *stats = ctx.saved_tensors
        self_ref = ctx.self_ref
        cd = compute_dtype(q)
        with torch.autocast(q.device.type, enabled=False):
            qc = q.to(cd)
            rc, rl = (qc, q_labels) if self_ref else (r.to(cd), r_labels)
            need_q = ctx.needs_input_grad[0]
            need_r = need_q if self_ref else ctx.needs_input_grad[1]
            gq, gr = _grad_buffers(qc, rc, need_q, need_r, self_ref)
            _walk_blocks(qc, rc, q_labels, rl, self_index, ctx.cfg, gq, gr, row_scale=grad_out.to(cd),
                         stats_in=stats)
        return (None if gq is None else gq.to(q.dtype), None if self_ref or gr is None else gr.to(r.dtype),
                None, None, None, None, None)


def multi_similarity_rows(q: Tensor, r: Tensor | None, q_labels: Tensor, r_labels: Tensor | None,
                          self_index: Tensor, cfg: MSConfig, coef: Tensor | None = None) -> Tensor:
    """The per-anchor losses ``[B]`` (``coef is None``) or ``sum_i coef_i l_i``
    (``r``/``r_labels`` None: the anchors are their own reference)."""
    return MultiSimilarityFunction.apply(q, r, q_labels, r_labels, self_index, coef, cfg)
