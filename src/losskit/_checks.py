"""Compatibility alias: validation lives in :mod:`losskit.core.checks`, the
reduction in :mod:`losskit.core.reduction`.  New code imports those."""

from losskit.core.checks import (REDUCTIONS, check_embeddings, check_finite, check_labels,  # noqa: F401
                                 check_reduction, check_sample_weight, shape_str as _shape)
from losskit.core.reduction import reduce_loss, zero_with_graph  # noqa: F401
