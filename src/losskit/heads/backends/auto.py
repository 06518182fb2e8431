"""``head='auto'``: fused where it applies (a scalar loss that needs a
gradient), else dense when ``B * C <= 2**22``, else chunked.  Fused was as
fast as or faster than dense at every size measured (docs/margin.md).

With ``losskit.tensor_checks(False)`` or while ``torch.compile`` traces
(``torch.compiler.is_compiling()``) fused is never picked: its grouped class
tiles and its underflow recomputation read tensors on the host.  Dense or
chunked give the same numbers without a host synchronisation (slower than
fused, but compile-friendly)."""

from __future__ import annotations

import torch

from losskit.core.checks import tensor_checks_enabled
from losskit.heads.backends.base import HeadBackend
from losskit.heads.backends.chunked import ChunkedBackend
from losskit.heads.backends.dense import DenseBackend
from losskit.heads.backends.fused import FusedBackend

__all__ = ["AutoBackend", "AUTO_DENSE_MAX", "sync_allowed"]

AUTO_DENSE_MAX = 2 ** 22


def sync_allowed() -> bool:
    """Whether a backend that reads tensors on the host may run: tensor
    checks on and not tracing for ``torch.compile``."""
    return tensor_checks_enabled() and not torch.compiler.is_compiling()


class AutoBackend(HeadBackend):
    name = "auto"

    def __init__(self, dense: DenseBackend, chunked: ChunkedBackend, fused: FusedBackend):
        self.dense, self.chunked, self.fused = dense, chunked, fused

    def _unfused(self, xn, weight) -> HeadBackend:
        return self.dense if xn.shape[0] * weight.shape[0] <= AUTO_DENSE_MAX else self.chunked

    def per_row(self, head, xn, weight, labels):
        return self._unfused(xn, weight).per_row(head, xn, weight, labels)

    def loss(self, head, xn, weight, labels, reduction, sample_weight):
        if sync_allowed() and self.fused.applies(xn, weight, reduction, sample_weight):
            return self.fused.loss(head, xn, weight, labels, reduction, sample_weight)
        return self._unfused(xn, weight).loss(head, xn, weight, labels, reduction, sample_weight)
