"""losskit.optim: torch.optim optimizers and lr schedulers.

* :class:`FRUGAL` (``losskit.get("frugal", params)``) and
  :func:`frugal_param_groups`, :func:`optimizer_state_bytes`;
* :class:`LinearDecayLR` (``"linear-decay"``), :class:`RefinedLR`
  (``"refined"``) and :class:`GradNormRecorder`.
"""

from losskit.optim.frugal import FRUGAL, frugal_param_groups, optimizer_state_bytes
from losskit.optim.schedules import GradNormRecorder, LinearDecayLR, RefinedLR

__all__ = ["FRUGAL", "frugal_param_groups", "optimizer_state_bytes", "GradNormRecorder", "LinearDecayLR",
           "RefinedLR"]
