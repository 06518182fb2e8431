"""The one interface every sample-weighting policy (registry kind
``weighter``) implements.

    weights = policy(per_sample_loss, sample_ids=None)     # detached [B], the losses' dtype/device
    loss    = objective(..., sample_weight=weights)         # any objective; or
    loss    = policy.loss(per_sample_loss, sample_ids)      # reduce_loss(losses, 'mean', weights)
    policy.step()                                           # once after each optimizer.step()

A policy subclasses :class:`Weighter` and implements :meth:`compute`; the
base validates the losses (``[B]``, floating, finite) and the ids, detaches
the result, and carries the state (:meth:`state_dict` /
:meth:`load_state_dict`) with the hyperparameters recorded for checking
only: they are never loaded, a state saved under other values is refused
with an error naming each (``strict=False`` keeps the constructed ones).
``step()`` advances the optimiser-step counter (burn-in) and commits what a
policy staged during the step (GLOW's loss history).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from losskit.core.checks import check_finite, check_vector, shape_str
from losskit.core.reduction import reduce_loss

__all__ = ["Weighter", "check_sample_ids"]


def check_sample_ids(sample_ids: Tensor | Sequence[int] | None, n: int, *, required: bool = False,
                     who: str = "this weighter", device: torch.device | None = None) -> Tensor | None:
    """``None`` (allowed unless ``required``) or ``n`` integer ids.  When ``required`` they are
    returned as a ``[n]`` int64 tensor on ``device`` (a list or tuple is converted); a policy that
    does not use them only has their shape checked.  No host read (values are the policy's to check)."""
    if sample_ids is None:
        if required:
            raise ValueError(f"sample_ids: {who} keys its state by sample id; pass a [B] integer tensor of ids")
        return None
    if isinstance(sample_ids, Tensor):
        if sample_ids.dim() != 1 or sample_ids.is_floating_point() or sample_ids.is_complex() \
                or sample_ids.dtype == torch.bool:
            raise ValueError(f"sample_ids: expected a [B] integer tensor, got shape {list(sample_ids.shape)} "
                             f"dtype {sample_ids.dtype}")
        ids = sample_ids
    else:
        try:
            ids = torch.as_tensor([int(v) for v in sample_ids], dtype=torch.long)
        except (TypeError, ValueError):
            raise ValueError(f"sample_ids: expected a [B] integer tensor or a sequence of ints, got "
                             f"{type(sample_ids).__name__}") from None
    if ids.shape[0] != n:
        raise ValueError(f"sample_ids: expected {n} ids (one per loss), got {ids.shape[0]}")
    if not required:
        return None
    if ids.dtype != torch.long or (device is not None and ids.device != device):
        ids = ids.to(device=device, dtype=torch.long)
    return ids


class Weighter:
    """Base class of the ``weighter`` kind (see the module docstring)."""

    #: whether :meth:`compute` needs ``sample_ids``
    needs_ids = False
    #: whether :meth:`compute` checks the losses' finiteness itself (more cheaply than the base's
    #: ``[B]`` scan: from a range or a sum it reads anyway); otherwise the base checks them
    checks_finite = False
    #: keys :meth:`load_state_dict` requires (besides the optional ``num_steps`` and ``hparams``)
    state_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.num_steps = 0

    # -- the interface ----------------------------------------------------------------------------
    def __call__(self, losses: Tensor, sample_ids: Tensor | Sequence[int] | None = None, **kw: Any) -> Tensor:
        """Detached ``[B]`` weights for the per-sample ``losses``."""
        return self.weights(losses, sample_ids, **kw)

    def weights(self, losses: Tensor, sample_ids: Tensor | Sequence[int] | None = None, **kw: Any) -> Tensor:
        """Same as calling the policy (the registry's ``weighter`` contract)."""
        if not isinstance(losses, Tensor) or losses.dim() != 1 or not losses.is_floating_point():
            got = shape_str(losses) + f" {losses.dtype}" if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"losses: expected a [B] floating tensor of per-sample losses, got {got}")
        if not self.checks_finite:
            check_finite(losses, "losses")
        ids = check_sample_ids(sample_ids, losses.shape[0], required=self.needs_ids,
                               who=type(self).__name__, device=losses.device)
        with torch.no_grad():
            w = self.compute(losses.detach(), ids, **kw)
        return w if w.dtype == losses.dtype else w.to(losses.dtype)

    def loss(self, losses: Tensor, sample_ids: Tensor | Sequence[int] | None = None, reduction: str = "mean",
             **kw: Any) -> Tensor:
        """``reduce_loss(losses, reduction, weights)``: the weighted loss, gradient through ``losses`` only."""
        return reduce_loss(losses, reduction, self.weights(losses, sample_ids, **kw))

    def compute(self, losses: Tensor, ids: Tensor | None, **kw: Any) -> Tensor:
        """The weights of detached ``losses [B]`` (run under ``no_grad``); ``ids``: the ``[B]`` int64
        ids on the losses' device when :attr:`needs_ids`, else ``None``."""
        raise NotImplementedError

    def step(self) -> None:
        """Once after each ``optimizer.step()``: advance the step counter."""
        self.num_steps += 1

    # -- state ------------------------------------------------------------------------------------
    def _hyperparameters(self) -> dict[str, Any]:
        """The validated values of the constructor's arguments (names: ``self.hparams``)."""
        return {k: getattr(self, k) for k in getattr(self, "hparams", {}) if k != "process_group"}

    def extra_state(self) -> dict[str, Any]:
        """The policy's own state besides the step counter (override with :meth:`load_extra_state`)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, **self.extra_state(), "hparams": self._hyperparameters()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore the state; the hyperparameters stay those constructed (with ``strict`` a state
        saved under others is a ValueError naming each; ``strict=False`` loads it and keeps them)."""
        name = type(self).__name__
        missing = [k for k in self.state_keys if k not in state]
        if missing:
            raise KeyError(f"{name}.load_state_dict: the state has no {', '.join(missing)}")
        if strict:
            mine = self._hyperparameters()
            diff = [f"{k}={v!r} (constructed {mine[k]!r})" for k, v in state.get("hparams", {}).items()
                    if k in mine and v != mine[k]]
            if diff:
                raise ValueError(f"{name}.load_state_dict: the state was saved with {', '.join(diff)}; "
                                 f"hyperparameters are not loaded: construct {name}(**state['hparams']) to resume "
                                 "with them, or pass strict=False to keep the constructed ones")
        self.num_steps = int(state.get("num_steps", 0))
        self.load_extra_state(state)
