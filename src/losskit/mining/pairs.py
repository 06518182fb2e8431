"""Positive / negative pair masks between anchors and a reference, and the
one place where a pair loss or miner resolves its reference.

The reference (what the anchors are scored against) is one value,
:class:`losskit.core.context.PairReference`; ``None`` means the batch itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losskit.core.checks import check_embeddings, check_labels
from losskit.core.context import PairReference, ResolvedReference

__all__ = ["block_pair_masks", "resolve_reference", "all_pairs_indices", "PairReference"]

_BATCH = PairReference()


def resolve_reference(embeddings: Tensor, labels: Tensor, reference: PairReference | None = None, *,
                      finite: bool = True) -> ResolvedReference:
    """Validate the anchors ``embeddings [B, D]``/``labels [B]`` and resolve
    ``reference`` against them (``None``: the batch, each anchor's own column
    excluded).  ``finite=False`` skips the value check of the anchors."""
    check_embeddings(embeddings, finite=finite)
    check_labels(labels, embeddings.shape[0], device=embeddings.device)
    if reference is None:
        reference = _BATCH
    elif not isinstance(reference, PairReference):
        raise TypeError(f"reference: expected a losskit.core.PairReference or None, got {type(reference).__name__}")
    return reference.resolve(embeddings, labels)


def block_pair_masks(q_labels: Tensor, r_labels: Tensor, self_index: Tensor | None = None):
    """Boolean ``[c, M]`` masks ``(pos, neg)`` for a block of ``c`` anchors.

    ``pos``: same label, not the anchor itself (its column ``self_index[i]``,
    ``-1`` for none); ``neg``: different label.  No host synchronisation.
    """
    same = q_labels.unsqueeze(1) == r_labels.unsqueeze(0)
    if self_index is None:
        return same, ~same
    other = torch.arange(r_labels.shape[0], device=r_labels.device).unsqueeze(0) != self_index.unsqueeze(1)
    return same & other, other & ~same


def all_pairs_indices(labels: Tensor, ref_labels: Tensor | None = None, self_index: Tensor | None = None):
    """``(a1, p, a2, n)``: every positive (same label, not self) and negative pair, as indices."""
    if ref_labels is None:
        ref_labels = labels
        if self_index is None:
            self_index = torch.arange(labels.shape[0], device=labels.device)
    pos, neg = block_pair_masks(labels, ref_labels, self_index)
    a1, p = torch.where(pos)
    a2, n = torch.where(neg)
    return a1, p, a2, n
