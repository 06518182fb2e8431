"""Head backends behind one interface (:class:`HeadBackend`): how the softmax
over the classes is computed.  ``BACKENDS[name]`` is the instance
:class:`losskit.heads.MarginHead` uses for ``head=name``."""

from __future__ import annotations

from losskit.heads.backends.auto import AUTO_DENSE_MAX, AutoBackend
from losskit.heads.backends.base import HeadBackend
from losskit.heads.backends.chunked import ChunkedBackend
from losskit.heads.backends.dense import DenseBackend
from losskit.heads.backends.fused import FusedBackend
from losskit.heads.backends.sampled import SampledBackend, select_sampled_classes
from losskit.heads.backends.sharded import ShardedBackend, shard_range

__all__ = ["BACKENDS", "HEADS", "HeadBackend", "DenseBackend", "ChunkedBackend", "FusedBackend", "SampledBackend",
           "ShardedBackend", "AutoBackend", "AUTO_DENSE_MAX", "select_sampled_classes", "shard_range"]

_dense, _chunked, _fused = DenseBackend(), ChunkedBackend(), FusedBackend()
_auto = AutoBackend(_dense, _chunked, _fused)

BACKENDS: dict[str, HeadBackend] = {
    "auto": _auto,
    "dense": _dense,
    "chunked": _chunked,
    "fused": _fused,
    "sampled": SampledBackend(_auto),
    "sharded": ShardedBackend(),
}
HEADS = tuple(BACKENDS)
