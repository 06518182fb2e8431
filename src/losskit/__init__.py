"""losskit: training objectives from recent research, correct to the paper.

    >>> import losskit
    >>> loss = losskit.get("softmax", num_classes=10, embedding_dim=64)
"""

from losskit.registry import Paper, get, names, register, spec, specs

__version__ = "0.1.0"
__all__ = ["Paper", "get", "names", "register", "spec", "specs", "__version__"]
