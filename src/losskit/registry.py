"""Compatibility alias of :mod:`losskit.core.registry` (the registry lives there)."""

from losskit.core.registry import *  # noqa: F401,F403
from losskit.core.registry import __all__, _REGISTRY, _load_all  # noqa: F401
