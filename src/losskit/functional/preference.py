"""Preference-optimisation losses on summed sequence log-probabilities.

Common notation (every function here)::

    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]

with log-probabilities summed over the completion tokens.  With
``length_normalize=True`` each sequence's log-ratio is divided by its
completion length first (TRL's IPO):
``h = (pi_w - ref_w) / |y_w| - (pi_l - ref_l) / |y_l|``.

Every loss takes

* ``margin``: an optional per-pair offset in reward units (a float or ``[B]``):
  the sigmoid, hinge and robust losses use ``beta h - margin``; IPO's target
  becomes ``h* = (1/2 + margin) / beta``.  ``margin = 0`` is the plain loss.
* ``nll_weight`` / ``chosen_nll``: an RPO-style term ``nll_weight * NLL(y_w)``
  added per pair (Pang et al. 2024, arXiv:2404.19733).  ``chosen_nll`` is the
  per-pair NLL you computed (``[B]``); when it is omitted the length-normalised
  NLL ``-log pi(y_w) / |y_w|`` is derived from ``policy_chosen_logps`` and
  ``chosen_lengths`` (RPO's definition), so one of the two must be given.
* ``sample_weight`` and ``reduction`` with losskit's rules
  (:func:`losskit._checks.reduce_loss`).

The maths is done in at least float32 and the result is cast back to the
log-probabilities' dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit._checks import check_finite, check_reduction, check_sample_weight, reduce_loss

__all__ = [
    "PreferenceInputs",
    "check_preference_inputs",
    "preference_logratio",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "robust_dpo_loss",
    "madpo_weights",
    "madpo_loss",
    "beta_dpo_loss",
    "MADPO_TAU",
]

#: MADPO's default threshold tau = ln 999 (the margin at which sigma(m) = 0.999).
MADPO_TAU = math.log(999.0)

_LOGP_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


class PreferenceInputs:
    """The four validated log-probability tensors, in a common compute dtype."""

    __slots__ = ("pc", "pr", "rc", "rr", "out_dtype", "batch")

    def __init__(self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor):
        self.out_dtype = pc.dtype
        self.batch = pc.shape[0]
        ct = _compute_dtype(pc.dtype)
        self.pc, self.pr, self.rc, self.rr = (t.to(ct) for t in (pc, pr, rc, rr))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_preference_inputs(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                            ref_chosen_logps: Tensor, ref_rejected_logps: Tensor) -> PreferenceInputs:
    """Validate the four ``[B]`` log-probability tensors (same shape, device,
    floating dtype, finite values) and return them in the compute dtype."""
    ts = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    for name, t in zip(_LOGP_NAMES, ts):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of shape [B] (one summed log-probability per pair), "
                            f"got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name}: expected shape [B] (one summed log-probability per pair), got {_shape(t)}; "
                             "sum the per-token log-probabilities over the completion first")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    b = policy_chosen_logps.shape[0]
    dev = policy_chosen_logps.device
    for name, t in zip(_LOGP_NAMES[1:], ts[1:]):
        if t.shape[0] != b:
            raise ValueError(f"{name}: expected shape [{b}] (the batch of policy_chosen_logps), got {_shape(t)}")
        if t.device != dev:
            raise ValueError(f"{name}: expected device {dev} (policy_chosen_logps' device), got {t.device}")
    # one host sync for the common (all finite) case; details only on failure
    if b and not bool(torch.stack([torch.isfinite(t.detach()).all() for t in ts]).all()):
        for name, t in zip(_LOGP_NAMES, ts):
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).nonzero()[0, 0])
                raise ValueError(f"{name}: expected finite log-probabilities, got {float(t[bad])} at index {bad} "
                                 "(a -inf usually means a completion token the model gives probability 0, "
                                 "or a fully masked completion)")
    return PreferenceInputs(*ts)


def _check_lengths(lengths: Tensor | None, name: str, batch: int, like: Tensor) -> Tensor | None:
    if lengths is None:
        return None
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"{name}: expected shape [{batch}] (completion length of each pair), got {_shape(lengths)}")
    if lengths.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {lengths.device}")
    lengths = lengths.to(like.dtype)
    if lengths.numel() and not bool((lengths > 0).all() & torch.isfinite(lengths).all()):
        raise ValueError(f"{name}: expected positive finite lengths (token counts), got min {float(lengths.min())}")
    return lengths


def _check_per_pair(x: Tensor | float | None, name: str, batch: int, like: Tensor) -> Tensor | None:
    """A float or a ``[B]`` tensor of finite values, returned in ``like``'s dtype."""
    if x is None:
        return None
    if not isinstance(x, Tensor):
        x = torch.as_tensor(float(x), dtype=like.dtype, device=like.device)
        return check_finite(x, name)
    if x.dim() == 0:
        x = x.to(like.device)
    elif x.dim() != 1 or x.shape[0] != batch:
        raise ValueError(f"{name}: expected a float or shape [{batch}] (one value per pair), got {_shape(x)}")
    if x.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {x.device}")
    return check_finite(x.to(like.dtype), name)


