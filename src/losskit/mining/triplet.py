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
"""

from __future__ import annotations

import torch
from torch import Tensor

from losskit.distances import BaseDistance, get_distance
from losskit.mining.pairs import block_pair_masks, resolve_reference

__all__ = ["TRIPLET_MINING", "mine_triplets", "TripletMiner"]

TRIPLET_MINING = ("all", "hard", "semi-hard")


def _farness(mat: Tensor, distance: BaseDistance) -> Tensor:
    return -mat if distance.is_similarity else mat


@torch.no_grad()
def mine_triplets(mat: Tensor, pos: Tensor, neg: Tensor, mining: str, distance: BaseDistance,
                  row_offset: int = 0):
    """``(a, p, n)`` index tensors for a block of the distance matrix ``mat`` [c, M]."""
    if mining not in TRIPLET_MINING:
        raise ValueError(f"mining: expected one of {TRIPLET_MINING}, got {mining!r}")
    f = _farness(mat, distance)
    has = pos.any(1) & neg.any(1)
    if mining == "all":
        trip = pos.unsqueeze(2) & neg.unsqueeze(1)  # [c, M, M]
        a, p, n = torch.where(trip)
        return a + row_offset, p, n
    if mining == "hard":
        inf = torch.tensor(float("inf"), dtype=f.dtype, device=f.device)
        p = f.masked_fill(~pos, -inf).argmax(1)
        n = f.masked_fill(~neg, inf).argmin(1)
        a = torch.arange(mat.shape[0], device=mat.device)
        return a[has] + row_offset, p[has], n[has]
    # semi-hard: for each positive pair (a, p)
    a, p = torch.where(pos & has.unsqueeze(1))
    if a.numel() == 0:
        e = torch.empty(0, dtype=torch.long, device=mat.device)
        return e, e.clone(), e.clone()
    f_ap = f[a, p]
    fa = f[a]  # [P, M]
    nega = neg[a]
    inf = torch.tensor(float("inf"), dtype=f.dtype, device=f.device)
    semi = nega & (fa > f_ap.unsqueeze(1))
    closest_semi = fa.masked_fill(~semi, inf).argmin(1)
    farthest = fa.masked_fill(~nega, -inf).argmax(1)
    n = torch.where(semi.any(1), closest_semi, farthest)
    return a + row_offset, p, n


class TripletMiner:
    """Triplet indices ``(a, p, n)`` for ``mining`` in ``all``, ``hard``, ``semi-hard``."""

    def __init__(self, mining: str = "semi-hard", distance: str | BaseDistance = "squared-euclidean",
                 normalize: bool = True, chunk_size: int | None = None):
        if mining not in TRIPLET_MINING:
            raise ValueError(f"mining: expected one of {TRIPLET_MINING}, got {mining!r}")
        self.mining = mining
        self.distance = get_distance(distance, normalize=normalize)
        self.chunk_size = chunk_size

    @torch.no_grad()
    def __call__(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor | None = None,
                 ref_labels: Tensor | None = None, self_index: Tensor | None = None):
        ref, ref_labels, self_index = resolve_reference(embeddings, labels, ref_embeddings, ref_labels, self_index)
        outs = [[], [], []]
        for s, e, mat in self.distance.chunks(embeddings, None if ref is embeddings else ref, self.chunk_size):
            pos, neg = block_pair_masks(labels[s:e], ref_labels, self_index[s:e])
            for lst, t in zip(outs, mine_triplets(mat, pos, neg, self.mining, self.distance, s)):
                lst.append(t)
        if not outs[0]:
            e = torch.empty(0, dtype=torch.long, device=labels.device)
            return e, e.clone(), e.clone()
        return tuple(torch.cat(x) for x in outs)
