"""Gradient entanglement diagnostics and the pairwise-normalised mitigation.

Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment:
Gradient Entanglement" (ICLR 2025, arXiv:2410.13828).  After one DPO step
with ``C = eta beta sigma(-beta h)``::

    d log pi_w ~ C (||g_w||^2 - <g_w, g_l>),   d log pi_l ~ C (<g_w, g_l> - ||g_l||^2)

so the chosen log-probability rises iff ``<g_w, g_l> <= ||g_w||^2`` and the
rejected one falls iff ``<g_w, g_l> <= ||g_l||^2``.  Per pair we report the
inner product, both norms, the cosine and the condition ratio
``<g_w, g_l> / min(||g_w||^2, ||g_l||^2)`` (> 1: at least one of the two
moves the wrong way).  The official code divides by
``min(||g_w||^2, ||g_w||^2)`` -- the chosen norm twice -- which we do not copy.

``g`` is the gradient of the *summed* completion log-probability with respect
to the parameters, accumulated in float32 (float64 for float64 parameters).

Usage (any model; one forward over the pairs, then one backward per response)::

    chosen = seq_logps(model, chosen_batch)      # [N], with graph
    rejected = seq_logps(model, rejected_batch)  # [N]
    stats = gradient_entanglement(chosen, rejected, model)
    stats.summary()  # {'ratio_mean': ..., 'frac_ratio_gt_1': ..., ...}

The per-pair gradients are exact only when the model treats the pairs of a
batch independently (no batch-norm in training mode, no cross-sample terms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from losskit.core.checks import check_bool, check_finite, check_hparam
from losskit.core.reduction import reduce_loss

__all__ = ["EntanglementStats", "gradient_entanglement", "pairwise_normalized_loss", "per_pair_grad_norms"]


def _params(params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    ps = params.parameters() if isinstance(params, nn.Module) else params
    out = [p for p in ps if isinstance(p, Tensor) and p.requires_grad]
    if not out:
        raise ValueError("params: expected a module or tensors with requires_grad=True, got none")
    return out


def _check_logps(chosen_logps: Tensor, rejected_logps: Tensor) -> int:
    for name, t in (("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)):
        if not isinstance(t, Tensor) or t.dim() != 1:
            got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a [N] tensor of summed log-probabilities (with graph), got {got}")
        if not t.requires_grad:
            raise ValueError(f"{name}: expected a tensor attached to the model's graph (requires_grad=True); "
                             "compute it without torch.no_grad()")
        check_finite(t, name, "log-probabilities")
    if chosen_logps.shape != rejected_logps.shape:
        raise ValueError(f"rejected_logps: expected shape {list(chosen_logps.shape)} (as chosen_logps), "
                         f"got {list(rejected_logps.shape)}")
    return chosen_logps.shape[0]


def _acc_dtype(params: list[Tensor]) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _grad(y: Tensor, params: list[Tensor]) -> list[Tensor | None]:
    return list(torch.autograd.grad(y, params, retain_graph=True, allow_unused=True))


def _dot(a: list[Tensor | None], b: list[Tensor | None], dt: torch.dtype) -> Tensor:
    total = torch.zeros((), dtype=dt)
    for x, y in zip(a, b):
        if x is not None and y is not None:
            total = total + (x.to(dt) * y.to(dt)).sum().cpu()
    return total


@dataclass
class EntanglementStats:
    """Per-pair gradient-entanglement quantities, each a ``[N]`` tensor."""

    inner: Tensor
    chosen_norm: Tensor
    rejected_norm: Tensor
    cosine: Tensor
    ratio: Tensor

    @property
    def chosen_rises(self) -> Tensor:
        """``<g_w, g_l> <= ||g_w||^2``: a DPO step raises log pi(y_w)."""
        return self.inner <= self.chosen_norm ** 2

    @property
    def rejected_falls(self) -> Tensor:
        """``<g_w, g_l> <= ||g_l||^2``: a DPO step lowers log pi(y_l)."""
        return self.inner <= self.rejected_norm ** 2

    def summary(self) -> dict[str, float]:
        n = self.inner.numel()
        if n == 0:
            return {"pairs": 0}
        return {
            "pairs": n,
            "cosine_mean": float(self.cosine.mean()),
            "ratio_mean": float(self.ratio.mean()),
            "ratio_median": float(self.ratio.median()),
            "frac_ratio_gt_1": float((self.ratio > 1).double().mean()),
            "frac_chosen_rises": float(self.chosen_rises.double().mean()),
            "frac_rejected_falls": float(self.rejected_falls.double().mean()),
        }


def gradient_entanglement(chosen_logps: Tensor, rejected_logps: Tensor,
                          params: nn.Module | Iterable[Tensor], eps: float = 1e-30) -> EntanglementStats:
    """Per-pair ``<g_w, g_l>``, ``||g_w||``, ``||g_l||``, cosine and
    ``<g_w, g_l> / min(||g_w||^2, ||g_l||^2)`` (``eps`` guards a zero gradient).

    ``chosen_logps``/``rejected_logps``: ``[N]`` summed log-probabilities still
    attached to the graph; ``params``: a module or its parameters.  Costs one
    backward per response (``2N``); the graph is retained, never freed here.
    """
    n = _check_logps(chosen_logps, rejected_logps)
    ps = _params(params)
    dt = _acc_dtype(ps)
    inner, nw, nl = (torch.zeros(n, dtype=dt) for _ in range(3))
    for i in range(n):
        gw = _grad(chosen_logps[i], ps)
        gl = _grad(rejected_logps[i], ps)
        inner[i] = _dot(gw, gl, dt)
        nw[i] = _dot(gw, gw, dt).sqrt()
        nl[i] = _dot(gl, gl, dt).sqrt()
    cosine = inner / (nw * nl).clamp_min(eps)
    ratio = inner / torch.minimum(nw ** 2, nl ** 2).clamp_min(eps)  # min over BOTH norms (official code: g_w twice)
    return EntanglementStats(inner, nw, nl, cosine, ratio)


def per_pair_grad_norms(chosen_logps: Tensor, rejected_logps: Tensor,
                        params: nn.Module | Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """``(||g_w||, ||g_l||)`` per pair, detached, on the log-probs' device and dtype."""
    n = _check_logps(chosen_logps, rejected_logps)
    ps = _params(params)
    dt = _acc_dtype(ps)
    nw, nl = torch.zeros(n, dtype=dt), torch.zeros(n, dtype=dt)
    for i in range(n):
        gw = _grad(chosen_logps[i], ps)
        gl = _grad(rejected_logps[i], ps)
        nw[i] = _dot(gw, gw, dt).sqrt()
        nl[i] = _dot(gl, gl, dt).sqrt()
    like = chosen_logps
    return nw.to(like.device, like.dtype), nl.to(like.device, like.dtype)