def preference_logratio(inp: PreferenceInputs, chosen_lengths: Tensor | None = None,
                        rejected_lengths: Tensor | None = None, length_normalize: bool | None = False) -> Tensor:
    """``h`` per pair (see the module docstring).

    ``length_normalize``: ``False`` never divides by lengths; ``True`` requires
    both lengths and divides; ``None`` divides when both lengths are given.
    """
    lc = _check_lengths(chosen_lengths, "chosen_lengths", inp.batch, inp.pc)
    lr = _check_lengths(rejected_lengths, "rejected_lengths", inp.batch, inp.pc)
    if length_normalize is None:
        length_normalize = lc is not None and lr is not None
    chosen = inp.pc - inp.rc
    rejected = inp.pr - inp.rr
    if length_normalize:
        if lc is None or lr is None:
            raise ValueError("length_normalize=True needs both chosen_lengths and rejected_lengths "
                             "(the number of completion tokens of each response)")
        chosen = chosen / lc
        rejected = rejected / lr
    return chosen - rejected


def _nll_term(inp: PreferenceInputs, nll_weight: float, chosen_nll: Tensor | None,
              chosen_lengths: Tensor | None) -> Tensor | None:
    if nll_weight < 0:
        raise ValueError(f"nll_weight: expected >= 0, got {nll_weight}")
    if chosen_nll is not None:
        nll = _check_per_pair(chosen_nll, "chosen_nll", inp.batch, inp.pc)
        if nll.dim() == 0:
            raise ValueError(f"chosen_nll: expected shape [{inp.batch}] (one NLL per pair), got a scalar")
    elif nll_weight == 0:
        return None
    else:
        if chosen_lengths is None:
            raise ValueError("nll_weight > 0 needs chosen_nll (a [B] tensor) or chosen_lengths (to use RPO's "
                             "length-normalised NLL -policy_chosen_logps / chosen_lengths)")
        lc = _check_lengths(chosen_lengths, "chosen_lengths", inp.batch, inp.pc)
        nll = -inp.pc / lc
    return nll_weight * nll


def _finish(per_pair: Tensor, inp: PreferenceInputs, nll: Tensor | None, sample_weight: Tensor | None,
            reduction: str) -> Tensor:
    if nll is not None:
        per_pair = per_pair + nll
    if sample_weight is not None:
        sample_weight = check_sample_weight(sample_weight, inp.batch, per_pair)
    return reduce_loss(per_pair, reduction, sample_weight).to(inp.out_dtype)


def _check_beta(beta: float) -> float:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta: expected a finite float > 0, got {beta!r}")
    return float(beta)


