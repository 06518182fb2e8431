"""Model states as the server sees them, and the check every client update passes.

A *state* is an ordered ``dict[str, Tensor]``: a model's ``state_dict()``
(parameters and buffers, BatchNorm running statistics included), detached and
cloned.  The same check runs in the in-process loop and in the Flower
strategies: an update whose keys, shapes or dtypes differ from the global
state, or with a NaN/inf, is rejected with a reason and never aggregated.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

__all__ = ["ClientUpdate", "state_of", "validate_update", "UpdateRejected", "float_keys"]

class UpdateRejected(ValueError):
    """A client update that cannot be aggregated (wrong keys, shape, dtype, non-finite values)."""


@dataclass
class ClientUpdate:
    """What one client returns for a round: its new state, its sample count and metrics."""

    client: Any
    state: Mapping[str, Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def state_of(model: nn.Module | Mapping[str, Tensor]) -> "OrderedDict[str, Tensor]":
    """A detached, cloned copy of a model's ``state_dict()`` (or of a state)."""
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    return OrderedDict((k, v.detach().clone()) for k, v in sd.items())


def float_keys(state: Mapping[str, Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def validate_update(global_state: Mapping[str, Tensor], update: Mapping[str, Any], who: Any = "client") -> None:
    """Raise :class:`UpdateRejected` naming the first problem of ``update`` against ``global_state``."""
    if not isinstance(update, Mapping):
        raise UpdateRejected(f"{who}: expected a mapping of tensors, got {type(update).__name__}")
    missing = [k for k in global_state if k not in update]
    extra = [k for k in update if k not in global_state]
    if missing or extra:
        raise UpdateRejected(f"{who}: keys differ from the global model (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")
    for k, g in global_state.items():
        v = update[k]
        if not isinstance(v, Tensor):
            raise UpdateRejected(f"{who}: {k!r} is a {type(v).__name__}, expected a tensor")
        if tuple(v.shape) != tuple(g.shape):
            raise UpdateRejected(f"{who}: {k!r} has shape {list(v.shape)}, expected {list(g.shape)}")
        if v.is_floating_point() != g.is_floating_point():
            raise UpdateRejected(f"{who}: {k!r} has dtype {v.dtype}, expected {g.dtype}")
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            n_bad = int((~torch.isfinite(v)).sum())
            raise UpdateRejected(f"{who}: {k!r} has {n_bad} non-finite value(s) (NaN or inf)")
