"""The one place where ``reduction`` and ``sample_weight`` are applied.

Every objective computes a per-row loss ``l`` of shape ``[B]`` aligned with
its input rows (rows that are not scored -- an ignored label, a support row of
an episode -- hold 0) and hands it to :func:`reduce_loss`:

* ``'none'``: ``w * l`` (``[B]``; ``w = 1`` without ``sample_weight``);
* ``'sum'``: ``sum_i w_i l_i``;
* ``'mean'``: ``sum_i w_i l_i / N`` where ``N`` is ``denominator`` --
  by default ``B``, the number of rows (the papers' ``mean(w * l)``; a weight
  of 0 still counts in ``N``).  An objective that averages over fewer rows
  (only the scored rows of an episode, a global batch under
  torch.distributed) passes ``denominator`` and documents it.

An empty batch gives a zero connected to the graph, never NaN.

Fused kernels that compute gradients during forward cannot call
:func:`reduce_loss` on a finished ``[B]`` vector; they take the per-row
coefficient ``c_i`` with ``reduced = sum_i c_i l_i`` from
:func:`row_coefficients`, the twin that encodes the same rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losskit.core.checks import check_reduction, check_sample_weight

__all__ = ["reduce_loss", "row_coefficients", "zero_with_graph", "REDUCTIONS"]

from losskit.core.checks import REDUCTIONS  # noqa: E402


def _denominator(n: int, denominator) -> float | Tensor:
    if denominator is None:
        return max(n, 1)
    if isinstance(denominator, Tensor):
        return denominator.clamp_min(1)
    return max(float(denominator), 1.0)


def reduce_loss(loss: Tensor, reduction: str, sample_weight: Tensor | None = None, *,
                denominator: int | float | Tensor | None = None, checked: bool = False) -> Tensor:
    """Apply ``sample_weight`` then ``reduction`` to a per-row loss ``[B]``.

    ``denominator``: the ``N`` of ``'mean'`` (default ``B``; values below 1
    count as 1).  ``checked=True`` says ``sample_weight`` was validated
    already (by the caller, once per call).
    """
    if not checked:
        check_reduction(reduction)
    if loss.dim() != 1:
        raise ValueError(f"loss: expected a per-row loss of shape [B], got {list(loss.shape)}")
    if sample_weight is not None:
        if not checked:
            sample_weight = check_sample_weight(sample_weight, loss.shape[0], loss)
        loss = loss * sample_weight.to(loss.dtype)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / _denominator(loss.shape[0], denominator)


def row_coefficients(n: int, reduction: str, sample_weight: Tensor | None = None, *,
                     denominator: int | float | Tensor | None = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> Tensor:
    """The ``c`` with ``reduce_loss(l, reduction, w)`` == ``sum_i c_i l_i``
    for a scalar ``reduction`` (``'sum'``/``'mean'``): ``c = w`` or
    ``c = w / N``.  For ``'none'`` it returns ``w`` (or ones): the
    coefficients of each row's own output."""
    check_reduction(reduction)
    if sample_weight is None:
        c = torch.ones(n, dtype=dtype, device=device)
    else:
        c = sample_weight.to(dtype=dtype, device=device)
    if reduction == "mean":
        c = c / _denominator(n, denominator)
    return c


def zero_with_graph(*tensors: Tensor | None) -> Tensor:
    """A scalar zero connected to every tensor given that requires grad (keeps
    DDP and ``backward()`` working when nothing qualifies)."""
    out = None
    for t in tensors:
        if t is None:
            continue
        z = t.sum() * 0
        out = z if out is None else out + z
    if out is None:
        raise ValueError("zero_with_graph: expected at least one tensor")
    return out
