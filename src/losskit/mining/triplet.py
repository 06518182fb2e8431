"""Triplet selection (FaceNet, Schroff et al. 2015, arXiv 1503.03832).

``farness`` is the distance itself, or minus the similarity, so that larger
always means farther.

* ``all``: every (anchor, positive, negative) with a positive and a negative.
* ``hard``: batch-hard -- per anchor the farthest positive and the closest
  negative (one triplet per anchor; Hermans et al. 2017's "batch hard").
* ``semi-hard``: FaceNet's semi-hard negatives; per anchor-positive pair the
  closest negative that is still farther than the positive
  (``d_ap < d_an``); when none exists, the farthest negative (the choice
  of TensorFlow's ``triplet_semihard_loss``; FaceNet does not say).

``all`` and ``semi-hard`` give data-dependent numbers of triplets (index
lists); ``hard`` has a static shape (:func:`hard_triplets`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from losskit.core.checks import check_bool, check_choice, check_int
from losskit.core.context import PairReference
from losskit.core.registry import Paper, register
from losskit.distances import BaseDistance, get_distance
from losskit.mining.pairs import block_pair_masks, resolve_reference

__all__ = ["TRIPLET_MINING", "mine_triplets", "hard_triplets", "TripletMiner"]

TRIPLET_MINING = ("all", "hard", "semi-hard")


def _farness(mat: Tensor, distance: BaseDistance) -> Tensor:
    return -mat if distance.is_similarity else mat


@torch.no_grad()
def hard_triplets(mat: Tensor, pos: Tensor, neg: Tensor, distance: BaseDistance):
    """Batch-hard choice for every row of ``mat`` [c, M]: ``(p [c], n [c], has [c])``,
    the farthest positive, the closest negative, and whether the row has both
    (rows without keep an arbitrary index).  Static shapes, no host sync."""
    f = _farness(mat, distance)
    inf = torch.tensor(float("inf"), dtype=f.dtype, device=f.device)
    p = f.masked_fill(~pos, -inf).argmax(1)
    n = f.masked_fill(~neg, inf).argmin(1)
    return p, n, pos.any(1) & neg.any(1)


@torch.no_grad()
def mine_triplets(mat: Tensor, pos: Tensor, neg: Tensor, mining: str, distance: BaseDistance,
                  row_offset: int = 0):
    """``(a, p, n)`` index tensors for a block of the distance matrix ``mat`` [c, M]."""
    check_choice("mining", mining, TRIPLET_MINING)
    if mining == "all":
        trip = pos.unsqueeze(2) & neg.unsqueeze(1)  # [c, M, M]
        a, p, n = torch.where(trip)
        return a + row_offset, p, n
    if mining == "hard":
        p, n, has = hard_triplets(mat, pos, neg, distance)
        a = torch.arange(mat.shape[0], device=mat.device)
        return a[has] + row_offset, p[has], n[has]
    # semi-hard: for each positive pair (a, p) of an anchor that has a negative
    f = _farness(mat, distance)
    a, p = torch.where(pos & neg.any(1, keepdim=True))
    if a.numel() == 0:
        return a + row_offset, p, p.clone()
    f_ap = f[a, p]
    fa = f[a]  # [P, M]
    nega = neg[a]
    inf = torch.tensor(float("inf"), dtype=f.dtype, device=f.device)
    semi = nega & (fa > f_ap.unsqueeze(1))
    closest_semi = fa.masked_fill(~semi, inf).argmin(1)
    farthest = fa.masked_fill(~nega, -inf).argmax(1)
    n = torch.where(semi.any(1), closest_semi, farthest)
    return a + row_offset, p, n


@register("triplet-miner", family="pair", kind="miner",
          paper=Paper("FaceNet: A Unified Embedding for Face Recognition and Clustering", 2015, "1503.03832"),
          summary="Triplet indices (a, p, n): all, batch-hard or semi-hard mining.")
class TripletMiner:
    """Triplet indices ``(a, p, n)`` for ``mining`` in ``all``, ``hard``, ``semi-hard``.

    ``miner(embeddings, labels, reference=None)``; ``chunk_size`` anchor rows
    of the distance matrix at a time.
    """

    def __init__(self, mining: str = "semi-hard", distance: str | BaseDistance = "squared-euclidean",
                 normalize: bool = True, chunk_size: int | None = None):
        self.mining = check_choice("mining", mining, TRIPLET_MINING)
        self.distance = get_distance(distance, normalize=check_bool("normalize", normalize))
        self.chunk_size = check_int("chunk_size", chunk_size, low=1, allow_none=True)

    @torch.no_grad()
    def __call__(self, embeddings: Tensor, labels: Tensor, reference: PairReference | None = None):
        ref = resolve_reference(embeddings, labels, reference)
        outs = [[], [], []]
        for s, e, mat in self.distance.chunks(embeddings, None if ref.is_batch else ref.embeddings,
                                              self.chunk_size):
            pos, neg = block_pair_masks(labels[s:e], ref.labels, ref.self_index[s:e])
            for lst, t in zip(outs, mine_triplets(mat, pos, neg, self.mining, self.distance, s)):
                lst.append(t)
        if not outs[0]:
            e = torch.empty(0, dtype=torch.long, device=labels.device)
            return e, e.clone(), e.clone()
        return tuple(torch.cat(x) for x in outs)