def _pairwise_z(inp: PreferenceInputs, beta: float, margin, chosen_lengths, rejected_lengths,
                length_normalize) -> Tensor:
    h = preference_logratio(inp, chosen_lengths, rejected_lengths, length_normalize)
    z = beta * h
    m = _check_per_pair(margin, "margin", inp.batch, z)
    return z if m is None else z - m


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, *, margin: Tensor | float | None = None,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
             length_normalize: bool | None = False, nll_weight: float = 0.0, chosen_nll: Tensor | None = None,
             sample_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """DPO (Rafailov et al. 2023): ``-log sigma(beta h - margin)``; ``ln 2`` at ``h = 0``."""
    check_reduction(reduction)
    beta = _check_beta(beta)
    inp = check_preference_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = _pairwise_z(inp, beta, margin, chosen_lengths, rejected_lengths, length_normalize)
    nll = _nll_term(inp, nll_weight, chosen_nll, chosen_lengths)
    return _finish(-F.logsigmoid(z), inp, nll, sample_weight, reduction)


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, beta: float = 0.1, *, margin: Tensor | float | None = None,
               chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
               length_normalize: bool | None = False, nll_weight: float = 0.0, chosen_nll: Tensor | None = None,
               sample_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """SLiC-style hinge (Zhao et al. 2023): ``max(0, 1 - (beta h - margin))``."""
    check_reduction(reduction)
    beta = _check_beta(beta)
    inp = check_preference_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = _pairwise_z(inp, beta, margin, chosen_lengths, rejected_lengths, length_normalize)
    nll = _nll_term(inp, nll_weight, chosen_nll, chosen_lengths)
    return _finish(torch.relu(1 - z), inp, nll, sample_weight, reduction)


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, *, margin: Tensor | float | None = None,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
             length_normalize: bool | None = None, nll_weight: float = 0.0, chosen_nll: Tensor | None = None,
             sample_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17): ``(h - (1/2 + margin) / beta)^2``; zero at ``h = 1/(2 beta)``.

    ``beta`` is the paper's tau.  ``length_normalize=None`` (default) divides
    each log-ratio by its completion length when both lengths are given, as
    TRL does; ``False`` is the unnormalised form of the paper's equation.
    """
    check_reduction(reduction)
    beta = _check_beta(beta)
    inp = check_preference_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = preference_logratio(inp, chosen_lengths, rejected_lengths, length_normalize)
    m = _check_per_pair(margin, "margin", inp.batch, h)
    target = 0.5 / beta if m is None else (0.5 + m) / beta
    nll = _nll_term(inp, nll_weight, chosen_nll, chosen_lengths)
    return _finish((h - target) ** 2, inp, nll, sample_weight, reduction)


def robust_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                    ref_rejected_logps: Tensor, beta: float = 0.1, epsilon: float = 0.1, *,
                    margin: Tensor | float | None = None, chosen_lengths: Tensor | None = None,
                    rejected_lengths: Tensor | None = None, length_normalize: bool | None = False,
                    nll_weight: float = 0.0, chosen_nll: Tensor | None = None,
                    sample_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, Eq. 9), the unbiased loss under flip rate ``epsilon``:
    ``[-(1-eps) log sigma(z) + eps log sigma(-z)] / (1 - 2 eps)`` with ``z = beta h - margin``.
    ``epsilon = 0`` is DPO."""
    check_reduction(reduction)
    beta = _check_beta(beta)
    if not (0.0 <= epsilon < 0.5):
        raise ValueError(f"epsilon: expected a flip rate in [0, 0.5), got {epsilon}")
    inp = check_preference_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = _pairwise_z(inp, beta, margin, chosen_lengths, rejected_lengths, length_normalize)
    per = (-(1 - epsilon) * F.logsigmoid(z) + epsilon * F.logsigmoid(-z)) / (1 - 2 * epsilon)
    nll = _nll_term(inp, nll_weight, chosen_nll, chosen_lengths)
    return _finish(per, inp, nll, sample_weight, reduction)


def madpo_weights(reward_margin: Tensor, c_max: float = 2.0, c_min: float = 0.5, lam: float = 1.0,
                  tau: float = MADPO_TAU) -> Tensor:
    """MADPO's per-pair weights from reward-model margins ``m = r(y_w) - r(y_l)``.

    ``c(a) = c_min + (c_max - c_min) / (1 + K exp(lam (a - tau)))`` with
    ``K = (c_max - 1) / (1 - c_min)`` (so ``c(tau) = 1``), and
    ``w = sigma(c(|m|) m) / sigma(m)`` for ``m > -tau``, else ``1``.  Returned
    detached (the weights carry no gradient).
    """
    if not (c_max > 1.0 and 0.0 < c_min < 1.0):
        raise ValueError(f"c_max must be > 1 and c_min in (0, 1); got c_max={c_max}, c_min={c_min}")
    if lam <= 0 or tau <= 0:
        raise ValueError(f"lam and tau must be > 0; got lam={lam}, tau={tau}")
    if not isinstance(reward_margin, Tensor):
        raise TypeError(f"reward_margin: expected a torch.Tensor of shape [B], got {type(reward_margin).__name__}")
    check_finite(reward_margin, "reward_margin")
    m = reward_margin.detach().to(_compute_dtype(reward_margin.dtype) if reward_margin.is_floating_point()
                                  else torch.float32)
    k = (c_max - 1.0) / (1.0 - c_min)
    a = m.abs()
    # 1 / (1 + K e^{lam (a - tau)}) = sigmoid(-(lam (a - tau) + ln K)): stable for any a
    c = c_min + (c_max - c_min) * torch.sigmoid(-(lam * (a - tau) + math.log(k)))
    # sigma(c m) / sigma(m) in log space
    w = torch.exp(F.logsigmoid(c * m) - F.logsigmoid(m))
    return torch.where(m > -tau, w, torch.ones_like(w))


def madpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, reward_margin: Tensor, beta: float = 0.1, c_max: float = 2.0,
               c_min: float = 0.5, lam: float = 1.0, tau: float = MADPO_TAU, *,
               margin: Tensor | float | None = None, chosen_lengths: Tensor | None = None,
               rejected_lengths: Tensor | None = None, length_normalize: bool | None = False,
               nll_weight: float = 0.0, chosen_nll: Tensor | None = None,
               sample_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """MADPO: ``w(m) * (-log sigma(beta h - margin))`` with :func:`madpo_weights` (detached).
    The NLL term (if any) is added unweighted by ``w``; ``sample_weight`` multiplies the total."""
    check_reduction(reduction)
    beta = _check_beta(beta)
    inp = check_preference_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if not isinstance(reward_margin, Tensor):
        raise TypeError(f"reward_margin: expected a torch.Tensor of shape [{inp.batch}] (reward-model margin "
                        f"r(y_w) - r(y_l) per pair), got {type(reward_margin).__name__}")
    if reward_margin.dim() != 1 or reward_margin.shape[0] != inp.batch:
        raise ValueError(f"reward_margin: expected shape [{inp.batch}] (reward-model margin per pair), "
                         f"got {_shape(reward_margin)}")
    if reward_margin.device != inp.pc.device:
        raise ValueError(f"reward_margin: expected device {inp.pc.device}, got {reward_margin.device}")
    w = madpo_weights(reward_margin, c_max, c_min, lam, tau).to(inp.pc.dtype)
    z = _pairwise_z(inp, beta, margin, chosen_lengths, rejected_lengths, length_normalize)
    nll = _nll_term(inp, nll_weight, chosen_nll, chosen_lengths)
    return _finish(w * -F.logsigmoid(z), inp, nll, sample_weight, reduction)


def beta_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, gap_mean: Tensor | float, gap_std: Tensor | float,
                  beta: float = 0.1, alpha: float = 0.6, keep_ratio: float = 0.8, min_beta: float = 1e-3,
                  official_gap: bool = False, generator: torch.Generator | None = None, *,
                  margin: Tensor | float | None = None, chosen_lengths: Tensor | None = None,
                  rejected_lengths: Tensor | None = None, length_normalize: bool | None = False,
                  nll_weight: float = 0.0, chosen_nll: Tensor | None = None,
                  sample_weight: Tensor | None = None, reduction: str = "mean",
                  return_details: bool = False):
    """beta-DPO (Wu et al. 2024) for one batch, given the running statistics.

    ``M_i = beta h_i`` (the paper's reward discrepancy; ``official_gap=True``
    uses ``h_i`` as the official code does).  ``n = int(B * keep_ratio)`` pairs
    are drawn without replacement with probability proportional to
    ``exp(-(M_i - M0)^2 / (2 sigma^2))`` (``M0 = gap_mean``, ``sigma = gap_std``);
    ``beta_batch = max(beta (1 + alpha (mean_kept M - M0)), min_beta)``,
    detached; the loss is ``-log sigma(beta_batch h - margin)`` on the kept
    pairs, zero on the others.  ``reduction='mean'`` divides by the number of
    kept pairs (the paper and official code); ``'sum'`` and ``'none'`` keep
    the zeros.  ``return_details`` also returns ``(beta_batch, keep_mask)``.
    """
    check_reduction(reduction)
    beta = _check_beta(beta)
    if not (0.0 < keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio: expected a fraction in (0, 1], got {keep_ratio}")
    inp = check_preference_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = preference_logratio(inp, chosen_lengths, rejected_lengths, length_normalize)
    b = inp.batch
    mu = torch.as_tensor(gap_mean, dtype=h.dtype, device=h.device).reshape(())
    sd = torch.as_tensor(gap_std, dtype=h.dtype, device=h.device).reshape(())
    with torch.no_grad():
        gap = h.detach() if official_gap else beta * h.detach()
        n_keep = max(1, int(b * keep_ratio)) if b else 0
        if b == 0:
            keep = torch.zeros(0, dtype=h.dtype, device=h.device)
            beta_batch = torch.as_tensor(beta, dtype=h.dtype, device=h.device)
        else:
            if n_keep >= b:
                keep = torch.ones_like(h)
            else:
                if bool(sd > 0) and bool(torch.isfinite(sd)):
                    logw = -0.5 * ((gap - mu) / sd).pow(2)
                    # -inf (overflow) -> very negative; softmax then never sees an all -inf row
                    logw = torch.nan_to_num(logw, nan=-1e30, neginf=-1e30)
                else:  # no spread recorded yet: uniform sampling
                    logw = torch.zeros_like(gap)
                p = torch.softmax(logw, 0)  # proportional to exp(logw), normalised stably
                idx = torch.multinomial(p, n_keep, replacement=False, generator=generator)
                keep = torch.zeros_like(h)
                keep[idx] = 1.0
            mean_kept = (gap * keep).sum() / keep.sum()
            beta_batch = (beta * (1 + alpha * (mean_kept - mu))).clamp_min(min_beta)
    z = beta_batch * h
    m = _check_per_pair(margin, "margin", b, z)
    if m is not None:
        z = z - m
    per = -F.logsigmoid(z) * keep
    nll = _nll_term(inp, nll_weight, chosen_nll, chosen_lengths)
    if nll is not None:
        nll = nll * keep
    if reduction == "mean" and b:
        out = _finish(per, inp, nll, sample_weight, "sum") * (1.0 / n_keep)
    else:
        out = _finish(per, inp, nll, sample_weight, reduction)
    if return_details:
        return out, beta_batch, keep.bool()
    return out
