"""losskit.mining: pair and triplet selection (as functions and registered miners)."""

from losskit.mining.multi_similarity import MultiSimilarityMiner, ms_mine_block, ms_thresholds
from losskit.mining.pairs import all_pairs_indices, block_pair_masks, resolve_reference
from losskit.mining.triplet import TRIPLET_MINING, TripletMiner, hard_triplets, mine_triplets

__all__ = [
    "MultiSimilarityMiner",
    "ms_mine_block",
    "ms_thresholds",
    "all_pairs_indices",
    "block_pair_masks",
    "resolve_reference",
    "TRIPLET_MINING",
    "TripletMiner",
    "hard_triplets",
    "mine_triplets",
]
