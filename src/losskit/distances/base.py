"""Distance and similarity objects with row-chunked evaluation.

The one distance vocabulary of losskit (losses, episode losses, miners and
metrics all resolve names through :func:`get_distance`); see
:mod:`losskit.distances` for the table.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BaseDistance",
    "CosineSimilarity",
    "DotProductSimilarity",
    "EuclideanDistance",
    "SquaredEuclideanDistance",
    "get_distance",
    "DISTANCES",
    "DISTANCE_NAMES",
    "default_chunk_size",
]

#: values per block that ``chunks`` aims for when no chunk size is given (16 MiB of float32)
DEFAULT_BLOCK_ELEMENTS = 1 << 22


def default_chunk_size(n_rows: int, n_cols: int, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    """Rows per block so that a block holds about ``block_elements`` values."""
    return max(1, min(max(n_rows, 1), block_elements // max(n_cols, 1)))


class BaseDistance:
    """A similarity (``is_similarity=True``) or a distance between embeddings.

    ``normalize``: L2-normalise the embeddings first.
    """

    name = "base"
    is_similarity = False

    def __init__(self, normalize: bool = False):
        self.normalize = bool(normalize)

    # PML's name for the same flag
    @property
    def is_inverted(self) -> bool:
        return self.is_similarity

    def __repr__(self) -> str:
        return f"{type(self).__name__}(normalize={self.normalize})"

    def prepare(self, x: Tensor) -> Tensor:
        """The embeddings the matrix is computed from (normalised if asked)."""
        return F.normalize(x, p=2, dim=-1) if self.normalize else x

    # --- core, on prepared inputs -------------------------------------
    def _matrix(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _paired(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    # --- public --------------------------------------------------------
    def pairwise(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``[n, m]`` matrix between the rows of ``x`` and ``y`` (``y = x`` if omitted)."""
        _check_pair(x, y)
        xp = self.prepare(x)
        yp = xp if y is None else self.prepare(y)
        return self._matrix(xp, yp)

    __call__ = pairwise

    def chunks(self, x: Tensor, y: Tensor | None = None, chunk_size: int | None = None,
               prepared: bool = False) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(start, end, block)`` with ``block = pairwise(x[start:end], y)``.

        Only one ``chunk_size x m`` block is alive at a time (if the caller
        drops it); ``prepared=True`` skips normalisation (inputs already prepared).
        """
        _check_pair(x, y)
        xp = x if prepared else self.prepare(x)
        yp = xp if y is None else (y if prepared else self.prepare(y))
        n, m = xp.shape[0], yp.shape[0]
        step = chunk_size or default_chunk_size(n, m)
        if step < 1:
            raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk_size}")
        for s in range(0, n, step):
            e = min(n, s + step)
            yield s, e, self._matrix(xp[s:e], yp)

    def paired(self, x: Tensor, y: Tensor) -> Tensor:
        """Row-wise values ``d(x_i, y_i)``, shape ``[n]``."""
        if x.shape != y.shape or x.dim() != 2:
            raise ValueError(f"x, y: expected two [n, D] tensors of the same shape, got {list(x.shape)} and {list(y.shape)}")
        return self._paired(self.prepare(x), self.prepare(y))

    def margin(self, a, b):
        """How much ``a`` is farther than ``b`` (``b - a`` for a similarity, ``a - b`` for a distance)."""
        return b - a if self.is_similarity else a - b

    def closest(self, t: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """Values and indices of the closest entries along ``dim``."""
        return t.max(dim) if self.is_similarity else t.min(dim)

    def farthest_fill(self, dtype: torch.dtype) -> float:
        """A value farther than anything (``-inf`` for a similarity, ``+inf`` for a distance)."""
        return float("-inf") if self.is_similarity else float("inf")

    # --- evaluation (metrics): higher = closer, no autograd bookkeeping ---
    def sq_norms(self, y: Tensor) -> Tensor | None:
        """What :meth:`scores` can reuse across query blocks of one reference
        set (the squared row norms for the Euclidean distances; ``None`` here)."""
        return None

    def scores(self, x: Tensor, y: Tensor, y_sqnorm: Tensor | None = None) -> Tensor:
        """``[n, m]`` scores of *prepared* rows where higher means closer: the
        similarity itself, or minus the distance.  For evaluation (may work
        in place on its own temporaries); ``y_sqnorm`` is ``sq_norms(y)``."""
        s = self._matrix(x, y)
        return s if self.is_similarity else s.neg_()


class DotProductSimilarity(BaseDistance):
    """``x . y`` (a similarity; unnormalised unless ``normalize=True``)."""

    name = "dot"
    is_similarity = True

    def _matrix(self, x, y):
        return x @ y.transpose(0, 1)

    def scores(self, x, y, y_sqnorm=None):
        return x @ y.transpose(0, 1)

    def _paired(self, x, y):
        return (x * y).sum(-1)


class CosineSimilarity(DotProductSimilarity):
    """``x . y / (|x| |y|)`` (a similarity; always normalised)."""

    name = "cosine"

    def __init__(self, normalize: bool = True):
        if not normalize:
            raise ValueError("normalize: CosineSimilarity always normalises; use DotProductSimilarity for raw dot products")
        super().__init__(normalize=True)


def _safe_sqrt(d2: Tensor) -> Tensor:
    # sqrt with a zero (not NaN/inf) gradient at 0: self pairs and duplicates
    pos = d2 > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, d2, torch.ones_like(d2))), torch.zeros_like(d2))


class SquaredEuclideanDistance(BaseDistance):
    """``|x - y|^2`` (a distance), through ``|x|^2 + |y|^2 - 2 x.y`` clamped at 0."""

    name = "squared-euclidean"
    is_similarity = False

    @staticmethod
    def _expanded(x: Tensor, y: Tensor, y_sqnorm: Tensor | None = None) -> Tensor:
        # |x|^2 + |y|^2 - 2 x.y, not yet clamped (may be slightly negative)
        xx = (x * x).sum(-1, keepdim=True)
        yy = ((y * y).sum(-1) if y_sqnorm is None else y_sqnorm).unsqueeze(0)
        return xx + yy - 2.0 * (x @ y.transpose(0, 1))

    def _matrix(self, x, y):
        return self._expanded(x, y).clamp_min(0)

    def sq_norms(self, y):
        return (y * y).sum(-1)

    def scores(self, x, y, y_sqnorm=None):
        return self._expanded(x, y, y_sqnorm).clamp_min_(0).neg_()

    def _paired(self, x, y):
        return ((x - y) ** 2).sum(-1)


class EuclideanDistance(SquaredEuclideanDistance):
    """``|x - y|`` (a distance) with a zero gradient at zero distance."""

    name = "euclidean"

    def _matrix(self, x, y):
        return _safe_sqrt(super()._matrix(x, y))

    def _paired(self, x, y):
        return _safe_sqrt(super()._paired(x, y))

    def scores(self, x, y, y_sqnorm=None):
        return self._expanded(x, y, y_sqnorm).clamp_min_(0).sqrt_().neg_()


DISTANCES = {
    "cosine": CosineSimilarity,
    "dot": DotProductSimilarity,
    "euclidean": EuclideanDistance,
    "squared-euclidean": SquaredEuclideanDistance,
}


#: the vocabulary, in the order the error message lists it
DISTANCE_NAMES = tuple(DISTANCES)

#: old spellings still accepted, with a DeprecationWarning (not part of the vocabulary)
_DEPRECATED = {"squared": "squared-euclidean"}


def get_distance(distance: str | BaseDistance, normalize: bool | None = None, *,
                 name: str = "distance") -> BaseDistance:
    """The one resolver: a distance object from its name (``cosine``,
    ``dot``, ``euclidean``, ``squared-euclidean``) or the object itself.

    ``normalize`` (ignored for an object, always on for ``cosine``):
    L2-normalise the embeddings first.  ``name`` is the keyword the value
    came from, used in the error (``metric`` for the metrics).
    """
    if isinstance(distance, BaseDistance):
        return distance
    if isinstance(distance, str) and distance in _DEPRECATED:
        new = _DEPRECATED[distance]
        warnings.warn(f"{name}={distance!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3)
        distance = new
    if not isinstance(distance, str) or distance not in DISTANCES:
        raise ValueError(f"{name}: expected one of {DISTANCE_NAMES} or a BaseDistance, got {distance!r}")
    cls = DISTANCES[distance]
    if cls is CosineSimilarity:
        return cls()
    return cls(normalize=bool(normalize))


def _check_pair(x: Tensor, y: Tensor | None) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a tensor of shape [n, D], got {getattr(x, 'shape', type(x).__name__)}")
    if y is not None:
        if not isinstance(y, Tensor) or y.dim() != 2 or y.shape[1] != x.shape[1]:
            raise ValueError(
                f"y: expected a tensor of shape [m, {x.shape[1]}] (same D as x), got {getattr(y, 'shape', type(y).__name__)}"
            )
