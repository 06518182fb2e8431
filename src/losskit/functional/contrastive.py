"""Contrastive objectives on paired embeddings ``(a, b)``: row ``i`` of ``a``
(an image, say) and row ``i`` of ``b`` (its caption) are a positive pair, every
other row of the other side is a negative (docs/contrastive.md).

* :func:`info_nce_loss`: the symmetric CLIP loss (Radford et al. 2021,
  arXiv 2103.00020, the pseudocode of its Figure 3) and its one-sided form, dense or
  chunked (``kernels.info_nce``), optionally gathered over processes, with
  optional per-row hard negatives and per-negative margins (Cement);
* :func:`cement_margins`: the Cement margins ``gamma * c`` from concreteness
  scores; :func:`hard_negative_share`: each hard negative's share
  ``p_h / (1 - p_i)`` of the gradient that pushes negatives away.

Per row ``i`` with ``z_ij = s * <a_i, b_j>`` (``s = 1 / temperature``; ``a``
and ``b`` L2-normalised unless ``normalize=False``)::

    l_i = 1/2 (log sum_j exp z_ij + log sum_j exp z_ji) - z_ii     (symmetric)
    l_i = log sum_j exp z_ij - z_ii                                 (one-sided, a -> b)

so ``mean_i l_i`` is CLIP's ``(CE(logits, arange) + CE(logits^T, arange)) / 2``.
With hard negatives ``h_ik`` (``[B, H, D]``) and margins ``m_ik`` the a -> b
sum also runs over ``exp(s <a_i, h_ik> + m_ik)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit.core.checks import check_embeddings, check_finite, shape_str, tensor_checks_enabled
from losskit.core.reduction import reduce_loss
from losskit.core.checks import check_reduction, check_sample_weight
from losskit.kernels.constants import NORM_EPS
from losskit.kernels.info_nce import pair_lse, unit_rows

__all__ = ["info_nce_loss", "check_pair", "cement_margins", "hard_negative_share", "hard_negative_logits",
           "CONCRETENESS_RANGE", "lexicon_weights", "flops_regularizer", "lexlip_loss", "knn_adjacency",
           "propagated_adjacency", "soft_assignment", "target_distribution", "meta_nodes", "pamc_contrastive",
           "dense_block_contrastive", "pamc_objective"]

#: the scale of the Brysbaert et al. (2014) concreteness norms: 1 (abstract) to 5 (concrete)
CONCRETENESS_RANGE = (1.0, 5.0)


def check_pair(a, b, finite: bool = True) -> tuple[Tensor, Tensor]:
    """``a`` and ``b``: floating ``[B, D]`` tensors of the same shape, dtype and device, finite
    (``finite=False``: the caller checks it)."""
    check_embeddings(a, "a", finite=False)
    check_embeddings(b, "b", finite=False)
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"b: expected {a.shape[0]} rows, one positive per row of a ({shape_str(a)}), "
                         f"got {shape_str(b)}")
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"b: expected dimension {a.shape[1]} (a is {shape_str(a)}), got {shape_str(b)}")
    if b.device != a.device:
        raise ValueError(f"b: expected device {a.device} (a's device), got {b.device}")
    if finite:
        check_finite(a, "a")
        check_finite(b, "b")
    return a, b


def _check_scale(scale) -> Tensor | float:
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale: expected one value (a 0-dim tensor), got {shape_str(scale)}")
        scale = scale.reshape(())
        if tensor_checks_enabled() and not bool(torch.isfinite(scale.detach()) & (scale.detach() > 0)):
            raise ValueError(f"scale: expected a finite value > 0 (1 / temperature), got {float(scale)}")
        return scale
    s = float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale: expected a finite value > 0 (1 / temperature), got {scale}")
    return s


def _compute(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _lse(q: Tensor, k: Tensor, s, chunk_size: int | None, cols: bool, bounded: bool | None = False):
    """Row (and column) log-sum-exps of ``s q k^T`` (the kernel: even in one block it is faster
    than autograd through two dense log-sum-exps, benchmarks/info_nce.py)."""
    row, col = pair_lse(q, k, s, chunk_size, cols, bounded)
    return row, (col if cols else None)


def hard_negative_logits(a: Tensor, hard_negatives: Tensor, scale, margins: Tensor | None = None) -> Tensor:
    """``s <a_i, h_ik> + m_ik`` (``[B, H]``; inputs already normalised as the loss does)."""
    z = torch.einsum("bd,bhd->bh", a, hard_negatives) * scale
    return z if margins is None else z + margins.to(z.dtype)


def _check_hard(a: Tensor, hard_negatives, margins):
    if hard_negatives is None:
        if margins is not None:
            raise ValueError("hard_margins: given without hard_negatives")
        return None, None
    if not isinstance(hard_negatives, Tensor) or not hard_negatives.is_floating_point():
        raise TypeError(f"hard_negatives: expected a floating torch.Tensor [B, H, D], got "
                        f"{type(hard_negatives).__name__ if not isinstance(hard_negatives, Tensor) else hard_negatives.dtype}")
    B, D = a.shape
    if hard_negatives.dim() != 3 or hard_negatives.shape[0] != B or hard_negatives.shape[2] != D:
        raise ValueError(f"hard_negatives: expected shape [{B}, H, {D}] (H negatives per row of a), "
                         f"got {shape_str(hard_negatives)}")
    if hard_negatives.device != a.device:
        raise ValueError(f"hard_negatives: expected device {a.device}, got {hard_negatives.device}")
    check_finite(hard_negatives, "hard_negatives")
    if margins is not None:
        if not isinstance(margins, Tensor) or tuple(margins.shape) != tuple(hard_negatives.shape[:2]):
            raise ValueError(f"hard_margins: expected shape {list(hard_negatives.shape[:2])} (one per hard negative), "
                             f"got {shape_str(margins) if isinstance(margins, Tensor) else type(margins).__name__}")
        check_finite(margins, "hard_margins")
    return hard_negatives, margins


def info_nce_loss(a: Tensor, b: Tensor, scale: float | Tensor = 1 / 0.07, *, symmetric: bool = True,
                  normalize: bool = True, chunk_size: int | None = None, hard_negatives: Tensor | None = None,
                  hard_margins: Tensor | None = None, gather: bool = False, group=None,
                  reduction: str = "mean", sample_weight: Tensor | None = None) -> Tensor:
    """InfoNCE on paired rows (module doc).

    ``scale``: the logit scale ``1 / temperature`` (a float or a 0-dim tensor, which gets a gradient).
    ``chunk_size``: query rows per block of the kernel (``None``: blocks of about
    ``kernels.info_nce.BLOCK_ELEMENTS`` similarities, twice that with more than one intra-op
    thread: ``kernels.info_nce.auto_chunk``; the ``B x B`` matrix is held only when ``B`` is below
    the block's row count).
    ``gather``: under ``torch.distributed``, score the local rows against every rank's rows
    (gathered with gradient); each rank's ``'mean'`` is over its own rows (docs/design.md,
    "Distributed"), so two processes give one process's loss and gradients on the concatenated batch.
    """
    check_reduction(reduction)
    a, b = check_pair(a, b, finite=not normalize)   # normalised: the row norms tell (below)
    s = _check_scale(scale)
    h, m = _check_hard(a, hard_negatives, hard_margins)
    sample_weight = check_sample_weight(sample_weight, a.shape[0], a)
    out_dtype = a.dtype
    a_in, b_in = a, b
    a, b = _compute(a), _compute(b)
    if isinstance(s, Tensor):
        s = s.to(a.dtype)
    if normalize:
        # a row's norm is finite when its values are (or overflows: then the exact check decides)
        a, na = unit_rows(a, NORM_EPS)
        b, nb = unit_rows(b, NORM_EPS)
        if (tensor_checks_enabled() and a.numel() and a.device.type != "meta"
                and not bool(torch.isfinite(torch.cat([na, nb])).all())):
            check_finite(a_in, "a")
            check_finite(b_in, "b")
    pos = torch.linalg.vecdot(a, b) * s
    bounded = True if normalize else None   # unnormalised inputs: the bound is measured from the norms
    world = 1
    if gather:
        from losskit.distributed.collectives import all_gather_with_grad, gather_sizes, world as _world
        world = _world(group)[0]
    if world > 1:
        sizes = gather_sizes(a.shape[0], a.device, group)
        a_all = all_gather_with_grad(a, group, sizes)
        b_all = all_gather_with_grad(b, group, sizes)
        row, _ = _lse(a, b_all, s, chunk_size, cols=False, bounded=bounded)
        col = _lse(b, a_all, s, chunk_size, cols=False, bounded=bounded)[0] if symmetric else None
    else:
        row, col = _lse(a, b, s, chunk_size, cols=symmetric, bounded=bounded)
    if h is not None:
        hn = _compute(h)
        if normalize:
            hn = F.normalize(hn, dim=2, eps=NORM_EPS)
        zh = hard_negative_logits(a, hn.to(a.dtype), s, m)
        row = torch.logaddexp(row, torch.logsumexp(zh, dim=1))
    loss = (0.5 * (row + col) if symmetric else row) - pos
    return reduce_loss(loss.to(out_dtype), reduction, sample_weight, checked=True)


def cement_margins(concreteness: Tensor, gamma: float, *, score_range: tuple[float, float] = CONCRETENESS_RANGE,
                   name: str = "concreteness") -> Tensor:
    """Cement's per-negative margins ``gamma * c`` with ``c = (score - lo) / (hi - lo)`` in ``[0, 1]``:
    the concreteness of the word each hard negative changed, on the norms' scale (Brysbaert: 1-5).
    A score outside the scale is an error (a value check)."""
    if not isinstance(concreteness, Tensor) or not concreteness.is_floating_point():
        raise TypeError(f"{name}: expected a floating torch.Tensor of scores, got "
                        f"{type(concreteness).__name__ if not isinstance(concreteness, Tensor) else concreteness.dtype}")
    lo, hi = score_range
    check_finite(concreteness, name)
    if tensor_checks_enabled() and concreteness.numel():
        c = concreteness.detach()
        if bool((c < lo).any() | (c > hi).any()):
            bad = float(c[(c < lo) | (c > hi)][0])
            raise ValueError(f"{name}: expected scores on the norms' scale [{lo:g}, {hi:g}], got {bad:g}")
    return gamma * (concreteness - lo) / (hi - lo)


@torch.no_grad()
def hard_negative_share(a: Tensor, b: Tensor, hard_negatives: Tensor, scale: float | Tensor = 1 / 0.07, *,
                        hard_margins: Tensor | None = None, normalize: bool = True) -> Tensor:
    """The gradient-share diagnostic: for row ``i`` of the a -> b softmax ``p`` over the batch's
    captions and the row's hard negatives, ``dl_i/dz_ij = p_ij`` for a negative and ``p_ii - 1`` for the
    positive, so the push on the negatives is ``1 - p_ii`` in total and hard negative ``k`` takes
    ``p_ik / (1 - p_ii)`` of it.  Returns ``[B, H]`` (the share shrinks as the number of negatives grows).
    """
    a, b = check_pair(a, b)
    h, m = _check_hard(a, hard_negatives, hard_margins)
    a, b, h = _compute(a), _compute(b), _compute(h)
    s = _check_scale(scale)
    if normalize:
        a, b, h = (F.normalize(a, dim=1, eps=NORM_EPS), F.normalize(b, dim=1, eps=NORM_EPS),
                   F.normalize(h, dim=2, eps=NORM_EPS))
    z = torch.cat([(a @ b.t()) * s, hard_negative_logits(a, h, s, m)], dim=1)
    p = torch.softmax(z, dim=1)
    B = a.shape[0]
    p_pos = p[torch.arange(B), torch.arange(B)]
    return p[:, B:] / (1 - p_pos).clamp_min(torch.finfo(p.dtype).tiny)[:, None]


# ----------------------------------------------------------------------------- LexLIP

def lexicon_weights(logits: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """LexLIP's lexicon representation (Luo et al. 2023, arXiv 2302.02908; SPLADE's max
    pooling): ``w_v = log(1 + max_t ReLU(logits_tv))`` over the tokens (or patches) ``t`` of each
    row; ``logits`` ``[B, T, V]``, ``attention_mask`` ``[B, T]`` (0 for padding: not pooled)."""
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits: expected a floating [B, T, V] tensor (per-token vocabulary logits), got "
                         f"{shape_str(logits) if isinstance(logits, Tensor) else type(logits).__name__}")
    check_finite(logits, "logits")
    r = torch.relu(logits)
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"attention_mask: expected shape {list(logits.shape[:2])}, got "
                             f"{shape_str(attention_mask) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__}")
        r = r * attention_mask.to(r.dtype)[:, :, None]
    if r.shape[1] == 0:
        return r.sum(dim=1)
    return torch.log1p(r.amax(dim=1))


def flops_regularizer(weights: Tensor) -> Tensor:
    """The FLOPS regulariser (Paria et al. 2020, used by LexLIP): ``sum_v (mean_i |w_iv|)^2`` over a
    batch ``[B, V]`` -- the expected number of multiplications of a sparse dot product, smoothed."""
    check_embeddings(weights, "weights")
    if weights.shape[0] == 0:
        return weights.sum() * 0.0
    return weights.abs().mean(dim=0).pow(2).sum()


def lexlip_loss(a: Tensor, b: Tensor, scale: float | Tensor = 1 / 0.05, *, flops_weight: float = 0.002,
                chunk_size: int | None = None, gather: bool = False, group=None, reduction: str = "mean",
                sample_weight: Tensor | None = None) -> Tensor:
    """LexLIP's objective on lexicon vectors ``a`` (images) and ``b`` (texts), ``[B, V]``: symmetric
    InfoNCE on the L2-normalised vectors plus ``flops_weight * (FLOPS(a_hat) + FLOPS(b_hat))``.
    Per row, the batch's FLOPS term is added to every row's InfoNCE term, so ``'mean'`` is the
    paper's ``InfoNCE + lambda FLOPS`` (``'sum'`` counts it ``B`` times)."""
    check_reduction(reduction)
    a, b = check_pair(a, b)
    per_row = info_nce_loss(a, b, scale, normalize=True, chunk_size=chunk_size, gather=gather, group=group,
                            reduction="none")
    an, bn = F.normalize(_compute(a), dim=1, eps=NORM_EPS), F.normalize(_compute(b), dim=1, eps=NORM_EPS)
    reg = flops_weight * (flops_regularizer(an) + flops_regularizer(bn))
    sample_weight = check_sample_weight(sample_weight, a.shape[0], a)
    return reduce_loss(per_row + reg.to(per_row.dtype), reduction, sample_weight, checked=True)


