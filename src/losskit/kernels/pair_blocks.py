"""Row blocks for the pair losses (contrastive, triplet in every mining mode,
TCM): the autograd Function behind their large-batch path in
:mod:`losskit.functional.pair`.

The anchor-by-reference distance matrix is never held whole.
:class:`PairBlocksFunction` walks blocks of ``chunk`` anchor rows:

* forward (no autograd): ``mat_b = d(Q_b, R)`` (one matrix product), the
  loss's :class:`BlockRule` turns it into per-row sums of each term
  ``[T, c]`` and the term's pair counts (mined triplets, nonzero pairs);
* backward: each block is recomputed (one product), the rule builds
  ``G_b = dL/dmat_b`` ``[c, M]`` from the upstream per-row gradients, and
  ``dQ_b = G_b' R``, ``dR += G_b'^T Q_b`` (two products; ``G_b'`` is ``G_b``
  through the distance's element-wise derivative, plus row/column-sum terms
  for the Euclidean distances).

Four matrix products in all against the three of ``X X^T`` and its backward
(the floor); extra memory ``O(chunk x M)`` (a few block-sized temporaries)
plus ``O(B x D)`` for the gradients, never ``B x M``.  Mining decisions are
recomputed in backward from the same values with the same operations, so
forward and backward see the same pairs and triplets.  Triplets with hard or
semi-hard mining (at most one per row or per positive pair) are kept from
forward instead: backward needs only their rows, ``O(T x D)`` in slices, and
no block is recomputed (one product in all).

The pair shares (``B / N`` with the global pair count ``N``) are applied by
the caller to the per-row sums, outside the Function, so counts summed over
processes (torch.distributed) need nothing here.  The scalar reductions of
contrastive, TCM and triplet (every mining) first try :func:`listed_totals`
(the same-label pairs listed from the labels instead of masks; see the
section at the end of this file).  Inputs are *prepared*
(normalised when the distance says so) and in the working dtype.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit.distances import (BaseDistance, DotProductSimilarity, EuclideanDistance, SquaredEuclideanDistance,
                               default_chunk_size)

__all__ = ["PAIR_BLOCK_ELEMENTS", "BlockRule", "ContrastiveRule", "TCMRule", "TripletRule",
           "PairBlocksFunction", "PairTotalsFunction", "eager_capable", "pair_block_sums", "pair_block_totals"]

#: values per block of the distance matrix when no chunk size is given (4 MiB in float32: the
#: ten to twenty element-wise passes over each block then mostly hit the cache; 256 rows of a
#: 4096-row reference measured 1.2-1.3x faster than 1024 rows on the 2-core build machine)
PAIR_BLOCK_ELEMENTS = 1 << 20


def _block_elements() -> int:
    """Values per block: ``PAIR_BLOCK_ELEMENTS`` with one intra-op thread, four
    times that with more (fewer, longer operations: at B = 4096 with 2 threads,
    1024-row blocks measured 2.8x the floor against 4.1x for 256 rows)."""
    return PAIR_BLOCK_ELEMENTS if torch.get_num_threads() == 1 else 4 * PAIR_BLOCK_ELEMENTS


class BlockRule:
    """One loss's block arithmetic.  ``terms``: how many per-row sums it returns.

    ``values(mat, pos, neg)`` -> ``(sums [terms, c], counts [terms])``;
    ``grad(mat, pos, neg, g [terms, c])`` -> ``dL/dmat [c, M]`` for the loss
    ``sum_t sum_i g[t, i] sums[t, i]``.  ``rows_per_block(M)``: anchor rows per
    block when no chunk size is given.  ``sparse`` rules (triplets with one
    triplet per positive pair or per row) also hand forward's triplets to
    backward (``mined``), which then never recomputes a block.
    """

    terms = 1
    sparse = False
    #: run the rule's element-wise work with one intra-op thread (its many short
    #: gathers and scatters stall with more on a busy machine)
    single_threaded = False

    def __init__(self, distance: BaseDistance):
        self.distance = distance
        # d margin(a, b) / da and / db: margin(a, b) = a - b for a distance, b - a for a similarity
        self.sa = -1.0 if distance.is_similarity else 1.0

    def rows_per_block(self, n_rows: int, n_cols: int) -> int:
        return default_chunk_size(n_rows, n_cols, _block_elements())

    def values(self, mat: Tensor, pos: Tensor, neg: Tensor):
        raise NotImplementedError

    def grad(self, mat: Tensor, pos: Tensor, neg: Tensor, g: Tensor) -> Tensor:
        raise NotImplementedError


@contextlib.contextmanager
def _one_thread():
    """Scatter-adds (``index_add_``, ``index_put_(accumulate=True)``) on CPU run
    far slower with more than one intra-op thread on a busy machine (measured:
    a [768, 512] ``index_add_`` into [4096, 512] took 620 ms with 2 threads and
    9 ms with 1 on the 2-core build machine under load); they run with one
    thread, the matrix products keep the caller's count.  (The thread count is
    process-wide: another Python thread running torch meanwhile sees 1.)"""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _hinge(x: Tensor, smooth: bool) -> Tensor:
    return F.softplus(x) if smooth else F.relu(x)


def _hinge_grad(x: Tensor, smooth: bool) -> Tensor:
    return torch.sigmoid(x) if smooth else torch.where(x > 0, 1.0, 0.0).to(x.dtype)


def _count(t: Tensor) -> Tensor:
    return torch.count_nonzero(t)


class ContrastiveRule(BlockRule):
    """Sums ``sum_k [margin(d, pos_margin)]_+`` over positives and
    ``sum_k [margin(neg_margin, d)]_+`` over negatives (``1/2 [.]_+^2`` with
    ``squared_hinge``); counts: pairs with a nonzero loss, or all pairs."""

    terms = 2

    def __init__(self, distance, pos_margin, neg_margin, squared_hinge, nonzero):
        super().__init__(distance)
        self.pm, self.nm, self.sq, self.nonzero = pos_margin, neg_margin, squared_hinge, nonzero

    def _raw(self, mat, pos, neg):
        zero = mat.new_zeros(())
        zp = torch.where(pos, self.distance.margin(mat, self.pm), zero).relu_()
        zn = torch.where(neg, self.distance.margin(self.nm, mat), zero).relu_()
        return zp, zn

    def values(self, mat, pos, neg):
        zp, zn = self._raw(mat, pos, neg)
        if self.nonzero:
            counts = torch.stack([_count(zp), _count(zn)]).to(mat.dtype)
        else:
            counts = torch.stack([_count(pos), _count(neg)]).to(mat.dtype)
        if self.sq:
            zp, zn = zp.square_().mul_(0.5), zn.square_().mul_(0.5)
        return torch.stack([zp.sum(1), zn.sum(1)]), counts

    def grad(self, mat, pos, neg, g):
        zp, zn = self._raw(mat, pos, neg)
        # dz_p/dmat = +sa, dz_n/dmat = -sa on their support; d 1/2 z^2 = z dz
        a = (self.sa * g[0]).unsqueeze(1)
        b = (-self.sa * g[1]).unsqueeze(1)
        if self.sq:
            return zp.mul_(a).add_(zn.mul_(b))
        zero = mat.new_zeros(())
        return torch.where(zp > 0, a, torch.where(zn > 0, b, zero))


    def eager(self, mat, pos, neg, coef):
        """Sums, counts and the gradient parts for the loss ``sum_t sum_i coef_i sums[t, i]``:
        the positive term as a pair list (few per row), the negative term dense."""
        pr, pc = torch.nonzero(pos, as_tuple=True)
        dp = mat[pr, pc]
        zp = F.relu(self.distance.margin(dp, self.pm))
        zero = mat.new_zeros(())
        zn = torch.where(neg, self.distance.margin(self.nm, mat), zero).relu_()
        if self.nonzero:
            counts = torch.stack([_count(zp), _count(zn)]).to(mat.dtype)
        else:
            counts = torch.stack([torch.full((), pr.numel(), device=mat.device), _count(neg)]).to(mat.dtype)
        col = (-self.sa * coef).unsqueeze(1)
        if self.sq:
            wp = coef[pr] * self.sa * zp
            sp = 0.5 * zp * zp
            Gn = zn * col  # d 1/2 z^2 = z dz
            sn = zn.square_().mul_(0.5).sum(1)
        else:
            wp = coef[pr] * torch.where(zp > 0, self.sa, 0.0).to(mat.dtype)
            sp = zp
            sn = zn.sum(1)
            Gn = torch.where(zn > 0, col, zero)
        sums = torch.stack([mat.new_zeros(mat.shape[0]).index_add_(0, pr, sp), sn])
        return sums, counts, [("pairs", pr, pc, wp, dp), ("dense", Gn)]


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
        zero = mat.new_zeros(())
        sums = torch.stack([torch.where(sel_p, self.mp - mat, zero).sum(1),
                            torch.where(sel_n, mat - self.mm, zero).sum(1)])
        return sums, torch.stack([_count(sel_p), _count(sel_n)]).to(mat.dtype)

    def grad(self, mat, pos, neg, g):
        zero = mat.new_zeros(())
        G = torch.where(neg & (mat >= self.mm), g[1].unsqueeze(1), zero)
        return torch.where(pos & (mat <= self.mp), -g[0].unsqueeze(1), G)

    def eager(self, mat, pos, neg, coef):
        """As :meth:`ContrastiveRule.eager`: positives as a pair list, negatives dense."""
        pr, pc = torch.nonzero(pos, as_tuple=True)
        sp = mat[pr, pc]
        sel_p = sp <= self.mp
        sel_n = neg & (mat >= self.mm)
        zero = mat.new_zeros(())
        sums = torch.stack([mat.new_zeros(mat.shape[0]).index_add_(0, pr, torch.where(sel_p, self.mp - sp, zero)),
                            torch.where(sel_n, mat - self.mm, zero).sum(1)])
        counts = torch.stack([_count(sel_p), _count(sel_n)]).to(mat.dtype)
        wp = torch.where(sel_p, -coef[pr], zero)
        return sums, counts, [("pairs", pr, pc, wp, sp), ("dense", torch.where(sel_n, coef.unsqueeze(1), zero))]


class TripletRule(BlockRule):
    """Triplet ``h(margin(d_ap, d_an) + margin)`` summed over each anchor's
    mined triplets (``h``: hinge or softplus); count: triplets with a nonzero
    loss, or all mined triplets.

    * ``hard``: one triplet per anchor (farthest positive, closest negative);
    * ``semi-hard``: per positive pair, the closest negative farther than the
      positive, else the farthest negative (with at most 16 positives per row
      on average: one masked pass over the row per positive pair, in slices of
      ``c`` pairs; with more: a sort of each row's negatives and a binary
      search, ``O(c M log M)``);
    * ``all``: every (positive, negative) pair of the anchor, enumerated over
      slices of the block's positive pairs (``[slice, M]`` temporaries, slices
      of at most ``chunk`` pairs): time ``O(B P M)`` for ``P`` positives per
      row (memory stays ``O(chunk x M)``; the dense path holds ``[c, M, M]``
      boolean blocks instead).
    """

    def __init__(self, distance, margin, mining, smooth, nonzero):
        super().__init__(distance)
        self.m, self.mining, self.smooth, self.nonzero = margin, mining, smooth, nonzero
        # hard and semi-hard: a few triplets per row; forward keeps them (``mined``) and backward
        # needs only their rows (``O(T x D)``), no block recompute
        self.sparse = mining in ("hard", "semi-hard")
        self.single_threaded = mining == "semi-hard"
        self._last = None

    def mined(self, mat: Tensor, row_offset: int):
        """The triplets of the block just scored by :meth:`values`: ``(a, p, n, v)``
        with global anchor rows and ``v = margin(mat_ap, mat_an)`` (rows without a
        triplet dropped)."""
        a, p, n, has = self._last
        self._last = None
        if has is not None:
            a, p, n = a[has], p[has], n[has]
        v = self.distance.margin(mat[a, p], mat[a, n])
        return a + row_offset, p, n, v, mat[a, p], mat[a, n]

    def triplet_weights(self, v: Tensor, g_rows: Tensor) -> Tensor:
        """``dL/dv`` per triplet, ``g`` the upstream gradient of each triplet's anchor."""
        return _hinge_grad(v + self.m, self.smooth) * g_rows

    def rows_per_block(self, n_rows, n_cols):
        return default_chunk_size(n_rows, n_cols, _block_elements() // (4 if self.mining == "semi-hard" else 1))

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
        c, M = mat.shape
        farthest = f.masked_fill(~neg, -inf).argmax(1)
        if a.numel() <= 16 * c:
            # few positives per row: per positive pair, the closest negative farther than it, in
            # slices of at most c pairs ([slice, M] temporaries)
            n = torch.empty_like(p)
            for s in range(0, a.numel(), c):
                aa, pp = a[s:s + c], p[s:s + c]
                fa = f[aa]
                semi = neg[aa] & (fa > f[aa, pp].unsqueeze(1))
                closest = fa.masked_fill_(~semi, inf).argmin(1)
                n[s:s + c] = torch.where(semi.any(1), closest, farthest[aa])
            return a, p, n
        # many positives per row: sort each row's negatives once, binary-search every positive
        vals, order = torch.sort(f.masked_fill(~neg, inf), dim=1, stable=True)
        j = torch.searchsorted(vals, f, right=True)[a, p]  # +inf pads the non-negatives
        closest = order[a, j.clamp(max=M - 1)]
        return a, p, torch.where(j < neg.sum(1)[a], closest, farthest[a])

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
            self._last = (torch.arange(c, device=mat.device), p, n, has)
            return lt.unsqueeze(0), cnt.to(mat.dtype).reshape(1)
        if self.mining == "semi-hard":
            a, p, n = self._semi(mat, pos, neg)
            lt = _hinge(self.distance.margin(mat[a, p], mat[a, n]) + self.m, self.smooth)
            cnt = (lt > 0).sum() if self.nonzero else torch.full((), a.numel(), device=mat.device)
            sums[0].index_add_(0, a, lt)
            self._last = (a, p, n, None)
            return sums, cnt.to(mat.dtype).reshape(1)
        cnt = mat.new_zeros((), dtype=torch.long)
        has_neg = neg.any(1, keepdim=True)
        zero = mat.new_zeros(())
        for a, p in self._all_slices(pos & has_neg):
            negs = neg[a]
            v = self.distance.margin(mat[a, p].unsqueeze(1), mat[a]).add_(self.m)
            lt = torch.where(negs, _hinge(v, self.smooth), zero)
            sums[0].index_add_(0, a, lt.sum(1))
            cnt = cnt + (_count(lt) if self.nonzero else _count(negs))
        return sums, cnt.to(mat.dtype).reshape(1)

    def eager(self, mat, pos, neg, coef):
        """Sums, count and the gradient part for ``sum_i coef_i sums[0, i]``: the mined
        triplets as two pair lists (hard, semi-hard), or dense (all)."""
        if self.sparse:
            sums, counts = self.values(mat, pos, neg)
            a, p, n, v, d_ap, d_an = self.mined(mat, 0)
            w = self.triplet_weights(v, coef[a])
            return sums, counts, [("pairs", a, p, self.sa * w, d_ap), ("pairs", a, n, -self.sa * w, d_an)]
        sums = mat.new_zeros(1, mat.shape[0])
        G = torch.zeros_like(mat)
        cnt = mat.new_zeros((), dtype=torch.long)
        zero = mat.new_zeros(())
        sa = self.sa
        for a, p in self._all_slices(pos & neg.any(1, keepdim=True)):
            negs = neg[a]
            v = self.distance.margin(mat[a, p].unsqueeze(1), mat[a]).add_(self.m)
            lt = torch.where(negs, _hinge(v, self.smooth), zero)
            sums[0].index_add_(0, a, lt.sum(1))
            cnt = cnt + (_count(lt) if self.nonzero else _count(negs))
            if self.smooth:
                hg = torch.where(negs, v.sigmoid_(), zero).mul_(coef[a].unsqueeze(1))
            else:
                hg = torch.where(negs & (v > 0), coef[a].unsqueeze(1), zero)
            with _one_thread():
                G.index_put_((a, p), sa * hg.sum(1), accumulate=True)
                G.index_add_(0, a, hg, alpha=-sa)
        return sums, cnt.to(mat.dtype).reshape(1), [("dense", G)]

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
        zero = mat.new_zeros(())
        for a, p in self._all_slices(pos & has_neg):
            v = self.distance.margin(mat[a, p].unsqueeze(1), mat[a]).add_(self.m)
            if self.smooth:
                hg = torch.where(neg[a], v.sigmoid_(), zero).mul_(g0[a].unsqueeze(1))
            else:
                hg = torch.where(neg[a] & (v > 0), g0[a].unsqueeze(1), zero)
            with _one_thread():
                G.index_put_((a, p), sa * hg.sum(1), accumulate=True)
                G.index_add_(0, a, hg, alpha=-sa)
        return G


class _Metric:
    """The distance as an element-wise function of ``S = Q R^T`` (prepared rows),
    so blocks and their gradients are plain matrix products:

    * ``dot`` (dot product, cosine): ``mat = S``;
    * ``sq`` (squared Euclidean): ``mat = max(0, |q|^2 + |r|^2 - 2 S)``;
    * ``euclid``: ``sqrt`` of that, with a zero gradient at 0 (as ``_safe_sqrt``).

    Any other distance object (``kind None``) goes through its own
    ``_matrix`` under autograd, block by block.
    """

    def __init__(self, distance: BaseDistance):
        self.distance = distance
        if isinstance(distance, EuclideanDistance):
            self.kind = "euclid"
        elif isinstance(distance, SquaredEuclideanDistance):
            self.kind = "sq"
        elif isinstance(distance, DotProductSimilarity):
            self.kind = "dot"
        else:
            self.kind = None

    def norms(self, x: Tensor) -> Tensor | None:
        return None if self.kind in ("dot", None) else (x * x).sum(1)

    def block(self, qb: Tensor, r: Tensor, nq: Tensor | None, nr: Tensor | None) -> Tensor:
        if self.kind is None:
            return self.distance._matrix(qb, r)
        if self.kind == "dot":
            return torch.mm(qb, r.T)
        # |r|^2 - 2 q.r in one product, then + |q|^2
        mat = torch.addmm(nr.unsqueeze(0), qb, r.T, alpha=-2.0).add_(nq.unsqueeze(1)).clamp_min_(0.0)
        return mat.sqrt_() if self.kind == "euclid" else mat

    def backward_block(self, G: Tensor, mat: Tensor, qb: Tensor, r: Tensor, gq_b: Tensor | None,
                       gr: Tensor | None, col_acc: Tensor | None = None) -> None:
        """Add ``dL/dQ_b`` to ``gq_b`` and ``dL/dR`` to ``gr`` for ``G = dL/dmat`` (``G`` is
        overwritten).  For the Euclidean distances the ``r_j * sum_i G_ij`` part of
        ``dL/dR`` is left in ``col_acc`` ``[M]`` (added once by :meth:`finish_cols`)."""
        half = 1.0
        if self.kind == "euclid":  # d sqrt(e) / de = 1 / (2 d), 0 at d = 0 (the 1/2 goes into the products)
            G = torch.where(mat > 0, G.div_(mat), 0.0)
            half = 0.5
        if self.kind == "dot":
            if gq_b is not None:
                gq_b.addmm_(G, r)
            if gr is not None:
                gr.addmm_(G.T, qb)
            return
        # e_ij = |q_i|^2 + |r_j|^2 - 2 q_i.r_j: de/dq_i = 2 q_i - 2 r_j, de/dr_j = 2 r_j - 2 q_i
        if gq_b is not None:
            gq_b.addmm_(G, r, alpha=-2.0 * half).add_(qb * (2.0 * half * G.sum(1, keepdim=True)))
        if gr is not None:
            gr.addmm_(G.T, qb, alpha=-2.0 * half)
            col_acc.add_(G.sum(0), alpha=2.0 * half)

    def finish_cols(self, gr: Tensor | None, r: Tensor, col_acc: Tensor | None) -> None:
        """``gr += r * col_acc`` (the Euclidean distances' reference-norm term)."""
        if gr is not None and col_acc is not None and self.kind in ("sq", "euclid"):
            gr.add_(r * col_acc.unsqueeze(1))

    def col_buffer(self, r: Tensor) -> Tensor | None:
        return r.new_zeros(r.shape[0]) if self.kind in ("sq", "euclid") else None

    def backward_pairs(self, coef: Tensor, d: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``coef_t * d mat(x_t, y_t) / d x_t`` for paired rows (``d``: the pairs' values);
        the derivative with respect to ``y_t`` is its negative for the Euclidean
        distances and ``coef_t x_t`` for the dot product."""
        if self.kind == "dot":
            return coef.unsqueeze(1) * y
        if self.kind == "euclid":
            coef = torch.where(d > 0, coef / d.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(coef))
            return coef.unsqueeze(1) * (x - y)
        return (2.0 * coef).unsqueeze(1) * (x - y)


def block_pair_masks(q_labels: Tensor, r_labels: Tensor, self_index: Tensor) -> tuple[Tensor, Tensor]:
    """``(pos, neg)`` ``[c, M]`` as :func:`losskit.mining.pairs.block_pair_masks`: same
    label and not the anchor's own column / another label and not that column, in
    two passes and a scatter of ``c`` entries."""
    pos = q_labels.unsqueeze(1) == r_labels.unsqueeze(0)
    neg = ~pos
    rows = torch.arange(pos.shape[0], device=pos.device)
    has = self_index >= 0
    cols = self_index.clamp_min(0)
    # rows without a self column write back their own value at column 0
    pos[rows, cols] = pos[rows, cols] & ~has
    neg[rows, cols] = neg[rows, cols] & ~has
    return pos, neg


def _triplet_slices(T: int, D: int, elements: int):
    """Slices of the triplet list whose ``[slice, D]`` row gathers hold at most ``elements`` values."""
    step = max(1, elements // max(D, 1))
    for s in range(0, T, step):
        yield s, min(T, s + step)


def _no_autocast(fn):
    """Run a Function's forward/backward with autocast off (the blocks are in the
    inputs' working dtype: float32 for half inputs, as the dense path)."""
    import functools

    @functools.wraps(fn)
    def wrapped(ctx, *args):
        t = next((a for a in args if isinstance(a, Tensor)), None)
        with torch.autocast("cpu" if t is None else t.device.type, enabled=False):
            return fn(ctx, *args)

    return wrapped


class PairBlocksFunction(torch.autograd.Function):
    """Inputs: prepared anchors ``q`` [B, D], references ``r`` [M, D] (None:
    the batch itself), labels, ``self_index`` [B] (``-1``: none), the rule and
    the chunk size (None: the rule's default).  Outputs the per-row sums
    ``[terms, B]`` and the pair counts ``[terms]`` (not differentiable)."""

    @staticmethod
    @_no_autocast
    def forward(ctx, q, r, q_labels, r_labels, self_index, rule, chunk):
        self_ref = r is None
        rr, rl = (q, q_labels) if self_ref else (r, r_labels)
        B, M = q.shape[0], rr.shape[0]
        step = chunk or rule.rows_per_block(B, M)
        metric = _Metric(rule.distance)
        nq = metric.norms(q)
        nr = nq if self_ref else metric.norms(rr)
        sums = q.new_zeros(rule.terms, B)
        counts = q.new_zeros(rule.terms)
        sparse = rule.sparse and metric.kind is not None
        mined = []
        with torch.no_grad():
            for s in range(0, B, step):
                e = min(B, s + step)
                mat = metric.block(q[s:e], rr, None if nq is None else nq[s:e], nr)
                pos, neg = block_pair_masks(q_labels[s:e], rl, self_index[s:e])
                blk, cnt = rule.values(mat, pos, neg)
                sums[:, s:e] = blk
                counts += cnt
                if rule.sparse:
                    t = rule.mined(mat, s)
                    if sparse:
                        mined.append(t)
                del mat, pos, neg, blk
        ctx.rule, ctx.step, ctx.self_ref, ctx.metric, ctx.sparse = rule, step, self_ref, metric, sparse
        if sparse:
            a, p, n, v, d_ap, d_an = (torch.cat(x) for x in zip(*mined)) if mined else (None,) * 6
            ctx.save_for_backward(q, r, a, p, n, v, d_ap, d_an)
        else:
            ctx.save_for_backward(q, r, q_labels, r_labels, self_index, nq, None if self_ref else nr)
        ctx.mark_non_differentiable(counts)
        return sums, counts

    @staticmethod
    @_no_autocast
    def backward(ctx, g_sums, _g_counts):
        rule, step, self_ref, metric = ctx.rule, ctx.step, ctx.self_ref, ctx.metric
        need_q = ctx.needs_input_grad[0]
        need_r = need_q if self_ref else ctx.needs_input_grad[1]
        q, r = ctx.saved_tensors[:2]
        rr = q if self_ref else r
        gq = torch.zeros_like(q) if need_q else None
        gr = gq if self_ref else (torch.zeros_like(rr) if need_r else None)
        done = (gq, None if self_ref else gr, None, None, None, None, None)
        if g_sums is None or not (need_q or need_r):
            return done
        g_sums = g_sums.to(q.dtype)
        if ctx.sparse:
            _, _, a, p, n, v, d_ap, d_an = ctx.saved_tensors
            if a is None:
                return done
            D = q.shape[1]
            for s, e in _triplet_slices(a.numel(), D, step * rr.shape[0]):  # the block budget
                aa, pp, nn = a[s:e], p[s:e], n[s:e]
                w = rule.triplet_weights(v[s:e], g_sums[0, aa])
                qa = q[aa]
                for col, c, d in ((pp, rule.sa * w, d_ap[s:e]), (nn, -rule.sa * w, d_an[s:e])):
                    ry = rr[col]
                    dx = metric.backward_pairs(c, d, qa, ry)
                    with _one_thread():
                        if need_q:
                            gq.index_add_(0, aa, dx)
                        if need_r:
                            gr.index_add_(0, col, c.unsqueeze(1) * qa if metric.kind == "dot" else -dx)
            return done
        _, _, q_labels, r_labels, self_index, nq, nr = ctx.saved_tensors
        rl = q_labels if self_ref else r_labels
        nr = nq if self_ref else nr
        B = q.shape[0]
        if metric.kind is None:  # an unknown distance object: its own _matrix under autograd
            r_leaf = rr.detach().requires_grad_(need_r)
            for s in range(0, B, step):
                e = min(B, s + step)
                q_leaf = q[s:e].detach().requires_grad_(need_q)
                with torch.enable_grad():
                    mat = metric.block(q_leaf, r_leaf, None, None)
                pos, neg = block_pair_masks(q_labels[s:e], rl, self_index[s:e])
                G = rule.grad(mat.detach(), pos, neg, g_sums[:, s:e])
                inputs = [t for t, need in ((q_leaf, need_q), (r_leaf, need_r)) if need]
                grads = torch.autograd.grad(mat, inputs, G)
                if need_q:
                    gq[s:e] += grads[0]
                if need_r:
                    gr += grads[-1]
            return done
        col_acc = metric.col_buffer(rr) if need_r else None
        for s in range(0, B, step):
            e = min(B, s + step)
            qb = q[s:e]
            mat = metric.block(qb, rr, None if nq is None else nq[s:e], nr)
            pos, neg = block_pair_masks(q_labels[s:e], rl, self_index[s:e])
            G = rule.grad(mat, pos, neg, g_sums[:, s:e])
            del pos, neg
            # (self reference: gq is gr; the products read q, never the buffer)
            metric.backward_block(G, mat, qb, rr, gq[s:e] if need_q else None, gr if need_r else None, col_acc)
            del mat, G
        metric.finish_cols(gr if need_r else None, rr, col_acc)
        return done


class PairTotalsFunction(torch.autograd.Function):
    """The scalar reductions' path: ``totals[t] = sum_i coef_i sums[t, i]`` and the
    counts ``[terms]``, with every gradient built during forward (one pass over
    the blocks: the block product and, per term, ``dQ_b``/``dR`` from the dense
    part (two products) and the pair lists (row gathers) -- three products in
    all, the floor's count).  Backward only scales the stored gradients."""

    @staticmethod
    @_no_autocast
    def forward(ctx, q, r, q_labels, r_labels, self_index, coef, rule, chunk):
        self_ref = r is None
        rr, rl = (q, q_labels) if self_ref else (r, r_labels)
        B, M = q.shape[0], rr.shape[0]
        step = chunk or rule.rows_per_block(B, M)
        metric = _Metric(rule.distance)
        need_q = ctx.needs_input_grad[0]
        need_r = need_q if self_ref else ctx.needs_input_grad[1]
        if listed_capable(rule):
            listed = listed_totals(q, r, q_labels, r_labels, self_index, coef, rule, chunk, need_q, need_r)
            if listed is not None:
                totals, counts, gq, gr = listed
                ctx.grads = (gq, None if self_ref else gr)
                ctx.mark_non_differentiable(counts)
                return totals, counts
        nq = metric.norms(q)
        nr = nq if self_ref else metric.norms(rr)
        T = rule.terms
        gq = [torch.zeros_like(q) if need_q else None for _ in range(T)]
        gr = gq if self_ref else [torch.zeros_like(rr) if need_r else None for _ in range(T)]
        totals = q.new_zeros(T)
        counts = q.new_zeros(T)
        coef = coef.to(q.dtype)
        col_accs = [metric.col_buffer(rr) if need_r else None for _ in range(T)]
        with torch.no_grad():
            for s in range(0, B, step):
                e = min(B, s + step)
                qb = q[s:e]
                mat = metric.block(qb, rr, None if nq is None else nq[s:e], nr)
                pos, neg = block_pair_masks(q_labels[s:e], rl, self_index[s:e])
                with _one_thread() if rule.single_threaded else contextlib.nullcontext():
                    sums, cnt, parts = rule.eager(mat, pos, neg, coef[s:e])
                totals += (sums * coef[s:e]).sum(1)
                counts += cnt
                del pos, neg, sums
                if need_q or need_r:
                    for k, part in enumerate(parts):
                        term = k if T > 1 else 0
                        if part[0] == "dense":
                            # (self reference: gq is gr; the products read q, never the buffer)
                            metric.backward_block(part[1], mat, qb, rr, gq[term][s:e] if need_q else None,
                                                  gr[term] if need_r else None, col_accs[term])
                        else:
                            _, rows, cols, w, d = part
                            _pair_grads(metric, q, rr, rows + s, cols, w, d, gq[term] if need_q else None,
                                        gr[term] if need_r else None, step * M)
                del mat, parts
            for t in range(T):
                metric.finish_cols(gr[t] if need_r else None, rr, col_accs[t])
        ctx.grads = (gq, None if self_ref else gr)
        ctx.mark_non_differentiable(counts)
        return totals, counts

    @staticmethod
    def backward(ctx, g_totals, _g_counts):
        gq, gr = ctx.grads
        out_q = out_r = None
        if g_totals is not None:
            g = g_totals
            if gq[0] is not None:
                out_q = sum(gq[t] * g[t].to(gq[t].dtype) for t in range(len(gq)))
            if gr is not None and gr[0] is not None:
                out_r = sum(gr[t] * g[t].to(gr[t].dtype) for t in range(len(gr)))
        return out_q, out_r, None, None, None, None, None, None


def _pair_grads(metric: _Metric, q: Tensor, r: Tensor, rows: Tensor, cols: Tensor, w: Tensor, d: Tensor,
                gq: Tensor | None, gr: Tensor | None, elements: int) -> None:
    """Add ``w_t d mat(q_rows_t, r_cols_t) / d(q, r)`` for a pair list, in slices of
    at most ``elements`` gathered values."""
    for s, e in _triplet_slices(rows.numel(), q.shape[1], elements):
        rw, cl, ww = rows[s:e], cols[s:e], w[s:e]
        qa, ry = q[rw], r[cl]
        dx = metric.backward_pairs(ww, d[s:e], qa, ry)
        with _one_thread():
            if gq is not None:
                gq.index_add_(0, rw, dx)
            if gr is not None:
                gr.index_add_(0, cl, ww.unsqueeze(1) * qa if metric.kind == "dot" else -dx)


def eager_capable(rule: BlockRule) -> bool:
    """Whether :func:`pair_block_totals` can run ``rule`` (its distance is one of
    the four built-in ones; another distance object takes the recomputing path)."""
    return hasattr(rule, "eager") and _Metric(rule.distance).kind is not None


def pair_block_totals(q: Tensor, r: Tensor | None, q_labels: Tensor, r_labels: Tensor | None, self_index: Tensor,
                      coef: Tensor, rule: BlockRule, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """``(totals [terms], counts [terms])``: ``totals[t] = sum_i coef_i sums[t, i]``
    with the gradients built in forward (``coef`` from ``core.reduction.row_coefficients``)."""
    return PairTotalsFunction.apply(q, r, q_labels, r_labels, self_index, coef, rule, chunk)


def pair_block_sums(q: Tensor, r: Tensor | None, q_labels: Tensor, r_labels: Tensor | None, self_index: Tensor,
                    rule: BlockRule, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """``(sums [terms, B], counts [terms])`` of ``rule`` over row blocks
    (``r``/``r_labels`` None: the anchors are their own reference)."""
    return PairBlocksFunction.apply(q, r, q_labels, r_labels, self_index, rule, chunk)


# ---------------------------------------------------------------- the listed-pairs path
#
# The scalar reductions of contrastive, TCM and triplet (hard, semi-hard, all) take this path when the
# same-label pairs are few (at most ``rows per block`` per anchor on average, so their lists stay
# ``O(B x chunk)``): the pairs are listed once from the labels (a sort and two binary searches, no
# ``B x M`` mask), every block is scored as if all its columns were negatives, and the listed
# positions (positives, the anchor's own column) are overwritten in the block before it is summed
# or mined (a scatter of a few values per row).  The element-wise work per block is then a handful
# of in-place passes over one preallocated buffer, and the gradient's dense part goes into two
# accumulators by matrix products whose extra column carries the row / column sums the Euclidean
# distances need.  The positives' (and the mined triplets') gradients are built once, after the
# blocks, from their pair lists.


def same_label_pairs(q_labels: Tensor, r_labels: Tensor, self_index: Tensor):
    """Every (anchor row, reference column) with the same label, rows ascending:
    ``(rows, cols, is_self)``; and the anchors' own columns whose label differs
    (``(xrows, xcols)``, excluded like a positive but not one)."""
    dev = q_labels.device
    order = torch.argsort(r_labels, stable=True)
    sl = r_labels[order].contiguous()
    ql = q_labels.to(sl.dtype).contiguous()
    lo = torch.searchsorted(sl, ql)
    k = torch.searchsorted(sl, ql, right=True) - lo
    rows = torch.repeat_interleave(k)
    start = torch.cumsum(k, 0) - k
    rank = torch.arange(rows.numel(), device=dev) - start[rows]
    cols = order[lo[rows] + rank]
    is_self = cols == self_index[rows]
    has = self_index >= 0
    differ = has & (r_labels[self_index.clamp_min(0)] != q_labels)
    xrows = torch.nonzero(differ).squeeze(1)
    return rows, cols, is_self, xrows, self_index[xrows]


def _rank_in_row(rows: Tensor, n_rows: int) -> Tensor:
    """Each entry's rank among the entries of its row (``rows`` ascending)."""
    k = torch.bincount(rows, minlength=n_rows)
    start = torch.cumsum(k, 0) - k
    return torch.arange(rows.numel(), device=rows.device) - start[rows]


def _in_rows(rows: Tensor, s: int, e: int) -> Tensor:
    return torch.nonzero((rows >= s) & (rows < e)).squeeze(1)


class _Operands:
    """Augmented operands: ``X = qf_b rf^T`` is the block's raw value (``S`` for the
    dot product -- ``-S`` with ``far`` --, ``E = |q|^2 + |r|^2 - 2 S`` for the
    Euclidean distances, in one product), and ``U R1`` / ``U^T Q1`` carry the
    row / column sums of a block gradient ``U`` in their last column."""

    def __init__(self, kind: str, q: Tensor, rr: Tensor, self_ref: bool, far: bool = False):
        self.kind, self.q, self.rr, self.far = kind, q, rr, far
        self.D = q.shape[1]
        if kind == "dot":
            self.qf, self.rf = q, (-rr if far else rr)
            self.R1, self.Q1 = rr, q
        else:
            one_q = q.new_ones(q.shape[0], 1)
            one_r = one_q if self_ref else rr.new_ones(rr.shape[0], 1)
            nq = (q * q).sum(1, keepdim=True)
            nr = nq if self_ref else (rr * rr).sum(1, keepdim=True)
            self.qf = torch.cat([q, nq, one_q], 1)
            self.rf = torch.cat([-2.0 * rr, one_r, nr], 1)
            self.R1 = torch.cat([rr, one_r], 1)
            self.Q1 = torch.cat([q, one_q], 1)

    def block(self, s: int, e: int, out: Tensor) -> Tensor:
        return torch.mm(self.qf[s:e], self.rf.T, out=out)

    def accumulate(self, U: Tensor, s: int, e: int, coef_b: Tensor, A1: Tensor | None, A2: Tensor | None) -> None:
        """``A1[s:e] = coef_b (U R1)`` and ``A2 += U^T (coef_b Q1_b)``."""
        cb = coef_b.unsqueeze(1)
        if A1 is not None:
            torch.mm(U, self.R1, out=A1[s:e]).mul_(cb)
        if A2 is not None:
            A2.addmm_(U.T, self.Q1[s:e] * cb)

    def finish(self, A1: Tensor | None, A2: Tensor | None, scale: float):
        """``(dL/dq, dL/dr)`` from the accumulators for ``dL/dX = scale * coef * U``."""
        if self.kind == "dot":
            sgn = -scale if self.far else scale
            return (None if A1 is None else A1.mul_(sgn)), (None if A2 is None else A2.mul_(sgn))
        D = self.D
        # dE/dq_i = 2 q_i - 2 r_j, dE/dr_j = 2 r_j - 2 q_i
        gq = None if A1 is None else (self.q * A1[:, D:] - A1[:, :D]).mul_(2.0 * scale)
        gr = None if A2 is None else (self.rr * A2[:, D:] - A2[:, :D]).mul_(2.0 * scale)
        return gq, gr

    def values(self, raw: Tensor) -> Tensor:
        """The distance (similarity) from raw block values (``-S`` when ``far``)."""
        if self.kind == "dot":
            return -raw if self.far else raw
        d = raw.clamp_min(0.0)
        return d.sqrt() if self.kind == "euclid" else d


def _const(x: Tensor, v: float) -> Tensor:
    """``v`` as a 0-dim tensor of ``x``'s dtype (one rounding, shared by a clamp and a subtraction)."""
    return torch.full((), v, dtype=x.dtype, device=x.device)


def _contrastive_negatives(rule, kind, X, Zb, Ub, br, bc):
    """The negative term of one block (every listed column excluded): ``(row sums, nonzero count,
    U, scale)`` with ``d sum / dX = scale * U``.  ``X``, ``Zb``, ``Ub`` are overwritten."""
    nm, sq = rule.nm, rule.sq
    zero = X.new_zeros(())
    if kind == "dot":  # z = [S - nm]_+, dz/dS = 1
        X.sub_(nm).index_put_((br, bc), zero).relu_()
        cnt = torch.count_nonzero(X)
        if sq:
            rows = torch.mul(X, X, out=Ub).sum(1).mul_(0.5)
            return rows, cnt, X, 1.0
        return X.sum(1), cnt, torch.sign(X, out=Ub), 1.0
    if kind == "sq":  # z = [nm - max(E, 0)]_+ = -Zn with Zn = min(max(E, 0), nm) - nm; dz/dE = -1
        t = _const(X, nm)
        X.clamp_(min=zero, max=t).sub_(t).index_put_((br, bc), zero)
        cnt = torch.count_nonzero(X)
        if sq:
            rows = torch.mul(X, X, out=Ub).sum(1).mul_(0.5)
            return rows, cnt, X, 1.0
        return X.sum(1).neg_(), cnt, torch.sign(X, out=Ub), 1.0
    # euclid: d = sqrt(min(max(E, 0), nm^2)) (nm exactly where not selected); Zn = d - nm;
    # dz/dE = -1 / (2 d) for 0 < d < nm, 0 at d = 0
    hi = _const(X, nm * nm)
    X.clamp_(min=zero, max=hi).sqrt_()
    torch.sub(X, hi.sqrt(), out=Zb).index_put_((br, bc), zero)
    cnt = torch.count_nonzero(Zb)
    if sq:
        rows = torch.mul(Zb, Zb, out=Ub).sum(1).mul_(0.5)
        torch.div(Zb, X, out=Ub)  # Zn / d; d (z^2 / 2) / dE = Zn / (2 d)
    else:
        rows = Zb.sum(1).neg_()
        torch.sign(Zb, out=Ub).div_(X)  # -1 / d
    return rows, cnt, Ub.nan_to_num_(0.0, 0.0, 0.0), 0.5


def _tcm_negatives(rule, X, Ub, br, bc):
    """TCM's negative term of one block: ``sum (S - m-) 1[S >= m-]``, dS = 1 on the selected."""
    X.sub_(rule.mm).index_put_((br, bc), X.new_full((), -1.0))
    torch.ge(X, 0.0, out=Ub)
    cnt = torch.count_nonzero(Ub)
    return X.relu_().sum(1), cnt, Ub, 1.0


def listed_capable(rule: BlockRule) -> bool:
    """Whether :func:`listed_totals` runs ``rule`` (built-in distance; contrastive, TCM,
    triplet with every mining, hinge or softplus)."""
    kind = _Metric(rule.distance).kind
    if kind is None:
        return False
    if isinstance(rule, (ContrastiveRule, TCMRule)):
        return True
    return isinstance(rule, TripletRule) and rule.mining in ("hard", "semi-hard", "all")


def _csr(rows: Tensor, cols: Tensor, vals: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """``[n_rows, n_cols]`` sparse CSR of a pair list (repeated pairs add up)."""
    order = torch.argsort(rows, stable=True)
    rows, cols, vals = rows[order], cols[order], vals[order]
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, vals, size=(n_rows, n_cols))


def _listed_grads(ops: _Operands, rows: Tensor, cols: Tensor, wx: Tensor, need_q: bool, need_r: bool):
    """``(dL/dq, dL/dr)`` of a pair list with ``dL/dX = wx`` per pair: two sparse-by-dense
    products (no gather of rows, no scatter-add)."""
    B, M = ops.q.shape[0], ops.rr.shape[0]
    A1 = torch.mm(_csr(rows, cols, wx, B, M), ops.R1) if need_q else None
    A2 = torch.mm(_csr(cols, rows, wx, M, B), ops.Q1) if need_r else None
    return ops.finish(A1, A2, 1.0)


def _d_raw(ops: _Operands, d: Tensor, w: Tensor) -> Tensor:
    """``dL/dX`` of pairs from ``dL/dd`` (``w``) and their distances (similarities) ``d``."""
    if ops.kind == "dot":
        return -w if ops.far else w
    if ops.kind == "euclid":  # dd/dE = 1 / (2 d), 0 at d = 0
        return torch.where(d > 0, w / (2.0 * d.clamp_min(torch.finfo(d.dtype).tiny)), d.new_zeros(()))
    return w


def _blocks_of(rows: Tensor, step: int, B: int, *others: Tensor):
    """Per row block, the entries of a row-ascending list (``rows`` and ``others`` split alike)."""
    bounds = torch.searchsorted(rows, torch.arange(step, B, step, device=rows.device)).cpu()
    return list(zip(*(torch.tensor_split(t, bounds) for t in (rows,) + others)))


def listed_totals(q, r, q_labels, r_labels, self_index, coef, rule, chunk, need_q, need_r):
    """The listed-pairs path of :class:`PairTotalsFunction`: ``(totals, counts, gq, gr)``
    (per-term gradient lists as there), or None when the same-label pairs are too many."""
    self_ref = r is None
    rr, rl = (q, q_labels) if self_ref else (r, r_labels)
    B, M = q.shape[0], rr.shape[0]
    step = chunk or rule.rows_per_block(B, M)
    rows, cols, is_self, xrows, xcols = same_label_pairs(q_labels, rl, self_index)
    if rows.numel() > step * max(B, 1):
        return None
    kind = _Metric(rule.distance).kind
    keep = ~is_self
    pr, pc = rows[keep], cols[keep]
    er, ec = torch.cat([rows, xrows]), torch.cat([cols, xcols])
    if xrows.numel():
        o = torch.argsort(er, stable=True)
        er, ec = er[o], ec[o]
    T = rule.terms
    coef = coef.to(q.dtype)
    triplet = isinstance(rule, TripletRule)
    far = triplet and rule.distance.is_similarity  # triplets mine on "far" values: -S
    ops = _Operands(kind, q, rr, self_ref, far=far)
    dense_term = not triplet and not (isinstance(rule, ContrastiveRule) and not rule.distance.is_similarity
                                      and rule.nm <= 0)  # [nm - d]_+ with nm <= 0 is 0
    c0 = min(step, max(B, 1))
    X = q.new_empty(c0, M)
    Zb = q.new_empty(c0, M) if (dense_term and kind == "euclid") else None
    Ub = q.new_empty(c0, M) if dense_term else None
    A1 = q.new_zeros(B, ops.R1.shape[1]) if (dense_term and need_q) else None
    A2 = rr.new_zeros(M, ops.Q1.shape[1]) if (dense_term and need_r) else None
    semi = triplet and rule.mining == "semi-hard"
    every = triplet and rule.mining == "all"
    if every:  # dense gradient of the negatives (as dense_term), U for dL/df_an / coef
        Y = q.new_empty(c0, M)
        Ub = q.new_empty(c0, M)
        A1 = q.new_zeros(B, ops.R1.shape[1]) if need_q else None
        A2 = rr.new_zeros(M, ops.Q1.shape[1]) if need_r else None
    pos_blocks = _blocks_of(pr, step, B, pc, *((_rank_in_row(pr, B),) if (semi or every) else ()))
    ex_blocks = _blocks_of(er, step, B, ec)
    pos_raw, trip, neg_sums, neg_counts = [], [], [], []
    with torch.no_grad():
        for b, s in enumerate(range(0, B, step)):
            e = min(B, s + step)
            c = e - s
            Xb = ops.block(s, e, X[:c])
            bpr, bpc = pos_blocks[b][0] - s, pos_blocks[b][1]
            raw_p = Xb[bpr, bpc]
            br, bc = ex_blocks[b][0] - s, ex_blocks[b][1]
            if not triplet:
                pos_raw.append(raw_p)
                if dense_term:
                    if isinstance(rule, TCMRule):
                        sums, cnt, U, _ = _tcm_negatives(rule, Xb, Ub[:c], br, bc)
                    else:
                        sums, cnt, U, _ = _contrastive_negatives(rule, kind, Xb, None if Zb is None else Zb[:c],
                                                                 Ub[:c], br, bc)
                    neg_sums.append(torch.dot(sums, coef[s:e]))
                    neg_counts.append(cnt)
                    ops.accumulate(U, s, e, coef[s:e], A1, A2)
                continue
            # triplets: far values (distances; -S for a similarity), clamped as the distance is
            if kind != "dot":
                Xb.clamp_min_(0.0)
                raw_p = raw_p.clamp_min_(0.0)
            if every:
                if kind == "euclid":  # far values are the distances themselves here
                    Xb.sqrt_()
                    raw_p = raw_p.sqrt_()
                sums, cnt, wp = _all_block(rule, Xb, Y[:c], Ub[:c], bpr, raw_p, pos_blocks[b][2], br, bc)
                U = Ub[:c]
                if kind == "euclid":  # df/dE = 1 / (2 d), 0 at d = 0 (the 1/2 in finish's scale)
                    U.div_(Xb).nan_to_num_(0.0, 0.0, 0.0)
                ops.accumulate(U, s, e, coef[s:e], A1, A2)
                neg_sums.append(torch.dot(sums, coef[s:e]))
                neg_counts.append(cnt)
                pos_raw.append(raw_p)
                trip.append(wp)
                continue
            # (semi-hard: its per-rank passes and reductions with indices stall with more than one
            # intra-op thread on a busy machine, as on the mask path -- ``single_threaded``)
            with _one_thread() if rule.single_threaded else contextlib.nullcontext():
                trip.append(_mine_block(rule, Xb, s, bpr, bpc, raw_p, br, bc, pos_blocks[b][2] if semi else None))
    totals = q.new_zeros(T)
    counts = q.new_zeros(T)
    zero = q.new_zeros(())
    if not triplet:
        d = ops.values(torch.cat(pos_raw) if pos_raw else q.new_zeros(0))
        cp = coef[pr]
        if isinstance(rule, TCMRule):
            sel = d <= rule.mp
            totals[0] = torch.dot(torch.where(sel, rule.mp - d, zero), cp)
            counts[0] = sel.sum()
            w = torch.where(sel, -cp, zero)
        else:
            z = F.relu(rule.distance.margin(d, rule.pm))
            if rule.sq:
                totals[0] = torch.dot(0.5 * z * z, cp)
                w = rule.sa * z * cp
            else:
                totals[0] = torch.dot(z, cp)
                w = torch.where(z > 0, rule.sa * cp, zero)
            counts[0] = torch.count_nonzero(z) if rule.nonzero else pr.numel()
        if dense_term:
            totals[1] = torch.stack(neg_sums).sum() if neg_sums else zero
        if isinstance(rule, TCMRule) or rule.nonzero:
            counts[1] = torch.stack(neg_counts).sum() if neg_counts else zero
        else:  # every negative pair: all pairs but the listed ones
            counts[1] = B * M - er.numel()
        # d sum / dX = scale * U (the Euclidean distance's U is -1/d or Zn/d: dd/dE = 1 / (2 d))
        scale = 0.5 if (kind == "euclid" and isinstance(rule, ContrastiveRule)) else 1.0
        gq_d, gr_d = ops.finish(A1, A2, scale) if dense_term else (None, None)
        g0q, g0r = _listed_grads(ops, pr, pc, _d_raw(ops, d, w), need_q, need_r)
        if need_q and gq_d is None:
            gq_d = torch.zeros_like(q)
        if need_r and gr_d is None:
            gr_d = torch.zeros_like(rr)
        if self_ref:
            return totals, counts, [g0q.add_(g0r), gq_d.add_(gr_d)] if need_q else [None, None], None
        return totals, counts, [g0q, gq_d], [g0r, gr_d]
    if every:
        return _all_finish(rule, ops, kind, q, rr, coef, pr, pc, er, pos_raw, trip, neg_sums, neg_counts,
                           A1, A2, self_ref, need_q, need_r)
    # triplets: one list for all blocks
    if trip:
        a, p, n, f_ap, f_an = (torch.cat(x) for x in zip(*trip))
    else:
        a = p = n = torch.zeros(0, dtype=torch.long, device=q.device)
        f_ap = f_an = q.new_zeros(0)
    d_ap, d_an = ops.values(f_ap), ops.values(f_an)  # (-S back to S for a similarity)
    v = rule.distance.margin(d_ap, d_an)
    lt = _hinge(v + rule.m, rule.smooth)
    cp = coef[a]
    totals[0] = torch.dot(lt, cp)
    counts[0] = (lt > 0).sum() if rule.nonzero else a.numel()
    w = rule.triplet_weights(v, cp)
    wx = torch.cat([_d_raw(ops, d_ap, rule.sa * w), _d_raw(ops, d_an, -rule.sa * w)])
    g0q, g0r = _listed_grads(ops, torch.cat([a, a]), torch.cat([p, n]), wx, need_q, need_r)
    if self_ref:
        return totals, counts, [g0q.add_(g0r) if need_q else None], None
    return totals, counts, [g0q], [g0r]


def rule_counts_nonzero(rule) -> bool:
    """TCM counts its selected pairs; contrastive its nonzero pairs (or, with
    ``pair_average='all'``, every pair: counted from the lists instead)."""
    return isinstance(rule, TCMRule) or rule.nonzero


def _mine_block(rule, X, s, bpr, bpc, fp, br, bc, prank):
    """Triplets of one block on far values ``X`` (``fp``: the positives' far values,
    listed columns of ``X`` overwritten here): ``(anchors, positives, negatives,
    raw positive values, raw negative values)`` with global anchor rows."""
    c, M = X.shape
    inf = float("inf")
    dev = X.device
    n_excl = torch.bincount(br, minlength=c)
    has_neg = n_excl < M
    if rule.mining == "hard":
        rmax = X.new_full((c,), -inf).scatter_reduce_(0, bpr, fp, "amax")
        cand = torch.where(fp == rmax[bpr], bpc, torch.full_like(bpc, M))
        p = torch.full((c,), M, dtype=bpc.dtype, device=dev).scatter_reduce_(0, bpr, cand, "amin")
        X.index_put_((br, bc), X.new_full((), inf))
        n = X.argmin(1)
        has = (p < M) & has_neg
        rows = torch.nonzero(has).squeeze(1)
        p, n = p[rows], n[rows]
        return rows + s, p, n, rmax[rows], X[rows, n]
    # semi-hard: per positive pair, the closest negative farther than the positive, else the
    # farthest negative
    X.index_put_((br, bc), X.new_full((), -inf))
    farthest = X.argmax(1)
    X.index_put_((br, bc), X.new_full((), inf))
    keep = has_neg[bpr]
    bpr, bpc, fp, prank = bpr[keep], bpc[keep], fp[keep], prank[keep]
    n = torch.empty_like(bpc)
    n_slots = torch.bincount(prank).numel() if prank.numel() else 0
    Y = None
    for k in range(n_slots):
        sel = torch.nonzero(prank == k).squeeze(1)
        rk = bpr[sel]
        t = fp[sel].unsqueeze(1)
        if rk.numel() == c:  # every row has a k-th positive (ranks ascend with rows)
            Xk = X
        else:
            Xk = X[rk]
        if Y is None:
            Y = X.new_empty(c, M)
        Yk = torch.sub(Xk, t, out=Y[:rk.numel()])
        F.threshold_(Yk, 0.0, inf)  # only negatives strictly farther than the positive
        vals, idx = Yk.min(1)
        n[sel] = torch.where(torch.isinf(vals), farthest[rk], idx)
    return bpr + s, bpc, n, fp, X[bpr, n]


def _all_block(rule, X, Y, U, bpr, fp, prank, br, bc):
    """Triplet ``all`` on one block of far values ``X`` (``fp``: the positives' far values; the
    listed columns of ``X`` are set to +inf here, so no triplet uses them): per positive rank, over
    the rows with such a positive, ``v = f_ap + m - X`` and its hinge, summed per row, and the
    hinge's derivative, summed per row (``wp``: ``dL/df_ap / coef`` per positive) and subtracted
    into ``U`` (``dL/df_an / coef``, dense).  ``(row sums [c], nonzero count, wp)``."""
    c, M = X.shape
    X.index_put_((br, bc), X.new_full((), float("inf")))
    U.zero_()
    sums = X.new_zeros(c)
    cnt = torch.zeros((), dtype=torch.long, device=X.device)
    wp = torch.zeros_like(fp)
    n_slots = torch.bincount(prank).numel() if prank.numel() else 0
    for k in range(n_slots):
        sel = torch.nonzero(prank == k).squeeze(1)
        rk = bpr[sel]
        full = rk.numel() == c  # every row has a k-th positive (ranks ascend with rows)
        Yk = torch.sub((fp[sel] + rule.m).unsqueeze(1), X if full else X[rk], out=Y[:rk.numel()])
        if rule.smooth:
            lt = F.softplus(Yk)
            hg = Yk.sigmoid_()
        else:
            lt = hg = Yk.relu_()
        rs = lt.sum(1)
        if rule.nonzero:
            cnt += torch.count_nonzero(lt)
        if not rule.smooth:
            hg = Yk.sign_()
        wp[sel] = hg.sum(1)
        if full:
            sums.add_(rs)
            U.sub_(hg)
        else:
            with _one_thread():
                sums.index_add_(0, rk, rs)
                U.index_add_(0, rk, hg, alpha=-1.0)
    return sums, cnt, wp


def _all_finish(rule, ops, kind, q, rr, coef, pr, pc, er, pos_raw, wps, neg_sums, neg_counts, A1, A2,
                self_ref, need_q, need_r):
    """Totals, counts and gradients of triplet ``all`` from :func:`_all_block`'s per-block parts."""
    B, M = q.shape[0], rr.shape[0]
    zero = q.new_zeros(())
    totals = q.new_zeros(1)
    counts = q.new_zeros(1)
    totals[0] = torch.stack(neg_sums).sum() if neg_sums else zero
    if rule.nonzero:
        counts[0] = torch.stack(neg_counts).sum() if neg_counts else zero
    else:  # every (positive pair, negative of its anchor)
        n_neg = M - torch.bincount(er, minlength=B)
        counts[0] = n_neg[pr].sum()
    fp = torch.cat(pos_raw) if pos_raw else q.new_zeros(0)
    wp = torch.cat(wps) if wps else q.new_zeros(0)
    d_ap = -fp if ops.far else fp  # far values back to the distance (similarity)
    # dL/dd_ap = sa * dL/df_ap (f = -S for a similarity)
    w = rule.sa * coef[pr] * wp
    scale = 0.5 if kind == "euclid" else 1.0
    gq_d, gr_d = ops.finish(A1, A2, scale)
    g0q, g0r = _listed_grads(ops, pr, pc, _d_raw(ops, d_ap, w), need_q, need_r)
    if self_ref:
        return totals, counts, [g0q.add_(g0r).add_(gq_d).add_(gr_d) if need_q else None], None
    return totals, counts, [g0q.add_(gq_d) if need_q else None], [g0r.add_(gr_d) if need_r else None]
