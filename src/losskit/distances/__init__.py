"""losskit.distances: similarity and distance objects -- the one distance
vocabulary of losskit.

Every loss, episode loss, miner and metric that takes a distance resolves it
with :func:`get_distance` (losses and miners spell the keyword
``distance=``, the metrics ``metric=``); an unknown name gives the same
error everywhere, listing the valid names.

==================  ============================  ============================  ==========
name                class                         value                         direction
==================  ============================  ============================  ==========
cosine              ``CosineSimilarity``          ``x.y / (|x| |y|)``           similarity
dot                 ``DotProductSimilarity``      ``x.y``                       similarity
euclidean           ``EuclideanDistance``         ``|x - y|`` (zero grad at 0)  distance
squared-euclidean   ``SquaredEuclideanDistance``  ``|x - y|^2``                 distance
==================  ============================  ============================  ==========

``normalize=True`` L2-normalises the embeddings first (for every name;
cosine always does).  An object (a :class:`BaseDistance`, e.g.
``EuclideanDistance(normalize=True)``) is accepted wherever a name is.
Metrics score by "higher is closer": a similarity itself, or minus the
distance (:meth:`BaseDistance.scores`).

Every object has ``is_similarity`` (larger means closer; PML calls this
``is_inverted``), ``pairwise(x, y)`` for the full ``[n, m]`` matrix,
``chunks(x, y, chunk_size)`` that yields row blocks so that a large batch
never holds more than ``chunk_size x m`` values at once, ``paired(x, y)``
for row-wise values, ``margin(a, b)`` -- how much ``a`` is farther than
``b`` in this distance's direction (``b - a`` for a similarity) --,
``closest``/``farthest_fill``, and ``scores(x, y)`` (higher = closer, for
evaluation).
"""

from losskit.distances.base import *  # noqa: F401,F403  (the public names are base's __all__)
from losskit.distances.base import __all__  # noqa: F401
