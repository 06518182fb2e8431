"""losskit: training objectives from recent research, correct to the paper.

    >>> import losskit
    >>> loss = losskit.get("softmax", num_classes=10, embedding_dim=64)
"""

from losskit.core.checks import set_tensor_checks, tensor_checks
from losskit.core.context import PairReference, PreferenceBatch
from losskit.core.registry import KINDS, Paper, get, names, register, spec, specs

__version__ = "0.1.0"
__all__ = ["KINDS", "Paper", "PairReference", "PreferenceBatch", "get", "names", "register", "set_tensor_checks",
           "spec", "specs", "tensor_checks", "__version__"]
