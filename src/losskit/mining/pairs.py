"""Positive / negative pair masks between queries and references, one row block at a time."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["block_pair_masks", "resolve_reference", "all_pairs_indices"]


def resolve_reference(embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor | None = None,
                      ref_labels: Tensor | None = None, self_index: Tensor | None = None):
    """``(ref_embeddings, ref_labels, self_index)`` with the batch as its own reference by default.

    ``self_index[i]`` is the reference column holding query ``i`` itself (its
    self pair is never a positive), or ``-1`` when the query is not among the
    references.
    """
    B = embeddings.shape[0]
    if ref_embeddings is None:
        if ref_labels is not None:
            raise ValueError("ref_labels: given without ref_embeddings")
        idx = torch.arange(B, device=labels.device) if self_index is None else self_index
        return embeddings, labels, idx
    if ref_labels is None:
        raise ValueError("ref_labels: required when ref_embeddings is given")
    if ref_embeddings.dim() != 2 or ref_embeddings.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"ref_embeddings: expected shape [M, {embeddings.shape[1]}], got {list(ref_embeddings.shape)}"
        )
    if ref_labels.dim() != 1 or ref_labels.shape[0] != ref_embeddings.shape[0]:
        raise ValueError(f"ref_labels: expected shape [{ref_embeddings.shape[0]}], got {list(ref_labels.shape)}")
    if ref_labels.is_floating_point():
        raise TypeError(f"ref_labels: expected an integer dtype, got {ref_labels.dtype}")
    if self_index is None:
        self_index = torch.full((B,), -1, dtype=torch.long, device=labels.device)
    if self_index.shape != (B,):
        raise ValueError(f"self_index: expected shape [{B}], got {list(self_index.shape)}")
    return ref_embeddings, ref_labels, self_index


def block_pair_masks(q_labels: Tensor, r_labels: Tensor, self_index: Tensor | None = None):
    """Boolean ``[c, M]`` masks ``(pos, neg)`` for a block of ``c`` queries.

    ``pos``: same label, not the query itself; ``neg``: different label.
    """
    same = q_labels.unsqueeze(1) == r_labels.unsqueeze(0)
    neg = ~same
    pos = same
    if self_index is not None and self_index.numel():
        valid = self_index >= 0
        if bool(valid.any()):
            rows = torch.arange(q_labels.shape[0], device=q_labels.device)[valid]
            pos[rows, self_index[valid]] = False
            neg[rows, self_index[valid]] = False
    return pos, neg


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
