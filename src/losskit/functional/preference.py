"""Preference-optimisation losses on summed sequence log-probabilities.

Every function takes one :class:`~losskit.core.context.PreferenceBatch`
(the four log-probability tensors, completion lengths, ``margin`` and
``chosen_nll``, validated once when it is built) and its hyperparameters::

    batch = PreferenceBatch(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                            chosen_lengths=lc, rejected_lengths=lr)
    loss = dpo_loss(batch, beta=0.1)

Common notation::

    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]

with log-probabilities summed over the completion tokens.  With
``length_normalize=True`` each sequence's log-ratio is divided by its
completion length first (TRL's IPO):
``h = (pi_w - ref_w) / |y_w| - (pi_l - ref_l) / |y_l|``.

* ``batch.margin``: an optional per-pair offset in reward units (a float or
  ``[B]``): the sigmoid, hinge and robust losses use ``beta h - margin``;
  IPO's target becomes ``h* = (1/2 + margin) / beta``.  No margin is the
  plain loss.
* ``nll_weight``: an RPO-style term ``nll_weight * NLL(y_w)`` added per pair
  (Pang et al. 2024, arXiv:2404.19733).  ``NLL(y_w)`` is ``batch.chosen_nll``
  when given, otherwise the length-normalised ``-log pi(y_w) / |y_w|`` from
  ``policy_chosen_logps`` and ``chosen_lengths`` (RPO's definition), so one
  of the two must be given.
* ``sample_weight`` and ``reduction``: applied by
  :func:`losskit.core.reduction.reduce_loss` (``'none'`` is ``[B]``,
  ``'mean'`` divides by ``B``; beta-DPO by the number of kept pairs).

Hyperparameters are checked by :func:`check_preference_hparams` (the modules
do it once, at construction).  The maths is done in at least float32 and the
result is cast back to the log-probabilities' dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit.core.checks import check_bool, check_finite, check_hparam, check_reduction, check_vector
from losskit.core.context import PreferenceBatch
from losskit.core.reduction import reduce_loss

__all__ = [
    "PreferenceBatch",
    "check_preference_hparams",
    "preference_logratio",
    "rpo_nll",
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

#: every preference hyperparameter and its range (``check_hparam`` keywords)
_RANGES: dict[str, dict[str, Any]] = {
    "beta": dict(low=0.0, low_open=True),
    "epsilon": dict(low=0.0, high=0.5, high_open=True),
    "nll_weight": dict(low=0.0),
    "c_max": dict(low=1.0, low_open=True),
    "c_min": dict(low=0.0, high=1.0, low_open=True, high_open=True),
    "lam": dict(low=0.0, low_open=True),
    "tau": dict(low=0.0, low_open=True),
    "alpha": dict(low=0.0),
    "keep_ratio": dict(low=0.0, high=1.0, low_open=True),
    "momentum": dict(low=0.0, high=1.0, low_open=True),
    "min_beta": dict(low=0.0, low_open=True),
}


def check_preference_hparams(**hparams: Any) -> dict[str, Any]:
    """Validate preference hyperparameters by name; returns them normalised.

    Real ones must be finite and in range (``beta > 0``, ``epsilon`` in
    ``[0, 0.5)``, ``c_max > 1``, ``c_min`` in ``(0, 1)``, ``keep_ratio`` and
    ``momentum`` in ``(0, 1]``, ...; see ``_RANGES``); ``length_normalize`` is
    True, False or None; ``official_gap`` a bool; ``reduction`` one of
    ``'mean'``, ``'sum'``, ``'none'``.  Unknown names pass unchanged.
    """
    out = {}
    for name, v in hparams.items():
        if name in _RANGES:
            v = check_hparam(name, v, **_RANGES[name])
        elif name == "length_normalize":
            v = check_bool(name, v, allow_none=True)
        elif name == "official_gap":
            v = check_bool(name, v)
        elif name == "reduction":
            v = check_reduction(v)
        out[name] = v
    return out


def _batch(batch: Any) -> PreferenceBatch:
    if not isinstance(batch, PreferenceBatch):
        raise TypeError(f"batch: expected a losskit.PreferenceBatch(policy_chosen_logps, policy_rejected_logps, "
                        f"ref_chosen_logps, ref_rejected_logps, ...), got {type(batch).__name__}")
    return batch


def preference_logratio(batch: PreferenceBatch, length_normalize: bool | None = False) -> Tensor:
    """``h`` per pair (see the module docstring), in the compute dtype.

    ``length_normalize``: ``False`` never divides by lengths; ``True`` requires
    the lengths and divides; ``None`` divides when the batch has lengths.
    """
    batch = _batch(batch)
    length_normalize = check_bool("length_normalize", length_normalize, allow_none=True)
    if length_normalize is None:
        length_normalize = batch.has_lengths
    chosen = batch.pc - batch.rc
    rejected = batch.pr - batch.rr
    if length_normalize:
        if not batch.has_lengths:
            raise ValueError("length_normalize=True needs chosen_lengths and rejected_lengths "
                             "(the number of completion tokens of each response)")
        chosen = chosen / batch.chosen_lengths
        rejected = rejected / batch.rejected_lengths
    return chosen - rejected


def rpo_nll(batch: PreferenceBatch) -> Tensor:
    """``NLL(y_w)`` per pair: ``batch.chosen_nll``, else ``-log pi(y_w) / |y_w|``."""
    if batch.chosen_nll is not None:
        return batch.chosen_nll
    if not batch.has_lengths:
        raise ValueError("nll_weight > 0 needs chosen_nll (a [B] tensor) or chosen_lengths and rejected_lengths "
                         "(to use RPO's length-normalised NLL -policy_chosen_logps / chosen_lengths)")
    return -batch.pc / batch.chosen_lengths


def _reduce(batch: PreferenceBatch, per_pair: Tensor, nll_weight: float, sample_weight: Tensor | None,
            reduction: str, nll_mask: Tensor | None = None, denominator: int | None = None) -> Tensor:
    """Add the RPO term, then hand the ``[B]`` loss to :func:`reduce_loss`."""
    if check_hparam("nll_weight", nll_weight, **_RANGES["nll_weight"]) > 0:
        nll = nll_weight * rpo_nll(batch)
        per_pair = per_pair + (nll if nll_mask is None else nll * nll_mask)
    return reduce_loss(per_pair, reduction, sample_weight, denominator=denominator).to(batch.out_dtype)


def _offset(batch: PreferenceBatch, z: Tensor) -> Tensor:
    return z if batch.margin is None else z - batch.margin


def dpo_loss(batch: PreferenceBatch, beta: float = 0.1, *, length_normalize: bool | None = False,
             nll_weight: float = 0.0, sample_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """DPO (Rafailov et al. 2023): ``-log sigma(beta h - margin)``; ``ln 2`` at ``h = 0``."""
    beta = check_hparam("beta", beta, **_RANGES["beta"])
    z = _offset(batch, beta * preference_logratio(batch, length_normalize))
    return _reduce(batch, -F.logsigmoid(z), nll_weight, sample_weight, reduction)


def hinge_loss(batch: PreferenceBatch, beta: float = 0.1, *, length_normalize: bool | None = False,
               nll_weight: float = 0.0, sample_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """SLiC-style hinge (Zhao et al. 2023): ``max(0, 1 - (beta h - margin))``."""
    beta = check_hparam("beta", beta, **_RANGES["beta"])
    z = _offset(batch, beta * preference_logratio(batch, length_normalize))
    return _reduce(batch, torch.relu(1 - z), nll_weight, sample_weight, reduction)


def ipo_loss(batch: PreferenceBatch, beta: float = 0.1, *, length_normalize: bool | None = None,
             nll_weight: float = 0.0, sample_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17): ``(h - (1/2 + margin) / beta)^2``; zero at ``h = 1/(2 beta)``.

    ``beta`` is the paper's tau.  ``length_normalize=None`` (default) divides
    each log-ratio by its completion length when the batch has lengths, as
    TRL does; ``False`` is the unnormalised form of the paper's equation.
    A batch with only one of the two lengths is refused when it is built.
    """
    beta = check_hparam("beta", beta, **_RANGES["beta"])
    h = preference_logratio(batch, length_normalize)
    target = 0.5 / beta if batch.margin is None else (0.5 + batch.margin) / beta
    return _reduce(batch, (h - target) ** 2, nll_weight, sample_weight, reduction)


