"""losskit's contracts: the registry and its kinds, validation, the one
reduction, and the context values that travel with a batch.  See
docs/design.md."""

from losskit.core.checks import set_tensor_checks, tensor_checks, tensor_checks_enabled
from losskit.core.context import PairReference, PreferenceBatch
from losskit.core.reduction import reduce_loss, row_coefficients, zero_with_graph
from losskit.core.registry import KINDS, Kind, Paper, Spec, get, names, register, register_kind, spec, specs

__all__ = ["set_tensor_checks", "tensor_checks", "tensor_checks_enabled", "PairReference", "PreferenceBatch",
           "reduce_loss", "row_coefficients", "zero_with_graph", "KINDS", "Kind", "Paper", "Spec", "get", "names",
           "register", "register_kind", "spec", "specs"]
