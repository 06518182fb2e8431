"""The bench's two errors (a leaf module: every other bench module may import it)."""

from __future__ import annotations

__all__ = ["BenchConfigError", "CellDiverged"]


class BenchConfigError(ValueError):
    """A bench configuration that cannot run (bad objective, hparam, path, resume)."""


class CellDiverged(RuntimeError):
    """A cell's loss, or what its task evaluates, became NaN or infinite."""
