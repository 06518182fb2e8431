"""losskit.distances: similarity and distance objects.

Every object has ``is_similarity`` (larger means closer; PML calls this
``is_inverted``), ``pairwise(x, y)`` for the full ``[n, m]`` matrix,
``chunks(x, y, chunk_size)`` that yields row blocks so that a large batch
never holds more than ``chunk_size x m`` values at once, ``paired(x, y)``
for row-wise values, and ``margin(a, b)`` -- how much ``a`` is farther than
``b`` in this distance's direction (``b - a`` for a similarity).
"""

from losskit.distances.base import *  # noqa: F401,F403  (the public names are base's __all__)
from losskit.distances.base import __all__  # noqa: F401
