"""Federated learning math: client losses and server aggregation rules (pure tensors).

* FedLD (Zeng et al., "Tackling Data Heterogeneity in Federated Learning via
  Loss Decomposition", MICCAI 2024, arXiv:2408.12300; code Zeng-Shuang/FedLD):
  :func:`margin_control_loss` (the local loss) and
  :func:`principal_gradient_aggregate` (the server's principal-gradient rule).
* FedLEx (Interno et al., "Federated Loss Exploration for Improved Convergence
  on Non-IID Data", IJCNN 2024, arXiv:2506.18640; code ChristianInterno/FedLEx):
  :func:`guidance_matrix`.
* FedAvg (McMahan et al., 2017, arXiv:1602.05629): :func:`weighted_mean`;
  FedProx (Li et al., 2020, arXiv:1812.06127): :func:`proximal_term`.

These act on one tensor (or one stacked set of client tensors) at a time; the
recipes in :mod:`losskit.recipes.federated` and the Flower strategies in
:mod:`losskit.integrations.flower` apply them per model tensor.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit.core.checks import (check_embeddings, check_finite, check_hparam, check_labels,
                                 check_sample_weight, shape_str)
from losskit.core.reduction import reduce_loss

__all__ = ["margin_control_loss", "principal_gradient_aggregate", "weighted_mean", "guidance_matrix",
           "proximal_term"]


def margin_control_loss(logits: Tensor, labels: Tensor, lam: float = 0.03, reduction: str = "mean",
                        sample_weight: Tensor | None = None) -> Tensor:
    """FedLD's local loss: ``CE(Z, y) + lam * log(1 + ||softmax(Z)||_F^2)``.

    ``Z`` is the ``[B, C]`` logit matrix of the batch and the Frobenius norm
    runs over the whole batch (official code: ``torch.norm(softmax(Z))`` with
    no dim).  Row ``i``'s loss is ``CE_i + lam * R`` with the batch term
    ``R = log(1 + sum_j w_j ||softmax(z_j)||^2)`` (``w`` = ``sample_weight``,
    ones by default), so ``reduction='mean'`` with no weights is exactly the
    official ``CE.mean() + lam * log(1 + ||P||_F^2)``, and a row of weight 0
    has no influence on the loss (it is not in ``R``).  ``lam`` 0.03 is the
    official default (``--margin_loss_penalty``).
    """
    check_embeddings(logits, "logits")
    labels = check_labels(labels, logits.shape[0], device=logits.device, num_classes=logits.shape[1])
    lam = check_hparam("lam", lam, low=0)
    w = check_sample_weight(sample_weight, logits.shape[0], logits)
    ce = F.cross_entropy(logits, labels, reduction="none")
    sq = torch.softmax(logits, dim=1).pow(2).sum(1)
    r = torch.log1p(sq.sum() if w is None else (w * sq).sum())
    return reduce_loss(ce + lam * r, reduction, w, checked=True)


def principal_gradient_aggregate(deltas: Tensor, k_proportion: float = 0.8, eps: float = 1e-12) -> Tensor:
    """FedLD's principal-gradient aggregation of ``m`` client updates ``G`` ``[m, d]`` -> ``[d]``.

    1. ``H = G G^T / m``, ``H = E diag(s) E^T`` (``s`` descending);
       principal directions ``w_j = G^T e_j``.
    2. Keep ``k = max(1, int(k_proportion * m))`` directions; flip ``w_j`` when
       fewer clients have ``<g_i, w_j> >= 0`` than ``< 0`` (ties count as
       positive, as in the official code).
    3. ``g^_i = sum_{j<k} sign(<g_i, w_j>) (s_j / sum_all s) ||g_i|| w_j / ||w_j||``,
       and the result is ``mean_i g^_i``.

    Deviations from ``svd_tools.pcgrad_svd``: norms are clamped at ``eps``
    (the official code divides by ``||proj||``, which is 0 -- NaN -- for every
    direction orthogonal to a client; identical client updates hit this for
    all but the first direction); ``m`` is the number of rows given, not the
    number of registered users (partial participation); ``k`` is at least 1
    (``int(0.8 * 1) = 0`` would make one client's update vanish).  With all
    ``g_i`` equal the result is that ``g`` (FedAvg).  Computed in float64.
    """
    if not isinstance(deltas, Tensor) or deltas.dim() != 2:
        got = shape_str(deltas) if isinstance(deltas, Tensor) else type(deltas).__name__
        raise ValueError(f"deltas: expected a [clients, numel] tensor, got {got}")
    if deltas.shape[0] < 1:
        raise ValueError("deltas: expected at least one client update, got 0 rows")
    k_proportion = check_hparam("k_proportion", k_proportion, low=0, high=1, low_open=True)
    eps = check_hparam("eps", eps, low=0, low_open=True)
    check_finite(deltas, "deltas")
    g = deltas.double()
    m = g.shape[0]
    s, e = torch.linalg.eigh(g @ g.T / m)  # ascending; H is symmetric PSD (svd in the official code)
    s, e = s.flip(0).clamp_min(0), e.flip(1)
    total = s.sum()
    if float(total) <= eps:  # every update is zero
        return torch.zeros(g.shape[1], dtype=deltas.dtype, device=deltas.device)
    k = max(1, int(m * k_proportion))
    w = (g.T @ e[:, :k]).T  # [k, d]
    proj = g @ w.T  # [m, k]
    flip = (proj >= 0).sum(0) < (proj < 0).sum(0)
    sign_w = torch.where(flip, -1.0, 1.0).to(g)
    w = w * sign_w[:, None]
    proj = proj * sign_w[None, :]
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(eps)
    coef = torch.sign(proj) * (s[:k] / total)[None, :] * g.norm(dim=1, keepdim=True)  # [m, k]
    return (coef @ unit).mean(0).to(deltas.dtype)


def weighted_mean(stacked: Tensor, weights: Tensor | Iterable[float] | None = None) -> Tensor:
    """FedAvg's ``sum_i n_i x_i / sum_i n_i`` over the first dimension (plain mean without weights)."""
    if weights is None:
        return stacked.mean(0)
    w = torch.as_tensor(list(weights) if not isinstance(weights, Tensor) else weights, dtype=torch.float64)
    if w.dim() != 1 or w.shape[0] != stacked.shape[0]:
        raise ValueError(f"weights: expected shape [{stacked.shape[0]}] (one per client), got {shape_str(w)}")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
        raise ValueError(f"weights: expected finite non-negative weights with a positive sum, got {w.tolist()}")
    w = (w / w.sum()).to(stacked.device)
    out = torch.tensordot(w, stacked.double(), dims=1)
    return out.to(stacked.dtype)


def guidance_matrix(base: Tensor, scouts: Tensor, eps: float = 1e-12) -> Tensor:
    """FedLEx's guidance for one tensor: ``minmax(mean_k (theta_k - theta_base)^2)`` in ``[0, 1]``.

    ``scouts`` is ``[K, *base.shape]`` (the K exploration copies after
    training); the min-max runs over the tensor's elements.  A tensor whose
    spread is constant (max - min <= eps, for example a single-element bias or
    an untouched tensor) gets all ones -- no guidance, the plain gradient --
    where the official ``GTL_utils.learning_spread`` divides by zero.
    """
    if scouts.dim() != base.dim() + 1 or tuple(scouts.shape[1:]) != tuple(base.shape):
        raise ValueError(f"scouts: expected shape [K, {', '.join(map(str, base.shape))}], got {shape_str(scouts)}")
    if scouts.shape[0] < 1:
        raise ValueError("scouts: expected at least one scout, got 0")
    check_finite(scouts, "scouts")
    spread = (scouts.double() - base.double()[None]).pow(2).mean(0)
    lo, hi = spread.min(), spread.max()
    if float(hi - lo) <= eps:
        return torch.ones_like(base, dtype=base.dtype if base.is_floating_point() else torch.float32)
    out = (spread - lo) / (hi - lo)
    return out.to(base.dtype if base.is_floating_point() else torch.float32)


def proximal_term(params: Iterable[Tensor], global_params: Iterable[Tensor], mu: float) -> Tensor:
    """FedProx's ``mu / 2 * sum ||w - w_global||^2`` (the global parameters are constants)."""
    mu = check_hparam("mu", mu, low=0)
    total = None
    for p, q in zip(params, global_params, strict=True):
        t = (p - q.detach()).pow(2).sum()
        total = t if total is None else total + t
    if total is None:
        return torch.zeros(())
    return 0.5 * mu * total
