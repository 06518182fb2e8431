"""Per-sample weighting policies (registry kind ``weighter``), one interface
(:class:`losskit.weighting.base.Weighter`): ``weights = policy(losses, sample_ids=None)``
gives detached ``[B]`` weights for any objective's ``sample_weight``.

* :mod:`~losskit.weighting.loss_based`: Sow et al.'s LinUpper, Quadratic and Extremes (ICLR 2025);
* :mod:`~losskit.weighting.glow`: GLOW, gain-based weights from a per-sample loss history (2026).
"""

from losskit.weighting.base import Weighter, check_sample_ids
from losskit.weighting.glow import GLOW, glow_weights
from losskit.weighting.loss_based import (STRATEGIES, Extremes, LinUpper, LossReweighting, Quadratic,
                                          loss_reweighting_weights)

__all__ = ["Weighter", "check_sample_ids", "GLOW", "glow_weights", "LossReweighting", "LinUpper", "Quadratic",
           "Extremes", "loss_reweighting_weights", "STRATEGIES"]
