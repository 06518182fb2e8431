"""Input validation and reduction shared by every objective.

Conventions (all of losskit follows them):

* ``reduction='none'`` returns one loss per sample (shape ``[B]``);
  ``'sum'`` returns ``sum_i w_i l_i``; ``'mean'`` returns
  ``sum_i w_i l_i / B`` -- the papers' ``mean(w * l)`` (MADPO, GLOW), which
  equals the plain mean when every weight is 1.  An empty batch gives a zero
  that is still connected to the graph, never NaN.
* ``sample_weight`` is an optional ``[B]`` tensor of finite, non-negative
  weights; it is cast to the loss's dtype and device.
* Errors name the argument, the expected shape or range, and what was given.
"""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_embeddings(embeddings: Tensor, name: str = "embeddings") -> Tensor:
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape [B, D], got {type(embeddings).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"{name}: expected shape [B, D], got {_shape(embeddings)}")
    if not embeddings.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {embeddings.dtype}")
    return embeddings


def check_labels(labels: Tensor, batch: int, name: str = "labels", device: torch.device | None = None,
                 num_classes: int | None = None, allow_ignore: bool = False) -> Tensor:
    """Integer labels of shape ``[batch]``; with ``num_classes``, in range
    ``[0, num_classes)`` (``-1`` allowed when ``allow_ignore``)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor of shape [{batch}], got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{name}: expected shape [{batch}] (one label per embedding), got {_shape(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype (torch.long), got {labels.dtype}")
    if device is not None and labels.device != device:
        raise ValueError(f"{name}: expected device {device} (the embeddings' device), got {labels.device}")
    if num_classes is not None and labels.numel() > 0:
        lo = -1 if allow_ignore else 0
        mn, mx = int(labels.min()), int(labels.max())
        if mn < lo or mx >= num_classes:
            bad = mn if mn < lo else mx
            raise ValueError(
                f"{name}: expected values in [{lo}, {num_classes - 1}] (num_classes={num_classes}), got {bad}"
            )
    return labels


def check_sample_weight(sample_weight: Tensor | None, batch: int, like: Tensor) -> Tensor | None:
    if sample_weight is None:
        return None
    if not isinstance(sample_weight, Tensor):
        sample_weight = torch.as_tensor(sample_weight)
    if sample_weight.dim() != 1 or sample_weight.shape[0] != batch:
        raise ValueError(f"sample_weight: expected shape [{batch}], got {_shape(sample_weight)}")
    if sample_weight.device != like.device:
        raise ValueError(f"sample_weight: expected device {like.device}, got {sample_weight.device}")
    if sample_weight.numel() and not bool(torch.isfinite(sample_weight).all()):
        raise ValueError("sample_weight: expected finite values, got NaN or inf")
    if sample_weight.numel() and bool((sample_weight < 0).any()):
        raise ValueError(f"sample_weight: expected values >= 0, got min {float(sample_weight.min())}")
    return sample_weight.to(like.dtype)


def check_finite(t: Tensor, name: str) -> Tensor:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    return t


def reduce_loss(loss: Tensor, reduction: str, sample_weight: Tensor | None = None) -> Tensor:
    """Apply ``sample_weight`` then ``reduction`` to a per-sample loss ``[B]``."""
    check_reduction(reduction)
    if sample_weight is not None:
        sample_weight = check_sample_weight(sample_weight, loss.shape[0], loss)
        loss = loss * sample_weight
    if reduction == "none":
        return loss
    if reduction == "sum" or loss.numel() == 0:
        return loss.sum()
    return loss.sum() / loss.shape[0]


def zero_with_graph(*tensors: Tensor) -> Tensor:
    """A scalar zero connected to every tensor given (keeps DDP and
    ``backward()`` happy when no pair qualifies)."""
    out = None
    for t in tensors:
        z = t.sum() * 0
        out = z if out is None else out + z
    return out