# ----------------------------------------------------------------------------- PamC

def knn_adjacency(x: Tensor, k: int, *, chunk_size: int = 4096) -> Tensor:
    """The kNN graph of the rows of ``x`` by cosine similarity (self excluded), symmetrised
    (an edge if either end is among the other's ``k`` nearest), as a coalesced sparse ``[N, N]``
    0/1 matrix.  Rows are scored in blocks (``O(chunk x N)`` memory)."""
    check_embeddings(x, "x")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"x: a kNN graph needs at least 2 nodes, got {n}")
    if not (1 <= int(k) < n):
        raise ValueError(f"k: expected an integer in [1, {n - 1}] (neighbours per node), got {k}")
    xn = F.normalize(x.detach().float(), dim=1, eps=NORM_EPS)
    rows, cols = [], []
    for a in range(0, n, chunk_size):
        s = xn[a:a + chunk_size] @ xn.t()
        idx = torch.arange(a, min(a + chunk_size, n))
        s[idx - a, idx] = float("-inf")
        nb = s.topk(int(k), dim=1).indices
        rows.append(idx.repeat_interleave(int(k)))
        cols.append(nb.reshape(-1))
    r, c = torch.cat(rows), torch.cat(cols)
    ei = torch.cat([torch.stack([r, c]), torch.stack([c, r])], dim=1)
    vals = torch.ones(ei.shape[1])
    a = torch.sparse_coo_tensor(ei, vals, (n, n)).coalesce()
    return torch.sparse_coo_tensor(a.indices(), torch.ones_like(a.values()), (n, n)).coalesce()


