"""Per-sample weighting schemes (GLOW, ...)."""

from losskit.weighting.glow import GLOW, glow_weights

__all__ = ["GLOW", "glow_weights"]
