"""losskit.optim: torch.optim optimizers and lr schedulers, registered by kind."""

from losskit.optim.normalized_lrgd import NormalizedLRGD

__all__ = ["NormalizedLRGD"]
