"""Verification over all pairs: genuine (same class) vs impostor (different class) scores.

A pair is *accepted* at threshold t when its score >= t (scores are similarities,
or negative distances: ``metric`` is a name of the distance vocabulary,
:mod:`losskit.distances`, or a distance object).  TAR(t) = accepted genuine / genuine pairs,
FAR(t) = accepted impostor / impostor pairs.

Exact mode keeps every pair score (N(N-1)/2 of them).  For large N use the
streaming histogram mode (``pair_histograms``/``VerificationMetrics``): scores are
counted into ``bins`` equal-width bins blockwise, never stored.  The histogram ROC
is the exact ROC restricted to thresholds at bin edges, so FAR values at those
edges are exact, and TAR@FAR is under-estimated by at most the fraction of genuine
pairs in one bin (the bin holding the exact operating threshold); EER moves by at
most the larger of the genuine and impostor mass of one bin.  ``histogram_error_bound``
returns that bound for the data at hand.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from losskit.core.checks import check_finite
from losskit.distances import BaseDistance
from losskit.metrics._common import EmbeddingStore, as_embeddings, as_labels, resolve_metric

DEFAULT_CHUNK = 4096


def _as_scores(s, name: str) -> Tensor:
    if isinstance(s, np.ndarray):
        s = torch.from_numpy(s)
    if not isinstance(s, Tensor):
        s = torch.as_tensor(s)
    s = s.detach().reshape(-1)
    if not s.is_floating_point():
        s = s.double()
    return check_finite(s, name, "scores")


def _blocks(n: int, chunk: int):
    for a in range(0, n, chunk):
        for c in range(a, n, chunk):
            yield a, c


def pair_scores(embeddings, labels, metric: str | BaseDistance = "cosine",
                chunk_size: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor]:
    """Scores of all unordered pairs i < j, split into ``(genuine, impostor)`` 1-D
    tensors (same class / different class).  Computed blockwise, but the output
    itself has N(N-1)/2 entries: for very large N use :func:`pair_histograms`."""
    dist = resolve_metric(metric)
    x = as_embeddings(embeddings)
    y = as_labels(labels, x.shape[0], x.device)
    xp = dist.prepare(x)
    gen, imp = [], []
    for a, c in _blocks(x.shape[0], chunk_size):
        s, same, upper = _pair_block(xp, y, a, c, chunk_size, dist)
        gen.append(s[upper & same])
        imp.append(s[upper & ~same])
    empty = xp.new_zeros(0)
    return (torch.cat(gen) if gen else empty), (torch.cat(imp) if imp else empty)


def _pair_block(xp, y, a, c, chunk, dist):
    q, r = xp[a:a + chunk], xp[c:c + chunk]
    s = dist.scores(q, r)
    ia = torch.arange(a, a + q.shape[0], device=xp.device)
    ic = torch.arange(c, c + r.shape[0], device=xp.device)
    upper = ic[None, :] > ia[:, None]
    same = y[a:a + chunk][:, None] == y[c:c + chunk][None, :]
    return s, same, upper


def _roc_from_counts(thr: Tensor, g: Tensor, i: Tensor):
    """``thr`` descending thresholds, ``g``/``i`` counts of genuine/impostor scores
    at each threshold level; returns (far, tar, thresholds) with a leading
    (0, 0, +inf) point."""
    ng, ni = float(g.sum()), float(i.sum())
    if ng == 0:
        raise ValueError("genuine: expected at least one genuine (same-class) pair score, got none")
    if ni == 0:
        raise ValueError("impostor: expected at least one impostor (different-class) pair score, got none")
    tar = torch.cat([g.new_zeros(1), g.cumsum(0)]).double() / ng
    far = torch.cat([i.new_zeros(1), i.cumsum(0)]).double() / ni
    thr = torch.cat([thr.new_full((1,), math.inf), thr])
    return far, tar, thr


def roc_curve(genuine, impostor) -> tuple[Tensor, Tensor, Tensor]:
    """ROC over every distinct score: ``(far, tar, thresholds)``, thresholds
    descending, starting at ``(0, 0, +inf)`` and ending at ``(1, 1, min score)``.
    Same points as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``."""
    g, i = _as_scores(genuine, "genuine"), _as_scores(impostor, "impostor")
    ng, ni = g.numel(), i.numel()
    if ng == 0:
        raise ValueError("genuine: expected at least one genuine (same-class) pair score, got none")
    if ni == 0:
        raise ValueError("impostor: expected at least one impostor (different-class) pair score, got none")
    dt = torch.promote_types(g.dtype, i.dtype)
    sv, order = torch.cat([g.to(dt), i.to(dt)]).cpu().sort(descending=True)
    cum_g = (order < ng).cumsum(0)
    cum_i = torch.arange(1, ng + ni + 1) - cum_g
    last = torch.ones(ng + ni, dtype=torch.bool)
    last[:-1] = sv[1:] != sv[:-1]  # the last position of each run of equal scores
    tar = torch.cat([torch.zeros(1, dtype=torch.float64), cum_g[last].double() / ng])
    far = torch.cat([torch.zeros(1, dtype=torch.float64), cum_i[last].double() / ni])
    thr = torch.cat([sv.new_full((1,), math.inf), sv[last]])
    return far, tar, thr


def _tar_at_far_roc(far: Tensor, tar: Tensor, target: float) -> float:
    ok = far <= target + 1e-12
    return float(tar[ok].max())


def _eer_roc(far: Tensor, tar: Tensor) -> float:
    frr = 1.0 - tar
    d = frr - far  # 1 at the start, -1 at the end, non-increasing
    j = int((d <= 0).nonzero()[0])
    if d[j] == 0:
        return float(far[j])
    d0, d1 = float(d[j - 1]), float(d[j])
    t = d0 / (d0 - d1)
    return float(far[j - 1] + t * (far[j] - far[j - 1]))


def _check_far(far: float) -> float:
    if not 0.0 <= float(far) <= 1.0:
        raise ValueError(f"far: expected a false-accept rate in [0, 1], got {far}")
    return float(far)


def tar_at_far(genuine, impostor, far: float = 1e-3) -> float:
    """The highest TAR over thresholds whose FAR is <= ``far`` (no interpolation:
    only operating points the scores actually achieve)."""
    f, t, _ = roc_curve(genuine, impostor)
    return _tar_at_far_roc(f, t, _check_far(far))


def eer(genuine, impostor) -> float:
    """Equal error rate: where FRR = 1 - TAR equals FAR on the ROC curve, linearly
    interpolated between the two operating points that bracket the crossing
    (the classic ``brentq(lambda x: 1 - x - interp1d(fpr, tpr)(x), 0, 1)``)."""
    f, t, _ = roc_curve(genuine, impostor)
    return _eer_roc(f, t)


# ---------------------------------------------------------------- streaming mode

def _score_range(xp, dist, chunk) -> tuple[float, float]:
    if dist.is_similarity and dist.normalize:  # cosine, or dot on normalised rows
        return -1.0, 1.0
    lo, hi = math.inf, -math.inf
    for a, c in _blocks(xp.shape[0], chunk):
        q, r = xp[a:a + chunk], xp[c:c + chunk]
        s = dist.scores(q, r)
        lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
    return lo, hi


def pair_histograms(embeddings, labels, metric: str | BaseDistance = "cosine", bins: int = 65536,
                    range: tuple[float, float] | None = None, chunk_size: int = DEFAULT_CHUNK):
    """Stream all i < j pair scores into ``bins`` equal-width bins.

    Returns ``(edges [bins+1], genuine_counts [bins], impostor_counts [bins])``
    (int64).  ``range`` defaults to [-1, 1] for cosine (and ``dot`` with
    ``normalize=True``), else a first blockwise pass
    finds min/max.  Memory: one ``chunk_size^2`` block plus the counts."""
    dist = resolve_metric(metric)
    x = as_embeddings(embeddings)
    y = as_labels(labels, x.shape[0], x.device)
    xp = dist.prepare(x)
    lo, hi = range if range is not None else _score_range(xp, dist, chunk_size)
    if not hi > lo:
        hi = lo + 1e-6
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    gc = torch.zeros(bins, dtype=torch.int64)
    ic = torch.zeros(bins, dtype=torch.int64)
    scale = bins / (hi - lo)
    for a, c in _blocks(x.shape[0], chunk_size):
        s, same, upper = _pair_block(xp, y, a, c, chunk_size, dist)
        b = ((s.double() - lo) * scale).floor().clamp_(0, bins - 1).long().cpu()
        same, upper = same.cpu(), upper.cpu()
        gc += torch.bincount(b[upper & same], minlength=bins)
        ic += torch.bincount(b[upper & ~same], minlength=bins)
    return edges, gc, ic


def roc_from_histograms(edges: Tensor, genuine_counts: Tensor, impostor_counts: Tensor):
    """ROC at the bin lower edges (accept bin b and above at threshold edges[b])."""
    return _roc_from_counts(edges[:-1].flip(0), genuine_counts.flip(0), impostor_counts.flip(0))


def histogram_error_bound(genuine_counts: Tensor, impostor_counts: Tensor) -> dict[str, float]:
    """Worst-case error of histogram TAR@FAR (genuine mass of the fullest bin) and
    EER (the larger genuine or impostor mass of one bin)."""
    g = float(genuine_counts.max()) / max(float(genuine_counts.sum()), 1.0)
    i = float(impostor_counts.max()) / max(float(impostor_counts.sum()), 1.0)
    return {"tar": g, "eer": max(g, i)}


class VerificationMetrics(EmbeddingStore):
    """Accumulate embeddings; ``compute()`` gives TAR at each FAR in ``fars``, EER
    and ROC AUC over all pairs of everything seen since ``reset()``.

    ``mode``: ``"exact"`` (every pair score), ``"histogram"`` (streaming, see the
    module docstring for the error bound) or ``"auto"``: exact up to
    ``exact_max_pairs`` pairs (default 2e7, about N = 6,300), histogram above.
    Undefined values (no genuine or no impostor pair) are ``nan``.
    """

    def __init__(self, fars=(1e-3, 1e-2), metric: str | BaseDistance = "cosine", mode: str = "auto",
                 exact_max_pairs: int = 20_000_000, bins: int = 65536, chunk_size: int = DEFAULT_CHUNK):
        if mode not in ("auto", "exact", "histogram"):
            raise ValueError(f"mode: expected 'auto', 'exact' or 'histogram', got {mode!r}")
        self.fars = [_check_far(f) for f in fars]
        resolve_metric(metric)
        self.metric = metric
        self.mode, self.exact_max_pairs, self.bins, self.chunk_size = mode, exact_max_pairs, bins, chunk_size
        self.device = "cpu"
        self.reset()

    def roc(self):
        """``(far, tar, thresholds)`` for the accumulated data."""
        x, y = self.collected("VerificationMetrics")
        n = x.shape[0]
        exact = self.mode == "exact" or (self.mode == "auto" and n * (n - 1) // 2 <= self.exact_max_pairs)
        if exact:
            return roc_curve(*pair_scores(x, y, self.metric, self.chunk_size))
        edges, g, i = pair_histograms(x, y, self.metric, self.bins, chunk_size=self.chunk_size)
        return roc_from_histograms(edges, g, i)

    def compute(self) -> dict[str, float]:
        try:
            far, tar, _ = self.roc()
        except ValueError:
            out = {f"tar@far={f:g}": float("nan") for f in self.fars}
            out.update(eer=float("nan"), roc_auc=float("nan"))
            return out
        out = {f"tar@far={f:g}": _tar_at_far_roc(far, tar, f) for f in self.fars}
        out["eer"] = _eer_roc(far, tar)
        out["roc_auc"] = float(torch.trapezoid(tar, far))
        return out
