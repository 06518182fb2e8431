"""losskit.heads: normalised classifiers with margin policies and scalable
softmax backends (dense, chunked, fused, sampled, sharded:
:mod:`losskit.heads.backends`); the autograd kernels live in
:mod:`losskit.kernels`."""

from losskit.heads.backends import BACKENDS, HeadBackend
from losskit.heads.classifier import HEADS, MarginHead, select_sampled_classes
from losskit.heads.margin_spec import (ArcMargin, CFCDMargin, CombinedMargin, CosMargin, ElasticMargin,
                                       MarginBatch, MarginPolicy, NoMargin, UNPGMargin)
from losskit.kernels.chunked_lse import nontarget_lse
from losskit.kernels.fused_margin_ce import fused_margin_ce

__all__ = ["HEADS", "BACKENDS", "HeadBackend", "MarginHead", "select_sampled_classes", "nontarget_lse",
           "fused_margin_ce", "ArcMargin", "CFCDMargin", "CombinedMargin", "CosMargin", "ElasticMargin",
           "MarginBatch", "MarginPolicy", "NoMargin", "UNPGMargin"]
