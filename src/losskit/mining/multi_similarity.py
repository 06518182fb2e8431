"""Multi-Similarity mining (Wang et al., CVPR 2019, arXiv 1904.06627), eq. 3-4.

For anchor ``i`` with similarities ``S_i.``:

* a negative ``j`` is kept when ``S_ij > min_{k in P_i} S_ik - epsilon``;
* a positive ``k`` is kept when ``S_ik < max_{j in N_i} S_ij + epsilon``;

thresholds come from the unmined sets ``P_i`` (same label, not ``i``) and
``N_i`` (other labels).  An anchor with no positive keeps no negative and one
with no negative keeps no positive.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losskit.core.checks import check_bool, check_hparam, check_int
from losskit.core.context import PairReference
from losskit.core.registry import Paper, register
from losskit.distances import BaseDistance, get_distance
from losskit.kernels.multi_similarity import OFFICIAL_SELF_THRESHOLD
from losskit.mining.pairs import block_pair_masks, resolve_reference

__all__ = ["ms_thresholds", "ms_mine_block", "MultiSimilarityMiner", "OFFICIAL_SELF_THRESHOLD"]


def ms_thresholds(sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """``(min positive similarity, max negative similarity)`` per row (``+inf`` / ``-inf`` when empty)."""
    min_pos = sim.masked_fill(~pos, float("inf")).amin(1)
    max_neg = sim.masked_fill(~neg, float("-inf")).amax(1)
    return min_pos, max_neg


def ms_mine_block(sim: Tensor, pos: Tensor, neg: Tensor, epsilon: float,
                  thresholds: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The mined masks ``(pos, neg)`` for a block of similarities ``sim`` [c, M]."""
    min_pos, max_neg = ms_thresholds(sim, pos, neg) if thresholds is None else thresholds
    mined_pos = pos & (sim < (max_neg + epsilon).unsqueeze(1))
    mined_neg = neg & (sim > (min_pos - epsilon).unsqueeze(1))
    return mined_pos, mined_neg


@register("multi-similarity-miner", family="pair", kind="miner",
          paper=Paper("Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning", 2019,
                      "1904.06627"),
          summary="Multi-Similarity pair mining (eq. 3-4): (a1, p, a2, n) indices like PML.")
class MultiSimilarityMiner:
    """Pair miner of the Multi-Similarity paper; returns ``(a1, p, a2, n)`` indices like PML.

    ``miner(embeddings, labels, reference=None)``.  Works on any similarity
    (cosine by default); blocks of ``chunk_size`` anchor rows keep memory at
    ``chunk_size x M``.
    """

    def __init__(self, epsilon: float = 0.1, distance: str | BaseDistance = "cosine",
                 chunk_size: int | None = None, official_positive_filter: bool = False):
        self.epsilon = check_hparam("epsilon", epsilon, low=0)
        self.distance = get_distance(distance)
        if not self.distance.is_similarity:
            raise ValueError(f"distance: Multi-Similarity mining needs a similarity, got {self.distance!r}")
        self.chunk_size = check_int("chunk_size", chunk_size, low=1, allow_none=True)
        self.official_positive_filter = check_bool("official_positive_filter", official_positive_filter)

    @torch.no_grad()
    def __call__(self, embeddings: Tensor, labels: Tensor, reference: PairReference | None = None):
        ref = resolve_reference(embeddings, labels, reference)
        out = [[], [], [], []]
        for s, e, sim in self.distance.chunks(embeddings, None if ref.is_batch else ref.embeddings,
                                              self.chunk_size):
            pos, neg = block_pair_masks(labels[s:e], ref.labels, ref.self_index[s:e])
            if self.official_positive_filter:
                pos &= sim < OFFICIAL_SELF_THRESHOLD
            mp, mn = ms_mine_block(sim, pos, neg, self.epsilon)
            a1, p = torch.where(mp)
            a2, n = torch.where(mn)
            for lst, t in zip(out, (a1 + s, p, a2 + s, n)):
                lst.append(t)
        if not out[0]:
            empty = torch.empty(0, dtype=torch.long, device=labels.device)
            return empty, empty.clone(), empty.clone(), empty.clone()
        return tuple(torch.cat(lst) for lst in out)
