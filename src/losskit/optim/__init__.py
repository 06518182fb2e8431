"""losskit.optim: torch.optim optimizers and lr schedulers, registered by kind.

* :class:`FRUGAL` (``losskit.get("frugal", params)``) and
  :func:`frugal_param_groups`, :func:`optimizer_state_bytes` (measured),
  :func:`frugal_state_bytes` and :func:`adamw_state_bytes` (from the shapes);
* :class:`LinearDecayLR` (``"linear-decay"``), :class:`RefinedLR`
  (``"refined"``) and :class:`GradNormRecorder`;
* :class:`NormalizedLRGD` (``"normalized-lr-gd"``).
"""

from losskit.optim.frugal import (FRUGAL, adamw_state_bytes, frugal_param_groups, frugal_state_bytes,
                                optimizer_state_bytes)
from losskit.optim.normalized_lrgd import NormalizedLRGD
from losskit.optim.schedules import GradNormRecorder, LinearDecayLR, RefinedLR

__all__ = ["FRUGAL", "frugal_param_groups", "optimizer_state_bytes", "frugal_state_bytes", "adamw_state_bytes",
           "GradNormRecorder", "LinearDecayLR", "RefinedLR", "NormalizedLRGD"]
