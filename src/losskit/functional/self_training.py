"""Self-training: prediction margins and pseudo-label threshold policies.

Amini, Feofanov, Pauletto, Hadjadj, Devijver, Maximov, "Self-Training: A
Survey" (2022, arXiv:2202.12040); the transductive "auto"
threshold is the multi-class bound of Feofanov, Devijver and Amini,
"Transductive Bounds for the Multi-Class Majority Vote Classifier" (AAAI 2019).

Everything here is pure math on a ``[N, C]`` matrix of class probabilities
(``predict_proba``); the loop that refits the classifier is
:func:`losskit.recipes.self_training.run_self_training`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losskit.core.checks import check_choice, check_hparam, check_int, shape_str

__all__ = ["check_probabilities", "prediction_margins", "select_pseudo_labels", "transductive_bound",
           "transductive_thresholds", "MARGINS", "POLICIES"]

MARGINS = ("max", "top2")
POLICIES = ("fixed", "mean", "curriculum", "auto", "top-k")


def check_probabilities(proba, name: str = "proba", tol: float = 1e-3) -> Tensor:
    """A floating ``[N, C]`` tensor of probabilities: finite, in [0, 1], rows summing to 1."""
    if not isinstance(proba, Tensor):
        proba = torch.as_tensor(proba)
    if proba.dim() != 2:
        raise ValueError(f"{name}: expected class probabilities of shape [N, C], got {shape_str(proba)}")
    if not proba.is_floating_point():
        proba = proba.double()
    if proba.numel():
        p = proba.detach()
        if not bool(torch.isfinite(p).all()) or float(p.min()) < -tol or float(p.max()) > 1 + tol:
            raise ValueError(f"{name}: expected finite probabilities in [0, 1], got values in "
                             f"[{float(p.min())}, {float(p.max())}]")
        s = p.sum(1)
        if float((s - 1).abs().max()) > tol:
            raise ValueError(f"{name}: expected rows summing to 1 (predict_proba), got row sums in "
                             f"[{float(s.min())}, {float(s.max())}]")
    return proba


def prediction_margins(proba, margin: str = "max") -> Tensor:
    """Confidence of each prediction: ``"max"`` = max_c p_c (the survey's
    unsigned margin), ``"top2"`` = top-1 minus top-2 probability.  ``[N]``."""
    proba = check_probabilities(proba)
    check_choice("margin", margin, MARGINS)
    if proba.shape[1] == 1:
        return proba[:, 0].clone() if margin == "max" else torch.ones_like(proba[:, 0])
    top = proba.topk(2, dim=1).values
    return top[:, 0] if margin == "max" else top[:, 0] - top[:, 1]


def transductive_bound(proba: Tensor, k: int, theta: float, grid: int = 50) -> float:
    """Feofanov et al.'s (2019) bound on the conditional Bayes error of the
    points predicted as class ``k`` with vote ``m(x, k) >= theta``.

    With votes ``m(x, c) = p(c | x)`` on the unlabelled set (size ``u``),
    ``l_i = sum_x m(x, i)`` (the expected class sizes) and, for a true class
    ``i != k`` and ``gamma`` in ``(theta, 1]``::

        I_ik = sum_{theta <= m(x,k) < gamma} m(x,i) / l_i
        K_ik = sum_{pred(x) = k} m(x,i) m(x,k) / l_i          (Gibbs confusion)
        M_ik(t) = sum_{m(x,k) < t} m(x,i) m(x,k) / l_i
        C_ik(theta) = inf_gamma I_ik + [K_ik + M_ik(theta) - M_ik(gamma)]_+ / gamma

    the joint risk is ``(1/u) sum_{i != k} l_i C_ik(theta)`` and the bound is
    that divided by ``pi_k(theta) = (1/u) #{pred(x) = k, m(x, k) >= theta}``.
    ``gamma`` runs over ``theta + (1 - theta) n / grid``, ``n = 1..grid`` (the
    authors' code); this is the naive, per-point definition used by the tests.
    """
    proba = check_probabilities(proba).double()
    u, C = proba.shape
    pred = proba.argmax(1)
    mk = proba[:, k]
    sel = ((mk >= theta) & (pred == k)).sum().item()
    pi = max(sel / u, 1e-15)
    joint = 0.0
    for i in range(C):
        if i == k:
            continue
        mi = proba[:, i]
        li = float(mi.sum())
        if li <= 0:
            continue
        K = float((mi * (pred == k) * mk).sum()) / li
        Mt = float((mi * (mk < theta) * mk).sum()) / li
        best = float("inf")
        for n in range(1, grid + 1):
            g = theta + (1 - theta) * n / grid
            if g <= 0:
                continue
            I = float((mi * ((mk >= theta) & (mk < g))).sum()) / li
            Mg = float((mi * (mk < g) * mk).sum()) / li
            best = min(best, I + max(K + Mt - Mg, 0.0) / g)
        joint += li * best
    return joint / u / pi


def _bounds_vectorised(proba: Tensor, k: int, thetas: Tensor, grid: int) -> Tensor:
    """:func:`transductive_bound` for every ``theta`` in ``thetas`` at once: ``[T]``."""
    u, C = proba.shape
    pred = proba.argmax(1)
    mk = proba[:, k]                                               # [u]
    others = [i for i in range(C) if i != k]
    mi = proba[:, others]                                          # [u, C-1]
    li = mi.sum(0).clamp_min(1e-300)                               # [C-1]
    steps = torch.arange(1, grid + 1, dtype=proba.dtype, device=proba.device) / grid
    gam = thetas[:, None] + (1 - thetas[:, None]) * steps[None, :]  # [T, G]
    K = ((pred == k).to(proba.dtype) * mk) @ mi / li               # [C-1]
    w = mi * mk[:, None]                                           # [u, C-1]
    below_t = (mk[None, :] < thetas[:, None]).to(proba.dtype)      # [T, u]
    Mt = below_t @ w / li                                          # [T, C-1]
    below_g = (mk[None, None, :] < gam[:, :, None]).to(proba.dtype)  # [T, G, u]
    Mg = torch.einsum("tgu,uc->tgc", below_g, w) / li              # [T, G, C-1]
    in_band = below_g * (1 - below_t)[:, None, :]                  # theta <= m < gamma
    I = torch.einsum("tgu,uc->tgc", in_band, mi) / li              # [T, G, C-1]
    A = (K[None, None, :] + Mt[:, None, :] - Mg).clamp_min(0)
    Cb = (I + A / gam[:, :, None].clamp_min(1e-300)).amin(1)       # [T, C-1]
    valid = li > 1e-300
    joint = (Cb * li * valid).sum(1) / u                           # [T]
    sel = ((mk[None, :] >= thetas[:, None]) & (pred == k)[None, :]).sum(1).to(proba.dtype)
    return joint / (sel / u).clamp_min(1e-15)


def transductive_thresholds(proba, grid: int = 50) -> Tensor:
    """Per-class thresholds ``theta_k`` minimising :func:`transductive_bound`
    over ``theta in min_x m(x,k) + (max - min) n / grid``, ``n = 0..grid-1``
    (the MSLA of Feofanov et al. 2019).  The authors' code stops the search at
    the first two consecutive increases of the bound; we search the whole grid
    (the bound is not convex in theta).  ``[C]``; a class that no point is
    predicted as gets threshold 1 (nothing is selected for it)."""
    proba = check_probabilities(proba).double()
    grid = check_int("grid", grid, low=1)
    u, C = proba.shape
    out = torch.ones(C, dtype=torch.float64, device=proba.device)
    if u == 0 or C < 2:
        return out
    pred = proba.argmax(1)
    for k in range(C):
        if not bool((pred == k).any()):
            continue
        lo, hi = float(proba[:, k].min()), float(proba[:, k].max())
        thetas = lo + torch.arange(grid, dtype=torch.float64, device=proba.device) * (hi - lo) / grid
        b = _bounds_vectorised(proba, k, thetas, grid)
        out[k] = thetas[int(b.argmin())]
    return out


def select_pseudo_labels(proba, policy: str = "fixed", *, threshold=0.75, margin: str = "max", k_best: int = 10,
                         round_index: int = 0, delta: float = 0.2, grid: int = 50,
                         reference_margins: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Which unlabelled points get a pseudo-label this round.

    Returns ``(selected [N] bool, labels [N] long, thresholds [C])``: the
    pseudo-label is ``argmax_c p_c``; a point is selected when its margin
    (``margin="max"`` or ``"top2"``) is ``> thresholds[label]`` (strictly
    greater, as scikit-learn's ``SelfTrainingClassifier``), except for
    ``"auto"``, which keeps ``>=`` as its paper.

    * ``"fixed"``: ``threshold`` in [0, 1], one number or one per class;
    * ``"mean"``: the mean margin of the given points;
    * ``"curriculum"``: the ``1 - (round_index + 1) * delta`` quantile of
      ``reference_margins`` (default: the given points' margins), so each
      round admits ``delta`` more of the pool (Cascante-Bonilla et al. 2021);
    * ``"auto"``: :func:`transductive_thresholds` (votes = probabilities;
      the ``max`` margin is used whatever ``margin`` says, as the bound is
      defined on votes);
    * ``"top-k"``: the ``k_best`` points with the largest margins.
    """
    proba = check_probabilities(proba)
    check_choice("policy", policy, POLICIES)
    n, C = proba.shape
    labels = proba.argmax(1) if C else torch.zeros(n, dtype=torch.long)
    m = prediction_margins(proba, "max" if policy == "auto" else margin)
    dev, dt = proba.device, proba.dtype
    if policy == "fixed":
        if isinstance(threshold, (list, tuple)) or (isinstance(threshold, Tensor) and threshold.numel() > 1):
            th = torch.as_tensor(threshold, dtype=dt, device=dev).flatten()
            if th.numel() != C:
                raise ValueError(f"threshold: expected one number or one per class ({C}), got {th.numel()} values")
            if not bool(torch.isfinite(th).all()) or float(th.min()) < 0 or float(th.max()) > 1:
                raise ValueError(f"threshold: expected values in [0, 1], got {th.tolist()}")
        else:
            th = torch.full((C,), check_hparam("threshold", threshold, low=0.0, high=1.0), dtype=dt, device=dev)
        return m > th[labels], labels, th
    if policy == "mean":
        v = float(m.mean()) if n else 1.0
        th = torch.full((C,), v, dtype=dt, device=dev)
        return m > th[labels], labels, th
    if policy == "curriculum":
        delta = check_hparam("delta", delta, low=0.0, high=1.0, low_open=True)
        round_index = check_int("round_index", round_index, low=0)
        ref = m if reference_margins is None else torch.as_tensor(reference_margins, dtype=dt, device=dev)
        q = max(0.0, 1.0 - (round_index + 1) * delta)
        v = float(torch.quantile(ref.double(), q)) if ref.numel() else 1.0
        th = torch.full((C,), v, dtype=dt, device=dev)
        sel = m > th[labels] if q > 0 else torch.ones(n, dtype=torch.bool, device=dev)
        return sel, labels, th
    if policy == "auto":
        th = transductive_thresholds(proba, grid).to(dt)
        return m >= th[labels], labels, th
    k_best = check_int("k_best", k_best, low=1)
    sel = torch.zeros(n, dtype=torch.bool, device=dev)
    if n:
        idx = torch.topk(m, min(k_best, n)).indices
        sel[idx] = True
    th = torch.full((C,), float(m[sel].min()) if n else 1.0, dtype=dt, device=dev)
    return sel, labels, th
