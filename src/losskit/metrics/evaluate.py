"""One-call summary of retrieval, verification and threshold consistency."""

from __future__ import annotations

import warnings

import torch

from losskit.metrics._common import as_embeddings, as_labels, check_metric
from losskit.metrics.opis import opis
from losskit.metrics.retrieval import DEFAULT_CHUNK, map_at_r, precision_at_1, recall_at_k
from losskit.metrics.verification import VerificationMetrics


def evaluate_embeddings(embeddings, labels, ks=(1, 2, 4, 8), fars=(1e-3, 1e-2), metric: str = "cosine",
                        chunk_size: int = DEFAULT_CHUNK, exact_max_pairs: int = 20_000_000) -> dict[str, float]:
    """Recall@K for each K, precision@1, MAP@R (leave-one-out retrieval), TAR at each
    FAR and EER (all pairs; exact up to ``exact_max_pairs`` pairs, streaming histogram
    above), and OPIS.  Keys: ``recall@1`` ..., ``precision@1``, ``map@r``,
    ``tar@far=0.001`` ..., ``eer``, ``opis``.  Undefined values are ``nan``
    (e.g. no class with two samples, or a single class for verification)."""
    check_metric(metric)
    x = as_embeddings(embeddings)
    y = as_labels(labels, x.shape[0], x.device)
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for k, v in recall_at_k(x, y, ks, metric, chunk_size).items():
            out[f"recall@{k}"] = v
        out["precision@1"] = precision_at_1(x, y, metric, chunk_size)
        out["map@r"] = map_at_r(x, y, metric, chunk_size)
    vm = VerificationMetrics(fars, metric, exact_max_pairs=exact_max_pairs, chunk_size=chunk_size)
    vm.update(x, y)
    ver = vm.compute()
    for f in fars:
        out[f"tar@far={float(f):g}"] = ver[f"tar@far={float(f):g}"]
    out["eer"] = ver["eer"]
    try:
        out["opis"] = opis(x, y, metric, chunk_size=chunk_size)
    except ValueError:
        out["opis"] = float("nan")
    return out
