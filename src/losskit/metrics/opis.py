"""OPIS and epsilon-OPIS (Zhang et al., "Threshold-Consistent Margin Loss for
Open-World Deep Metric Learning", ICLR 2024, arXiv 2307.04047).

See docs/metrics.md for the protocol and what was verified against the paper.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from losskit.distances import BaseDistance
from losskit.metrics._common import as_embeddings, as_labels, resolve_metric
from losskit.metrics.verification import DEFAULT_CHUNK, pair_histograms, pair_scores


def calibration_thresholds(embeddings, labels, metric: str | BaseDistance = "cosine", far_range=(1e-2, 1e-1),
                           num_thresholds: int = 101, exact_max_pairs: int = 20_000_000,
                           chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """``num_thresholds`` equally spaced thresholds spanning the calibration range:
    from the threshold where the overall FAR is ``far_range[1]`` to the one where it
    is ``far_range[0]``.  The threshold for FAR f is the (1 - f) quantile (linear
    interpolation) of all impostor pair scores: exact up to ``exact_max_pairs``
    pairs, else read from a 65,536-bin streaming histogram (error < one bin width)."""
    lo_far, hi_far = (float(f) for f in far_range)
    if not 0.0 < lo_far < hi_far < 1.0:
        raise ValueError(f"far_range: expected (low, high) with 0 < low < high < 1, got {far_range!r}")
    if not isinstance(num_thresholds, int) or num_thresholds < 2:
        raise ValueError(f"num_thresholds: expected an int >= 2, got {num_thresholds!r}")
    x = as_embeddings(embeddings)
    n = x.shape[0]
    if n * (n - 1) // 2 <= exact_max_pairs:
        _, imp = pair_scores(x, labels, metric, chunk_size)
        return thresholds_from_impostor(imp, far_range, num_thresholds)
    else:
        edges, _, ic = pair_histograms(x, labels, metric, chunk_size=chunk_size)
        if int(ic.sum()) == 0:
            raise ValueError("labels: OPIS needs impostor pairs (at least two classes), got one class")
        cum = ic.flip(0).cumsum(0).double() / float(ic.sum())  # FAR at each lower edge, descending edges
        lower = edges[:-1].flip(0)

        def at(f):
            j = int(torch.searchsorted(cum, torch.tensor([f], dtype=torch.float64)))
            return float(lower[min(j, lower.numel() - 1)])

        t_lo, t_hi = at(hi_far), at(lo_far)
    return torch.linspace(t_lo, t_hi, num_thresholds, dtype=torch.float64)


def thresholds_from_impostor(impostor: Tensor, far_range=(1e-2, 1e-1), num_thresholds: int = 101) -> Tensor:
    """The calibration grid of :func:`calibration_thresholds` from given impostor scores."""
    lo_far, hi_far = (float(f) for f in far_range)
    if impostor.numel() == 0:
        raise ValueError("labels: OPIS needs impostor pairs (at least two classes), got one class")
    q = np.quantile(impostor.double().cpu().numpy(), [1.0 - hi_far, 1.0 - lo_far])
    return torch.linspace(float(q[0]), float(q[1]), num_thresholds, dtype=torch.float64)


def class_utilities(embeddings, labels, thresholds: Tensor, metric: str | BaseDistance = "cosine",
                    chunk_size: int = DEFAULT_CHUNK):
    """Per-class and overall utility at each threshold.

    For class c and threshold d: TPR_c(d) = share of genuine pairs within c with
    score >= d, TNR_c(d) = share of impostor pairs with one member in c with score < d,
    U_c(d) = 2 TPR TNR / (TPR + TNR) (0 when both are 0).  The overall utility
    uses all pairs.  Returns ``(classes [T], U [T, K], U_all [K])`` for the T classes
    that have at least two samples.  Streams blockwise; memory O(chunk^2 + N K)."""
    dist = resolve_metric(metric)
    x = as_embeddings(embeddings)
    y = as_labels(labels, x.shape[0], x.device)
    xp = dist.prepare(x)
    thr = thresholds.to(torch.float64).cpu()
    K = thr.numel()
    classes, yi = torch.unique(y.cpu(), return_inverse=True)
    C, n = classes.numel(), x.shape[0]
    # counts[c, b, same]: ordered pairs (i in c, j != i) whose score passes exactly b
    # thresholds; same = 1 for genuine pairs, 0 for impostor pairs
    K1 = K + 1
    counts = torch.zeros(C * K1 * 2, dtype=torch.int64)
    yi_dev = yi.to(xp.device)
    thr_dev = thr.to(device=xp.device, dtype=xp.dtype)  # float32 inputs compare in float32
    for a in range(0, n, chunk_size):
        q = xp[a:a + chunk_size]
        ya = yi_dev[a:a + chunk_size]
        for c in range(0, n, chunk_size):
            s = dist.scores(q, xp[c:c + chunk_size])
            b = torch.bucketize(s, thr_dev, right=True)  # number of thresholds <= score
            same = (ya[:, None] == yi_dev[c:c + chunk_size][None, :]).long()
            code = (ya[:, None] * K1 + b) * 2 + same
            counts += torch.bincount(code.view(-1), minlength=C * K1 * 2).cpu()
            if a == c:  # remove the self pairs (the block diagonal)
                dcode = (ya * K1 + b.diagonal()) * 2 + 1
                counts -= torch.bincount(dcode, minlength=C * K1 * 2).cpu()
    counts = counts.view(C, K1, 2)
    gcount, icount = counts[:, :, 1], counts[:, :, 0]
    # accepted at threshold k <=> passes more than k thresholds
    g_acc = gcount.flip(1).cumsum(1).flip(1)[:, 1:].double()  # [C, K]
    i_acc = icount.flip(1).cumsum(1).flip(1)[:, 1:].double()
    g_tot, i_tot = gcount.sum(1).double(), icount.sum(1).double()

    def util(ga, gt, ia, it):
        tpr = ga / gt
        tnr = 1.0 - ia / it
        den = tpr + tnr
        return torch.where(den > 0, 2 * tpr * tnr / den.clamp_min(1e-300), torch.zeros_like(den))

    keep = (g_tot > 0) & (i_tot > 0)
    U = util(g_acc[keep], g_tot[keep, None], i_acc[keep], i_tot[keep, None])
    U_all = util(g_acc.sum(0), g_tot.sum(), i_acc.sum(0), i_tot.sum())
    return classes[keep], U, U_all


REFERENCES = ("class_mean", "pooled")


def opis(embeddings, labels, metric: str | BaseDistance = "cosine", far_range=(1e-2, 1e-1), num_thresholds: int = 101,
         reference: str = "class_mean", chunk_size: int = DEFAULT_CHUNK) -> float:
    """OPIS = (1/T) sum_c  mean_d (U_c(d) - Ubar(d))^2 over ``num_thresholds``
    equally spaced thresholds d of the calibration range (the paper's integral with
    a uniform weight w(d), by an equal-weight sum over the grid).  Lower is more
    threshold-consistent.

    ``reference="class_mean"`` (default): Ubar(d) = mean of U_c(d) over the T
    classes, so OPIS is the across-class variance of the utility averaged over the
    range.  ``"pooled"``: Ubar(d) = the utility computed from all pairs at once.
    ``nan`` only when no class has two samples (no genuine pair)."""
    thr = calibration_thresholds(embeddings, labels, metric, far_range, num_thresholds, chunk_size=chunk_size)
    return opis_at(embeddings, labels, thr, metric, reference, chunk_size)


def opis_at(embeddings, labels, thresholds: Tensor, metric: str | BaseDistance = "cosine", reference: str = "class_mean",
            chunk_size: int = DEFAULT_CHUNK) -> float:
    """OPIS over a given threshold grid (see :func:`opis`)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference: expected one of {REFERENCES}, got {reference!r}")
    _, U, U_all = class_utilities(embeddings, labels, thresholds, metric, chunk_size)
    if U.shape[0] == 0:
        return float("nan")
    ref = U.mean(0) if reference == "class_mean" else U_all
    return float(((U - ref[None, :]) ** 2).mean())


def epsilon_opis(embeddings, labels, epsilon: float = 0.05, metric: str | BaseDistance = "cosine", far_range=(1e-2, 1e-1),
                 num_thresholds: int = 101, chunk_size: int = DEFAULT_CHUNK) -> float:
    """epsilon-OPIS = mean_d (U_worst(d) - U_best(d))^2, where at each threshold
    U_worst / U_best are the mean utilities of the ceil(epsilon T) classes with the
    lowest / highest utility."""
    if not 0.0 < float(epsilon) <= 0.5:
        raise ValueError(f"epsilon: expected a fraction in (0, 0.5], got {epsilon}")
    thr = calibration_thresholds(embeddings, labels, metric, far_range, num_thresholds, chunk_size=chunk_size)
    _, U, _ = class_utilities(embeddings, labels, thr, metric, chunk_size)
    T = U.shape[0]
    if T == 0:
        return float("nan")
    m = max(1, math.ceil(epsilon * T))
    srt = U.sort(dim=0).values
    worst, best = srt[:m].mean(0), srt[-m:].mean(0)
    return float(((worst - best) ** 2).mean())
