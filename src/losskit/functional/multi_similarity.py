"""Multi-Similarity loss (Wang et al., CVPR 2019, arXiv 1904.06627), memory-efficient.

Per anchor ``i`` with mined positives ``P~_i`` and negatives ``N~_i`` (eq. 3-4)::

    l_i = 1/alpha log(1 + sum_{k in P~_i} exp(-alpha (S_ik - lambda)))
        + 1/beta  log(1 + sum_{j in N~_i} exp( beta (S_ij - lambda)))

and the loss is ``1/m sum_i l_i`` over all ``m`` anchors (an anchor with
nothing mined contributes 0 and is still counted).

The similarity matrix is never held whole: the blocks and their autograd
Function live in :mod:`losskit.kernels.multi_similarity` (memory
``O(chunk_size x M)``; with ``reduction`` 'mean' or 'sum' the gradient is
built during forward from ``core.reduction.row_coefficients``).
"""

from __future__ import annotations

from torch import Tensor

from losskit.core.checks import check_bool, check_hparam, check_int
from losskit.core.context import PairReference
from losskit.core.reduction import reduce_loss, row_coefficients
from losskit.distances import BaseDistance, get_distance
from losskit.functional.pair import PairInputs
from losskit.kernels.multi_similarity import MSConfig, compute_dtype, multi_similarity_rows

__all__ = ["multi_similarity_loss", "check_multi_similarity_hparams"]


def check_multi_similarity_hparams(alpha, beta, lam, epsilon, distance, mining, official_positive_filter,
                                   chunk_size) -> tuple[BaseDistance, MSConfig]:
    """Validate the Multi-Similarity hyperparameters; returns the similarity and the kernel config."""
    cfg = MSConfig(check_hparam("alpha", alpha, low=0, low_open=True), check_hparam("beta", beta, low=0, low_open=True),
                   check_hparam("lam", lam), check_hparam("epsilon", epsilon, low=0), check_bool("mining", mining),
                   check_bool("official_positive_filter", official_positive_filter),
                   check_int("chunk_size", chunk_size, low=1, allow_none=True))
    dist = get_distance(distance)
    if not dist.is_similarity:
        raise ValueError(f"distance: Multi-Similarity needs a similarity ('cosine' or 'dot'), got {distance!r}")
    return dist, cfg


def multi_similarity_loss(embeddings: Tensor, labels: Tensor, alpha: float = 2.0, beta: float = 50.0, lam: float = 1.0,
                          epsilon: float = 0.1, reduction: str = "mean", sample_weight: Tensor | None = None, *,
                          distance: str | BaseDistance = "cosine", mining: bool = True,
                          official_positive_filter: bool = False, chunk_size: int | None = None,
                          reference: PairReference | None = None) -> Tensor:
    """Multi-Similarity loss with the paper's mining (``mining=True``) and pair weighting.

    ``lam`` is the paper's lambda (PML: ``base``; official code: ``thresh``).
    ``reference``: score the anchors against another set (a memory, other
    ranks).  ``official_positive_filter`` also drops positives with
    ``S >= 1 - 1e-5`` as the official code does.  ``chunk_size``: anchor rows
    per block (None: about 4M values per block).
    """
    dist, cfg = check_multi_similarity_hparams(alpha, beta, lam, epsilon, distance, mining,
                                               official_positive_filter, chunk_size)
    b = PairInputs(embeddings, labels, reduction, sample_weight, reference)
    if b.empty:
        return b.zeros()
    q = dist.prepare(embeddings)
    ref = b.ref
    # the batch as its own reference goes in once (r None): one gradient buffer, and torch.compile can trace it
    r, r_labels = (None, None) if ref.is_batch else (dist.prepare(ref.embeddings), ref.labels)
    if reduction == "none":
        per = multi_similarity_rows(q, r, labels, r_labels, ref.self_index, cfg)
        return reduce_loss(per, "none", b.weight, checked=True)
    coef = row_coefficients(b.B, reduction, b.weight, dtype=compute_dtype(q), device=q.device)
    return multi_similarity_rows(q, r, labels, r_labels, ref.self_index, cfg, coef)