def propagated_adjacency(adjacency: Tensor, order: int = 4, *, cumulative: bool = True) -> Tensor:
    """PamC's positive weights ``A~ = sum_{r=1..R} Ahat^r`` (``cumulative``: the influence of
    r-hop neighbours; the official code's ``--influence``), or ``Ahat^R``, with
    ``Ahat = D^-1 (A + I)`` the row-normalised adjacency with self-loops.  Sparse in, sparse out."""
    if not isinstance(adjacency, Tensor) or adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"adjacency: expected a square [N, N] (sparse) matrix, got "
                         f"{shape_str(adjacency) if isinstance(adjacency, Tensor) else type(adjacency).__name__}")
    order = int(order)
    if order < 1:
        raise ValueError(f"order: expected an integer >= 1 (hops), got {order}")
    n = adjacency.shape[0]
    if n == 0:
        raise ValueError("adjacency: the graph is empty (0 nodes)")
    a = adjacency.to_sparse() if not adjacency.is_sparse else adjacency
    a = a.coalesce().float()
    if a._nnz() == 0:
        raise ValueError("adjacency: the graph has no edges (an empty graph gives every node only itself)")
    eye = torch.sparse_coo_tensor(torch.arange(n).repeat(2, 1), torch.ones(n), (n, n))
    a = (a + eye).coalesce()
    deg = torch.zeros(n).index_add_(0, a.indices()[0], a.values())
    ahat = torch.sparse_coo_tensor(a.indices(), a.values() / deg[a.indices()[0]], (n, n)).coalesce()
    out, power = ahat, ahat
    for _ in range(order - 1):
        power = torch.sparse.mm(power, ahat).coalesce()
        out = (out + power).coalesce() if cumulative else power
    return out


