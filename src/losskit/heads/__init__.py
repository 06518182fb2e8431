"""losskit.heads: normalised classifiers with margin policies and scalable
softmax (dense, chunked, fused, sampled, sharded)."""

from losskit.heads.chunked import nontarget_lse
from losskit.heads.fused import fused_margin_ce
from losskit.heads.classifier import HEADS, MarginHead, select_sampled_classes
from losskit.heads.margin_spec import (ArcMargin, CFCDMargin, CombinedMargin, CosMargin, ElasticMargin,
                                       MarginPolicy, NoMargin)

__all__ = ["HEADS", "MarginHead", "select_sampled_classes", "nontarget_lse", "fused_margin_ce", "ArcMargin", "CFCDMargin",
           "CombinedMargin", "CosMargin", "ElasticMargin", "MarginPolicy", "NoMargin"]