def pairwise_normalized_loss(chosen_logps: Tensor, rejected_logps: Tensor,
                             params: nn.Module | Iterable[Tensor] | None,
                             ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
                             beta: float = 0.1, dpo_weight: bool = True, eps: float = 1e-12,
                             sample_weight: Tensor | None = None, reduction: str = "mean",
                             grad_norms: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The pairwise-normalised surrogate (Yuan et al. 2025, Sec. 5):

    ``L_i = -c_i [ log pi(y_w) / sg(||g_w||) - log pi(y_l) / sg(||g_l||) ]``

    whose gradient is ``-c_i (g_w/||g_w|| - g_l/||g_l||)``: both responses move
    at the same rate, so a DPO-like step can no longer raise the rejected
    response merely because its gradient is larger.  With ``dpo_weight=True``
    (needs the reference log-probs) ``c_i = beta sigma(-beta h_i)`` (detached),
    DPO's own per-pair coefficient; otherwise ``c_i = 1``.  Its *value* is a
    surrogate, not a likelihood: use it for its gradient.  The norms cost one
    backward per response; ``grad_norms=(||g_w||, ||g_l||)`` (``[N]`` each)
    skips that when you have them in closed form (``params`` may then be None).
    """
    beta = check_hparam("beta", beta, low=0.0, low_open=True)
    eps = check_hparam("eps", eps, low=0.0, low_open=True)
    dpo_weight = check_bool("dpo_weight", dpo_weight)
    n = _check_logps(chosen_logps, rejected_logps)
    if grad_norms is None:
        nw, nl = per_pair_grad_norms(chosen_logps, rejected_logps, params)
    else:
        nw, nl = (t.detach().to(chosen_logps.dtype) for t in grad_norms)
        if nw.shape != chosen_logps.shape or nl.shape != chosen_logps.shape:
            raise ValueError(f"grad_norms: expected two tensors of shape [{n}], got "
                             f"{list(nw.shape)} and {list(nl.shape)}")
    if dpo_weight:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("dpo_weight=True needs ref_chosen_logps and ref_rejected_logps "
                             "(or pass dpo_weight=False for the unweighted direction)")
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if t.shape != chosen_logps.shape:
                raise ValueError(f"{name}: expected shape [{n}], got {list(t.shape)}")
        with torch.no_grad():
            h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
            c = beta * torch.sigmoid(-beta * h)
    else:
        c = torch.ones_like(chosen_logps).detach()
    per = -c * (chosen_logps / nw.clamp_min(eps) - rejected_logps / nl.clamp_min(eps))
    return reduce_loss(per, reduction, sample_weight)
