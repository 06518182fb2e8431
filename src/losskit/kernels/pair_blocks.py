"""Row blocks for the pair losses (contrastive, triplet in every mining mode,
TCM): the autograd Function behind their large-batch path in
:mod:`losskit.functional.pair`.

The anchor-by-reference distance matrix is never held whole.
:class:`PairBlocksFunction` walks blocks of ``chunk`` anchor rows:

* forward (no autograd): ``mat_b = d(Q_b, R)`` (one matrix product), the
  loss's :class:`BlockRule` turns it into per-row sums of each term
  ``[T, c]`` and the term's pair counts (mined triplets, nonzero pairs);
* backward: each block is recomputed under autograd (one product), the rule
  builds ``G_b = dL/dmat_b`` ``[c, M]`` from the upstream per-row gradients,
  and ``torch.autograd.grad(mat_b, (Q_b, R), G_b)`` gives ``dQ_b`` and adds
  to ``dR`` (two products).

Four matrix products in all against the three of ``X X^T`` and its backward
(the floor); extra memory ``O(chunk x M)`` (a few block-sized temporaries)
plus ``O(B x D)`` for the gradients, never ``B x M``.  Mining decisions are
recomputed in backward from the same values with the same operations, so
forward and backward see the same pairs and triplets.

The pair shares (``B / N`` with the global pair count ``N``) are applied by
the caller to the per-row sums, outside the Function, so counts summed over
processes (torch.distributed) need nothing here.  Inputs are *prepared*
(normalised when the distance says so) and in the working dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit.distances import BaseDistance, default_chunk_size
from losskit.mining.pairs import block_pair_masks

__all__ = ["PAIR_BLOCK_ELEMENTS", "BlockRule", "ContrastiveRule", "TCMRule", "TripletRule",
           "PairBlocksFunction", "pair_block_sums"]

#: values per block of the distance matrix when no chunk size is given (16 MiB in float32)
PAIR_BLOCK_ELEMENTS = 1 << 22


class BlockRule:
    """One loss's block arithmetic.  ``terms``: how many per-row sums it returns.

    ``values(mat, pos, neg)`` -> ``(sums [terms, c], counts [terms])``;
    ``grad(mat, pos, neg, g [terms, c])`` -> ``dL/dmat [c, M]`` for the loss
    ``sum_t sum_i g[t, i] sums[t, i]``.  ``rows_per_block(M)``: anchor rows per
    block when no chunk size is given (a rule with ``[P, M]`` temporaries asks
    for fewer).
    """

    terms = 1

    def __init__(self, distance: BaseDistance):
        self.distance = distance
        # d margin(a, b) / da and / db: margin(a, b) = a - b for a distance, b - a for a similarity
        self.sa = -1.0 if distance.is_similarity else 1.0

    def rows_per_block(self, n_rows: int, n_cols: int) -> int:
        return default_chunk_size(n_rows, n_cols, PAIR_BLOCK_ELEMENTS)

    def values(self, mat: Tensor, pos: Tensor, neg: Tensor):
        raise NotImplementedError

    def grad(self, mat: Tensor, pos: Tensor, neg: Tensor, g: Tensor) -> Tensor:
        raise NotImplementedError


def _hinge(x: Tensor, smooth: bool) -> Tensor:
    return F.softplus(x) if smooth else F.relu(x)


def _hinge_grad(x: Tensor, smooth: bool) -> Tensor:
    return torch.sigmoid(x) if smooth else (x > 0).to(x.dtype)


class ContrastiveRule(BlockRule):
    """Sums ``sum_k [margin(d, pos_margin)]_+`` over positives and
    ``sum_k [margin(neg_margin, d)]_+`` over negatives (``1/2 [.]_+^2`` with
    ``squared_hinge``); counts: pairs with a nonzero loss, or all pairs."""

    terms = 2

    def __init__(self, distance, pos_margin, neg_margin, squared_hinge, nonzero):
        super().__init__(distance)
        self.pm, self.nm, self.sq, self.nonzero = pos_margin, neg_margin, squared_hinge, nonzero

    def _raw(self, mat, pos, neg):
        zp = F.relu(self.distance.margin(mat, self.pm)).mul_(pos)
        zn = F.relu(self.distance.margin(self.nm, mat)).mul_(neg)
        return zp, zn

    def values(self, mat, pos, neg):
        zp, zn = self._raw(mat, pos, neg)
        if self.nonzero:
            counts = torch.stack([(zp > 0).sum(), (zn > 0).sum()]).to(mat.dtype)
        else:
            counts = torch.stack([pos.sum(), neg.sum()]).to(mat.dtype)
        if self.sq:
            zp, zn = 0.5 * zp * zp, 0.5 * zn * zn
        return torch.stack([zp.sum(1), zn.sum(1)]), counts

    def grad(self, mat, pos, neg, g):
        zp, zn = self._raw(mat, pos, neg)
        if self.sq:  # d/dmat 1/2 z^2 = z dz/dmat
            gp, gn = zp, zn
        else:
            gp, gn = (zp > 0).to(mat.dtype), (zn > 0).to(mat.dtype)
        # dz_p/dmat = +sa, dz_n/dmat = -sa (on their support)
        return gp.mul_((self.sa * g[0]).unsqueeze(1)).add_(gn.mul_((-self.sa * g[1]).unsqueeze(1)))


class TCMRule(BlockRule):
    """TCM on cosine similarities: ``sum (m+ - S) 1[S <= m+]`` over positives
    and ``sum (S - m-) 1[S >= m-]`` over negatives; counts: selected pairs."""

    terms = 2

    def __init__(self, distance, margin_plus, margin_minus):
        super().__init__(distance)
        self.mp, self.mm = margin_plus, margin_minus

    def values(self, mat, pos, neg):
        sel_p = pos & (mat <= self.mp)
        sel_n = neg & (mat >= self.mm)
        sums = torch.stack([((self.mp - mat) * sel_p).sum(1), ((mat - self.mm) * sel_n).sum(1)])
        return sums, torch.stack([sel_p.sum(), sel_n.sum()]).to(mat.dtype)

    def grad(self, mat, pos, neg, g):
        sel_p = (pos & (mat <= self.mp)).to(mat.dtype)
        sel_n = (neg & (mat >= self.mm)).to(mat.dtype)
        return sel_n.mul_(g[1].unsqueeze(1)).sub_(sel_p.mul_(g[0].unsqueeze(1)))


class TripletRule(BlockRule):
    """Triplet ``h(margin(d_ap, d_an) + margin)`` summed over each anchor's
    mined triplets (``h``: hinge or softplus); count: triplets with a nonzero
    loss, or all mined triplets.

    * ``hard``: one triplet per anchor (farthest positive, closest negative);
    * ``semi-hard``: per positive pair, the closest negative farther than the
      positive, else the farthest negative (a sort of each row's negatives and
      a binary search: ``O(c M log M)``, no ``[P, M]`` temporary);
    * ``all``: every (positive, negative) pair of the anchor, enumerated over
      slices of the block's positive pairs (``[slice, M]`` temporaries, slices
      of at most ``chunk`` pairs): time ``O(B P M)`` for ``P`` positives per
      row (memory stays ``O(chunk x M)``; the dense path holds ``[c, M, M]``
      boolean blocks instead).
    """

    def __init__(self, distance, margin, mining, smooth, nonzero):
        super().__init__(distance)
        self.m, self.mining, self.smooth, self.nonzero = margin, mining, smooth, nonzero

    def rows_per_block(self, n_rows, n_cols):
        return default_chunk_size(n_rows, n_cols, PAIR_BLOCK_ELEMENTS // (4 if self.mining == "semi-hard" else 1))

    def _far(self, mat):
        return -mat if self.distance.is_similarity else mat

    # -- mining: (row, positive column, negative column) of the block's triplets
    def _hard(self, mat, pos, neg):
        f = self._far(mat)
        inf = float("inf")
        p = f.masked_fill(~pos, -inf).argmax(1)
        n = f.masked_fill(~neg, inf).argmin(1)
        has = pos.any(1) & neg.any(1)
        return p, n, has

    def _semi(self, mat, pos, neg):
        f = self._far(mat)
        inf = float("inf")
        a, p = torch.nonzero(pos & neg.any(1, keepdim=True), as_tuple=True)
        if a.numel() == 0:
            return a, p, p.clone()
        vals, order = torch.sort(f.masked_fill(~neg, inf), dim=1, stable=True)
        n_neg = neg.sum(1)
        # per entry of the block: how many negatives of its row are not farther (sorted rows; +inf pads
        # the non-negatives); read at the positives: the first negative strictly farther than the positive
        j = torch.searchsorted(vals, f, right=True)[a, p]
        semi = j < n_neg[a]
        closest_semi = order[a, j.clamp(max=vals.shape[1] - 1)]
        farthest = f.masked_fill(~neg, -inf).argmax(1)[a]
        return a, p, torch.where(semi, closest_semi, farthest)

    def _all_slices(self, pos):
        """The block's positive pairs in slices of at most ``c`` (the block's rows):
        every ``[slice, M]`` temporary is at most block-sized."""
        a, p = torch.nonzero(pos, as_tuple=True)
        step = max(1, pos.shape[0])
        for s in range(0, a.numel(), step):
            yield a[s:s + step], p[s:s + step]

    def values(self, mat, pos, neg):
        c = mat.shape[0]
        sums = mat.new_zeros(1, c)
        if self.mining == "hard":
            p, n, has = self._hard(mat, pos, neg)
            v = self.distance.margin(mat.gather(1, p.unsqueeze(1)), mat.gather(1, n.unsqueeze(1))).squeeze(1)
            lt = _hinge(v + self.m, self.smooth) * has
            cnt = (lt > 0).sum() if self.nonzero else has.sum()
            return lt.unsqueeze(0), cnt.to(mat.dtype).reshape(1)
        if self.mining == "semi-hard":
            a, p, n = self._semi(mat, pos, neg)
            lt = _hinge(self.distance.margin(mat[a, p], mat[a, n]) + self.m, self.smooth)
            cnt = (lt > 0).sum() if self.nonzero else torch.full((), a.numel(), device=mat.device)
            sums[0].index_add_(0, a, lt)
            return sums, cnt.to(mat.dtype).reshape(1)
        cnt = mat.new_zeros(())
        has_neg = neg.any(1, keepdim=True)
        for a, p in self._all_slices(pos & has_neg):
            negs = neg[a]
            lt = _hinge(self.distance.margin(mat[a, p].unsqueeze(1), mat[a]) + self.m, self.smooth) * negs
            sums[0].index_add_(0, a, lt.sum(1))
            cnt = cnt + ((lt > 0) & negs).sum() if self.nonzero else cnt + negs.sum()
        return sums, cnt.reshape(1)

    def grad(self, mat, pos, neg, g):
        G = torch.zeros_like(mat)
        sa, g0 = self.sa, g[0]
        if self.mining == "hard":
            p, n, has = self._hard(mat, pos, neg)
            v = self.distance.margin(mat.gather(1, p.unsqueeze(1)), mat.gather(1, n.unsqueeze(1))).squeeze(1)
            w = _hinge_grad(v + self.m, self.smooth) * has * g0
            rows = torch.arange(mat.shape[0], device=mat.device)
            G.index_put_((rows, p), sa * w, accumulate=True)
            G.index_put_((rows, n), -sa * w, accumulate=True)
            return G
        if self.mining == "semi-hard":
            a, p, n = self._semi(mat, pos, neg)
            w = _hinge_grad(self.distance.margin(mat[a, p], mat[a, n]) + self.m, self.smooth) * g0[a]
            G.index_put_((a, p), sa * w, accumulate=True)
            G.index_put_((a, n), -sa * w, accumulate=True)
            return G
        has_neg = neg.any(1, keepdim=True)
        for a, p in self._all_slices(pos & has_neg):
            hg = _hinge_grad(self.distance.margin(mat[a, p].unsqueeze(1), mat[a]) + self.m, self.smooth)
            hg = hg.mul_(neg[a]).mul_(g0[a].unsqueeze(1))
            G.index_put_((a, p), sa * hg.sum(1), accumulate=True)
            G.index_add_(0, a, hg, alpha=-sa)
        return G


class PairBlocksFunction(torch.autograd.Function):
    """Inputs: prepared anchors ``q`` [B, D], references ``r`` [M, D] (None:
    the batch itself), labels, ``self_index`` [B] (``-1``: none), the rule,
    the distance and the chunk size (None: the rule's default).  Outputs the
    per-row sums ``[terms, B]`` and the pair counts ``[terms]`` (not
    differentiable)."""

    @staticmethod
    def forward(ctx, q, r, q_labels, r_labels, self_index, rule, chunk):
        self_ref = r is None
        rr, rl = (q, q_labels) if self_ref else (r, r_labels)
        B, M = q.shape[0], rr.shape[0]
        step = chunk or rule.rows_per_block(B, M)
        matrix = rule.distance._matrix
        sums = q.new_zeros(rule.terms, B)
        counts = q.new_zeros(rule.terms)
        with torch.no_grad():
            for s in range(0, B, step):
                e = min(B, s + step)
                mat = matrix(q[s:e], rr)
                pos, neg = block_pair_masks(q_labels[s:e], rl, self_index[s:e])
                blk, cnt = rule.values(mat, pos, neg)
                sums[:, s:e] = blk
                counts += cnt
                del mat, pos, neg, blk
        ctx.rule, ctx.step, ctx.self_ref = rule, step, self_ref
        ctx.save_for_backward(q, r, q_labels, r_labels, self_index)
        ctx.mark_non_differentiable(counts)
        return sums, counts

    @staticmethod
    def backward(ctx, g_sums, _g_counts):
        q, r, q_labels, r_labels, self_index = ctx.saved_tensors
        rule, step, self_ref = ctx.rule, ctx.step, ctx.self_ref
        rr, rl = (q, q_labels) if self_ref else (r, r_labels)
        need_q = ctx.needs_input_grad[0]
        need_r = need_q if self_ref else ctx.needs_input_grad[1]
        B = q.shape[0]
        gq = torch.zeros_like(q) if need_q else None
        gr = gq if self_ref else (torch.zeros_like(rr) if need_r else None)
        if g_sums is None or not (need_q or need_r):
            return gq, None if self_ref else gr, None, None, None, None, None
        g_sums = g_sums.to(q.dtype)
        matrix = rule.distance._matrix
        r_leaf = rr.detach().requires_grad_(need_r)
        for s in range(0, B, step):
            e = min(B, s + step)
            q_leaf = q[s:e].detach().requires_grad_(need_q)
            with torch.enable_grad():
                mat = matrix(q_leaf, r_leaf)
            pos, neg = block_pair_masks(q_labels[s:e], rl, self_index[s:e])
            G = rule.grad(mat.detach(), pos, neg, g_sums[:, s:e])
            inputs = [t for t, need in ((q_leaf, need_q), (r_leaf, need_r)) if need]
            grads = torch.autograd.grad(mat, inputs, G)
            k = 0
            if need_q:
                gq[s:e] += grads[0]
                k = 1
            if need_r:
                gr += grads[k]
            del mat, G, grads, pos, neg
        return gq, None if self_ref else gr, None, None, None, None, None


def pair_block_sums(q: Tensor, r: Tensor | None, q_labels: Tensor, r_labels: Tensor | None, self_index: Tensor,
                    rule: BlockRule, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """``(sums [terms, B], counts [terms])`` of ``rule`` over row blocks
    (``r``/``r_labels`` None: the anchors are their own reference)."""
    return PairBlocksFunction.apply(q, r, q_labels, r_labels, self_index, rule, chunk)