def robust_dpo_loss(batch: PreferenceBatch, beta: float = 0.1, epsilon: float = 0.1, *,
                    length_normalize: bool | None = False, nll_weight: float = 0.0,
                    sample_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, Eq. 9), the unbiased loss under flip rate ``epsilon``:
    ``[-(1-eps) log sigma(z) + eps log sigma(-z)] / (1 - 2 eps)`` with ``z = beta h - margin``.
    ``epsilon = 0`` is DPO."""
    hp = check_preference_hparams(beta=beta, epsilon=epsilon)
    eps = hp["epsilon"]
    z = _offset(batch, hp["beta"] * preference_logratio(batch, length_normalize))
    per = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return _reduce(batch, per, nll_weight, sample_weight, reduction)


def madpo_weights(reward_margin: Tensor, c_max: float = 2.0, c_min: float = 0.5, lam: float = 1.0,
                  tau: float = MADPO_TAU) -> Tensor:
    """MADPO's per-pair weights from reward-model margins ``m = r(y_w) - r(y_l)``.

    ``c(a) = c_min + (c_max - c_min) / (1 + K exp(lam (a - tau)))`` with
    ``K = (c_max - 1) / (1 - c_min)`` (so ``c(tau) = 1``), and
    ``w = sigma(c(|m|) m) / sigma(m)`` for ``m > -tau``, else ``1``.  Returned
    detached (the weights carry no gradient).
    """
    hp = check_preference_hparams(c_max=c_max, c_min=c_min, lam=lam, tau=tau)
    c_max, c_min, lam, tau = hp["c_max"], hp["c_min"], hp["lam"], hp["tau"]
    if not isinstance(reward_margin, Tensor):
        raise TypeError(f"reward_margin: expected a torch.Tensor of shape [B], got {type(reward_margin).__name__}")
    check_finite(reward_margin, "reward_margin")
    m = reward_margin.detach().to(torch.float64 if reward_margin.dtype == torch.float64 else torch.float32)
    k = (c_max - 1.0) / (1.0 - c_min)
    a = m.abs()
    # 1 / (1 + K e^{lam (a - tau)}) = sigmoid(-(lam (a - tau) + ln K)): stable for any a
    c = c_min + (c_max - c_min) * torch.sigmoid(-(lam * (a - tau) + math.log(k)))
    # sigma(c m) / sigma(m) in log space
    w = torch.exp(F.logsigmoid(c * m) - F.logsigmoid(m))
    return torch.where(m > -tau, w, torch.ones_like(w))


def madpo_loss(batch: PreferenceBatch, reward_margin: Tensor, beta: float = 0.1, c_max: float = 2.0,
               c_min: float = 0.5, lam: float = 1.0, tau: float = MADPO_TAU, *,
               length_normalize: bool | None = False, nll_weight: float = 0.0,
               sample_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """MADPO: ``w(m) * (-log sigma(beta h - margin))`` with :func:`madpo_weights` (detached).
    The NLL term (if any) is added unweighted by ``w``; ``sample_weight`` multiplies the total."""
    beta = check_hparam("beta", beta, **_RANGES["beta"])
    batch = _batch(batch)
    check_vector(reward_margin, "reward_margin", batch.batch, batch.policy_chosen_logps, floating=False,
                 finite=False, what="reward-model margin r(y_w) - r(y_l) per pair")
    w = madpo_weights(reward_margin, c_max, c_min, lam, tau).to(batch.compute_dtype)
    z = _offset(batch, beta * preference_logratio(batch, length_normalize))
    return _reduce(batch, w * -F.logsigmoid(z), nll_weight, sample_weight, reduction)


def beta_dpo_loss(batch: PreferenceBatch, gap_mean: Tensor | float, gap_std: Tensor | float, beta: float = 0.1,
                  alpha: float = 0.6, keep_ratio: float = 0.8, min_beta: float = 1e-3, official_gap: bool = False,
                  generator: torch.Generator | None = None, *, length_normalize: bool | None = False,
                  nll_weight: float = 0.0, sample_weight: Tensor | None = None, reduction: str = "mean",
                  return_details: bool = False):
    """beta-DPO (Wu et al. 2024) for one batch, given the running statistics.

    ``M_i = beta h_i`` (the paper's reward discrepancy; ``official_gap=True``
    uses ``h_i`` as the official code does).  ``n = max(1, int(B * keep_ratio))``
    pairs are drawn without replacement with probability proportional to
    ``exp(-(M_i - M0)^2 / (2 sigma^2))`` (``M0 = gap_mean``, ``sigma = gap_std``;
    uniformly while ``sigma`` is 0); ``beta_batch = max(beta (1 + alpha
    (mean_kept M - M0)), min_beta)``, detached; the loss is
    ``-log sigma(beta_batch h - margin)`` on the kept pairs, zero on the others
    (so is the RPO term).  ``reduction='mean'`` divides by ``n``, the number of
    kept pairs (the paper and official code); ``'sum'`` and ``'none'`` keep the
    zeros.  ``return_details`` also returns ``(beta_batch, keep_mask)``.
    """
    hp = check_preference_hparams(beta=beta, alpha=alpha, keep_ratio=keep_ratio, min_beta=min_beta,
                                  official_gap=official_gap)
    beta, alpha = hp["beta"], hp["alpha"]
    h = preference_logratio(batch, length_normalize)
    b = batch.batch
    n_keep = max(1, int(b * hp["keep_ratio"])) if b else 0
    with torch.no_grad():
        mu = torch.as_tensor(gap_mean, dtype=h.dtype, device=h.device).reshape(())
        sd = torch.as_tensor(gap_std, dtype=h.dtype, device=h.device).reshape(())
        gap = h.detach() if official_gap else beta * h.detach()
        if n_keep >= b:
            keep = torch.ones_like(h)
        else:
            # no spread recorded yet (sd 0 or not finite): uniform sampling; no host sync either way
            spread = (sd > 0) & torch.isfinite(sd)
            logw = -0.5 * ((gap - mu) / torch.where(spread, sd, torch.ones_like(sd))).pow(2)
            # -inf (overflow) -> very negative; softmax then never sees an all -inf row
            logw = torch.where(spread, torch.nan_to_num(logw, nan=-1e30, neginf=-1e30), torch.zeros_like(logw))
            p = torch.softmax(logw, 0)  # proportional to exp(logw), normalised stably
            idx = torch.multinomial(p, n_keep, replacement=False, generator=generator)
            keep = torch.zeros_like(h).index_fill_(0, idx, 1.0)
        mean_kept = (gap * keep).sum() / max(n_keep, 1)
        beta_batch = (beta * (1 + alpha * (mean_kept - mu))).clamp_min(hp["min_beta"])
    z = _offset(batch, beta_batch * h)
    out = _reduce(batch, -F.logsigmoid(z) * keep, nll_weight, sample_weight, reduction, nll_mask=keep,
                  denominator=n_keep)
    if return_details:
        return out, beta_batch, keep.bool()
    return out
