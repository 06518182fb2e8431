"""Multi-Similarity loss (Wang et al., CVPR 2019, arXiv 1904.06627), memory-efficient.

Per anchor ``i`` with mined positives ``P~_i`` and negatives ``N~_i`` (eq. 3-4)::

    l_i = 1/alpha log(1 + sum_{k in P~_i} exp(-alpha (S_ik - lambda)))
        + 1/beta  log(1 + sum_{j in N~_i} exp( beta (S_ij - lambda)))

and the loss is ``1/m sum_i l_i`` over all ``m`` anchors (an anchor with
nothing mined contributes 0 and is still counted).

The similarity matrix is never held whole: a custom autograd Function
walks blocks of ``chunk_size`` anchor rows.  With ``reduction`` 'mean' or
'sum' the gradient is accumulated during forward (three matrix products,
like ``X X^T`` and its backward: the floor); with 'none' the forward keeps
per-row thresholds and normalisers and backward recomputes each block
(four products).  Extra memory is ``O(chunk_size x M)`` plus ``O(B x D)``.
Each ``log(1 + sum exp)`` is evaluated as a log-sum-exp that includes the
1 (``m = max(0, max z)``), so ``beta = 50`` or far larger cannot overflow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losskit._checks import check_embeddings, check_labels, check_reduction, check_sample_weight
from losskit.distances import BaseDistance, default_chunk_size, get_distance
from losskit.mining.multi_similarity import OFFICIAL_SELF_THRESHOLD
from losskit.mining.pairs import resolve_reference

__all__ = ["multi_similarity_loss", "ms_block_loss_and_grad"]


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


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


class _MultiSimilarityFn(torch.autograd.Function):
    """Inputs: prepared queries ``q`` [B, D] and references ``r`` [M, D].

    ``coef is None``: output the per-anchor loss [B] (backward recomputes).
    ``coef`` [B]: output ``sum_i coef_i l_i`` (gradients built in forward).
    """

    @staticmethod
    def forward(ctx, q, r, q_labels, r_labels, self_index, coef, cfg):
        alpha, beta, lam, epsilon, mining, official, chunk = cfg
        out_dtype = q.dtype
        cd = _compute_dtype(q)
        with torch.autocast(q.device.type, enabled=False):
            qc, rc = q.to(cd), r.to(cd)
            B, M = qc.shape[0], rc.shape[0]
            step = chunk or default_chunk_size(B, M, MS_BLOCK_ELEMENTS)
            need_q, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            eager = coef is not None and (need_q or need_r)
            gq = torch.zeros_like(qc) if eager and need_q else None
            gr = torch.zeros_like(rc) if eager and need_r else None
            losses = qc.new_empty(B)
            ws = _Workspace(min(step, B), M, cd, qc.device)
            stats = [qc.new_empty(B) for _ in range(4)] if coef is None else None
            for s in range(0, B, step):
                e = min(B, s + step)
                qb = qc[s:e]
                sim, same = _block_similarity(qb, rc, q_labels[s:e], r_labels, self_index[s:e], official, ws)
                loss, grad, st = ms_block_loss_and_grad(sim, same, alpha, beta, lam, epsilon, mining,
                                                        row_scale=coef[s:e].to(cd) if eager else None,
                                                        want_grad=eager, ws=ws)
                losses[s:e] = loss
                if stats is not None:
                    for dst, src in zip(stats, st):
                        dst[s:e] = src
                if eager:
                    if gq is not None:
                        torch.mm(grad, rc, out=gq[s:e])
                    if gr is not None:
                        gr.addmm_(grad.T, qb)
                del sim, grad, same
        ctx.cfg = cfg
        ctx.eager = coef is not None
        if coef is not None:
            ctx.grads = (gq, gr)
            return (losses * coef.to(cd)).sum().to(out_dtype)
        ctx.save_for_backward(q, r, q_labels, r_labels, self_index, *stats)
        return losses.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        alpha, beta, lam, epsilon, mining, official, chunk = ctx.cfg
        if ctx.eager:
            gq, gr = ctx.grads
            go = grad_out.to(gq.dtype if gq is not None else gr.dtype) if (gq is not None or gr is not None) else None
            out_q = (gq * go) if gq is not None else None
            out_r = (gr * go) if gr is not None else None
            return out_q, out_r, None, None, None, None, None
        q, r, q_labels, r_labels, self_index, min_pos, max_neg, Lp, Ln = ctx.saved_tensors
        cd = _compute_dtype(q)
        with torch.autocast(q.device.type, enabled=False):
            qc, rc = q.to(cd), r.to(cd)
            go = grad_out.to(cd)
            B, M = qc.shape[0], rc.shape[0]
            step = chunk or default_chunk_size(B, M, MS_BLOCK_ELEMENTS)
            gq = torch.zeros_like(qc) if ctx.needs_input_grad[0] else None
            gr = torch.zeros_like(rc) if ctx.needs_input_grad[1] else None
            ws = _Workspace(min(step, B), M, cd, qc.device)
            for s in range(0, B, step):
                e = min(B, s + step)
                qb = qc[s:e]
                sim, same = _block_similarity(qb, rc, q_labels[s:e], r_labels, self_index[s:e], official, ws)
                st = (min_pos[s:e], max_neg[s:e], Lp[s:e], Ln[s:e])
                _, grad, _ = ms_block_loss_and_grad(sim, same, alpha, beta, lam, epsilon, mining, stats=st,
                                                    row_scale=go[s:e], ws=ws)
                if gq is not None:
                    torch.mm(grad, rc, out=gq[s:e])
                if gr is not None:
                    gr.addmm_(grad.T, qb)
        return (gq.to(q.dtype) if gq is not None else None, gr.to(r.dtype) if gr is not None else None,
                None, None, None, None, None)


def multi_similarity_loss(
    embeddings: Tensor,
    labels: Tensor,
    alpha: float = 2.0,
    beta: float = 50.0,
    lam: float = 1.0,
    epsilon: float = 0.1,
    reduction: str = "mean",
    sample_weight: Tensor | None = None,
    *,
    distance: str | BaseDistance = "cosine",
    mining: bool = True,
    official_positive_filter: bool = False,
    chunk_size: int | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    self_index: Tensor | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Multi-Similarity loss with the paper's mining (``mining=True``) and pair weighting.

    ``lam`` is the paper's lambda (PML: ``base``; official code: ``thresh``).  ``ref_embeddings``/``ref_labels``: score
    the anchors against another set (a memory, other ranks); ``self_index``
    names each anchor's own column there.  ``batch_size``: the ``m`` of the
    mean (default: the number of anchors).  ``official_positive_filter``
    also drops positives with ``S >= 1 - 1e-5`` as the official code does.
    """
    check_embeddings(embeddings)
    check_labels(labels, embeddings.shape[0], device=embeddings.device)
    check_reduction(reduction)
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not v > 0:
            raise ValueError(f"{name}: expected a value > 0, got {v}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon: expected a value >= 0, got {epsilon}")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size: expected an integer >= 1 or None, got {chunk_size}")
    dist = get_distance(distance)
    if not dist.is_similarity:
        raise ValueError(f"distance: Multi-Similarity needs a similarity (cosine or dot), got {dist!r}")
    B = embeddings.shape[0]
    w = check_sample_weight(sample_weight, B, embeddings)
    ref, ref_labels, self_index = resolve_reference(embeddings, labels, ref_embeddings, ref_labels, self_index)
    if ref_embeddings is not None:
        check_embeddings(ref, "ref_embeddings")
    q = dist.prepare(embeddings)
    r = q if ref is embeddings else dist.prepare(ref)
    if B == 0 or r.shape[0] == 0:
        z = embeddings.sum() * 0 + (ref.sum() * 0 if ref is not embeddings else 0)
        return embeddings.new_zeros(0) + z if reduction == "none" else z
    cfg = (float(alpha), float(beta), float(lam), float(epsilon), bool(mining), bool(official_positive_filter),
           None if chunk_size is None else int(chunk_size))
    labels = labels.to(ref_labels.device)
    if reduction == "none":
        per = _MultiSimilarityFn.apply(q, r, labels, ref_labels, self_index, None, cfg)
        return per * w if w is not None else per
    denom = B if batch_size is None else batch_size
    coef = torch.ones(B, dtype=_compute_dtype(q), device=q.device) if w is None else w.to(_compute_dtype(q))
    if reduction == "mean":
        coef = coef / max(denom, 1)
    return _MultiSimilarityFn.apply(q, r, labels, ref_labels, self_index, coef, cfg)
