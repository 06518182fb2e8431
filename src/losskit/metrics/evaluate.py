"""One-call summary of retrieval, verification and threshold consistency."""

from __future__ import annotations

from losskit.distances import BaseDistance
from losskit.metrics._common import as_embeddings, as_labels, resolve_metric
from losskit.metrics.opis import opis, opis_at, thresholds_from_impostor
from losskit.metrics.retrieval import DEFAULT_CHUNK, retrieval_summary
from losskit.metrics.verification import (
    _check_far,
    _eer_roc,
    _tar_at_far_roc,
    pair_histograms,
    pair_scores,
    roc_curve,
    roc_from_histograms,
)


def evaluate_embeddings(embeddings, labels, ks=(1, 2, 4, 8), fars=(1e-3, 1e-2), metric: str | BaseDistance = "cosine",
                        chunk_size: int = DEFAULT_CHUNK, exact_max_pairs: int = 20_000_000) -> dict[str, float]:
    """Recall@K for each K, precision@1, MAP@R (leave-one-out retrieval), TAR at each
    FAR and EER (all pairs; exact up to ``exact_max_pairs`` pairs, streaming histogram
    above, see docs/metrics.md), and OPIS (class-mean reference, FAR range 1e-2..1e-1,
    101 thresholds).  Keys, in order: ``recall@K`` ..., ``precision@1``, ``map@r``,
    ``tar@far=<f:g>`` ..., ``eer``, ``opis``.  Undefined values are ``nan`` (e.g. no
    class with two samples, or a single class for verification and OPIS).

    One kNN pass serves all retrieval metrics, and one pass over all pairs serves
    TAR, EER and OPIS's calibration range."""
    metric = resolve_metric(metric)
    fars = [_check_far(f) for f in fars]
    x = as_embeddings(embeddings)
    y = as_labels(labels, x.shape[0], x.device)
    out = retrieval_summary(x, y, ks, metric, chunk_size)
    n = x.shape[0]
    nan = float("nan")
    far_keys = [f"tar@far={f:g}" for f in fars]
    try:
        if n * (n - 1) // 2 <= exact_max_pairs:
            g, i = pair_scores(x, y, metric, chunk_size)
            far, tar, _ = roc_curve(g, i)
            thr = thresholds_from_impostor(i)
            o = opis_at(x, y, thr, metric, chunk_size=chunk_size)
        else:
            far, tar, _ = roc_from_histograms(*pair_histograms(x, y, metric, chunk_size=chunk_size))
            o = opis(x, y, metric, chunk_size=chunk_size)
    except ValueError:  # no genuine or no impostor pair
        out.update({k: nan for k in far_keys})
        out.update(eer=nan, opis=nan)
        return out
    for k, f in zip(far_keys, fars):
        out[k] = _tar_at_far_roc(far, tar, f)
    out["eer"] = _eer_roc(far, tar)
    out["opis"] = o
    return out


__all__ = ["evaluate_embeddings"]