def soft_assignment(z: Tensor, centers: Tensor, v: float = 1.0) -> Tensor:
    """Student-t soft assignments (DEC, used by PamC): ``q_ik ~ (1 + ||z_i - mu_k||^2 / v)^-((v+1)/2)``,
    rows summing to 1."""
    d2 = (z[:, None, :] - centers[None, :, :].to(z.dtype)).pow(2).sum(-1)
    q = (1.0 + d2 / v).pow(-(v + 1.0) / 2.0)
    return q / q.sum(dim=1, keepdim=True)


def target_distribution(q: Tensor) -> Tensor:
    """DEC's sharpened target ``p_ik = (q_ik^2 / f_k) / sum_k' (q_ik'^2 / f_k')``, ``f_k = sum_i q_ik``."""
    w = q.pow(2) / q.sum(dim=0).clamp_min(torch.finfo(q.dtype).tiny)
    return w / w.sum(dim=1, keepdim=True)


def meta_nodes(z: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """PamC's meta-nodes ``c_k = sum_{i: argmax_k q_i = k} z_i`` (hard assignments from the detached
    ``q``) and which clusters are non-empty ``[K]``.  No host synchronisation."""
    K = q.shape[1]
    hard = q.detach().argmax(dim=1)
    c = torch.zeros(K, z.shape[1], dtype=z.dtype, device=z.device).index_add(0, hard, z)
    counts = torch.zeros(K, dtype=z.dtype, device=z.device).index_add(0, hard, torch.ones_like(hard, dtype=z.dtype))
    return c, counts > 0


def _cos_edges(z: Tensor, adj: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    idx, w = adj.indices(), adj.values()
    zn = F.normalize(z, dim=1, eps=NORM_EPS)
    return idx, w.to(z.dtype), torch.linalg.vecdot(zn[idx[0]], zn[idx[1]])


def pamc_contrastive(z: Tensor, adjacency: Tensor, q: Tensor, tau: float = 0.5, *, official: bool = False) -> Tensor:
    """PamC's meta-node contrastive loss per node ``[N]`` (Kulatilleke et al. 2022, arXiv 2209.14067):

        l_i = -log sum_j A~_ij exp(tau cos(z_i, z_j)) + mean_k log sum_l exp(tau cos(c_k, c_l))

    (``tau`` multiplies, as in the paper and code), the positive sum over the sparse ``A~``
    (:func:`propagated_adjacency`) and the negatives over the ``K`` meta-nodes
    (:func:`meta_nodes`; empty clusters are left out of both the mean and the sums, where the official
    code divides by a zero norm).  ``official=True`` follows the code: cosines on the diagonal set to 0
    before exp (each sum keeps an ``e^0`` self term) and ``+1e-10`` inside both logs.  The second term is
    the same for every node, so ``mean_i l_i`` is the paper's loss."""
    idx, w, cos = _cos_edges(z, adjacency)
    if official:
        cos = torch.where(idx[0] == idx[1], torch.zeros_like(cos), cos)
    pos = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device).index_add(0, idx[0], w * torch.exp(tau * cos))
    c, live = meta_nodes(z, q)
    cn = F.normalize(c, dim=1, eps=NORM_EPS)
    cc = cn @ cn.t()
    if official:
        cc = cc * (1 - torch.eye(cc.shape[0], dtype=cc.dtype, device=cc.device))
    e = torch.exp(tau * cc) * live[None, :].to(cc.dtype)
    eps = 1e-10 if official else 0.0
    neg_k = torch.log(e.sum(dim=1) + eps)
    neg = (neg_k * live.to(cc.dtype)).sum() / live.sum().clamp_min(1).to(cc.dtype)
    return -torch.log(pos + eps) + neg


def dense_block_contrastive(z: Tensor, adjacency: Tensor, tau: float = 0.5, *, official: bool = False) -> Tensor:
    """The dense ``N x N`` version PamC approximates (Graph-MLP's neighbour contrast), per node:
    ``l_i = -log sum_j A~_ij exp(tau cos_ij) + log sum_j exp(tau cos_ij)`` (every node a negative)."""
    zn = F.normalize(z, dim=1, eps=NORM_EPS)
    cos = zn @ zn.t()
    if official:
        cos = cos * (1 - torch.eye(cos.shape[0], dtype=cos.dtype, device=cos.device))
    e = torch.exp(tau * cos)
    a = adjacency.to_dense().to(z.dtype) if adjacency.is_sparse else adjacency.to(z.dtype)
    eps = 1e-10 if official else 0.0
    return -torch.log((e * a).sum(dim=1) + eps) + torch.log(e.sum(dim=1) + eps)


def pamc_objective(z: Tensor, adjacency: Tensor, centers: Tensor, *, tau: float = 0.5, alpha: float = 2.0,
                   beta: float = 2.0, v: float = 1.0, official: bool = False, dense: bool = False,
                   target: Tensor | None = None, reduction: str = "mean",
                   sample_weight: Tensor | None = None) -> Tensor:
    """PamC's total loss per node: ``beta KL(p_i || q_i) + alpha l_i`` (the paper's total loss; ``p`` the
    detached target distribution of ``q``), ``'mean'`` over the nodes (the code's ``batchmean`` KL and
    mean contrast).  ``dense=True``: the ``N x N`` contrast instead of the meta-nodes.  ``target``: a
    given ``P`` ``[N, K]`` (the official code recomputes it from ``Q`` under no_grad once per epoch);
    by default the detached target of this call's ``Q`` (a stop-gradient, so the gradient is not the
    full derivative of the loss as a function of the embeddings)."""
    check_reduction(reduction)
    check_embeddings(z, "embeddings")
    n = z.shape[0]
    if not isinstance(adjacency, Tensor) or tuple(adjacency.shape) != (n, n):
        raise ValueError(f"adjacency: expected a [{n}, {n}] matrix (A~, from propagated_adjacency), got "
                         f"{shape_str(adjacency) if isinstance(adjacency, Tensor) else type(adjacency).__name__}")
    if adjacency.device != z.device:
        raise ValueError(f"adjacency: expected device {z.device}, got {adjacency.device}")
    sample_weight = check_sample_weight(sample_weight, n, z)
    out_dtype = z.dtype
    zc = _compute(z)
    if n == 0:
        return reduce_loss(zc.sum(dim=1).to(out_dtype) + centers.sum() * 0, reduction, sample_weight, checked=True)
    adj = adjacency.coalesce() if adjacency.is_sparse else adjacency.to_sparse().coalesce()
    if tensor_checks_enabled():
        vals = adj.values()
        if vals.numel() and not bool((torch.isfinite(vals) & (vals >= 0)).all()):
            raise ValueError("adjacency: expected finite, non-negative weights (A~ from propagated_adjacency)")
        row = torch.zeros(n, dtype=vals.dtype, device=vals.device).index_add_(0, adj.indices()[0], vals)
        empty = (row <= 0).nonzero()
        if empty.numel():
            raise ValueError(f"adjacency: node {int(empty[0, 0])} has no positive weight, so its positive sum is 0 "
                             "and its loss infinite (A~ needs self-loops: build it with propagated_adjacency)")
    q = soft_assignment(zc, centers.to(zc.dtype), v)
    if target is not None:
        if not isinstance(target, Tensor) or tuple(target.shape) != tuple(q.shape):
            raise ValueError(f"target: expected shape {list(q.shape)} (P, rows summing to 1), got "
                             f"{shape_str(target) if isinstance(target, Tensor) else type(target).__name__}")
        p = target.detach().to(q.dtype)
    else:
        p = target_distribution(q).detach()
    kl = (p * (torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)) - torch.log(q))).sum(dim=1)
    con = dense_block_contrastive(zc, adj, tau, official=official) if dense else \
        pamc_contrastive(zc, adj, q, tau, official=official)
    return reduce_loss((beta * kl + alpha * con).to(out_dtype), reduction, sample_weight, checked=True)
