"""Preference-optimisation objectives (family ``preference``, task ``preference``).

Call::

    loss = losskit.get("dpo", beta=0.1)
    value = loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)

Every module also accepts the keywords ``chosen_lengths``, ``rejected_lengths``
(completion token counts, ``[B]``), ``margin`` (per-pair offset in reward
units), ``sample_weight`` (``[B]``) and ``chosen_nll`` (``[B]``, for the
RPO-style term weighted by the ``nll_weight`` hyperparameter).  ``madpo``
also needs ``reward_margin`` (``[B]``).  Formulas: :mod:`losskit.functional.preference`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from losskit._checks import check_reduction
from losskit.functional import preference as P
from losskit.registry import Paper, register

DPO_PAPER = Paper("Direct Preference Optimization: Your Language Model is Secretly a Reward Model", 2023, "2305.18290")
IPO_PAPER = Paper("A General Theoretical Paradigm to Understand Learning from Human Preferences", 2023, "2310.12036")
SLIC_PAPER = Paper("SLiC-HF: Sequence Likelihood Calibration with Human Feedback", 2023, "2305.10425")
RDPO_PAPER = Paper("Provably Robust DPO: Aligning Language Models with Noisy Feedback", 2024, "2403.00409")
BETA_DPO_PAPER = Paper("beta-DPO: Direct Preference Optimization with Dynamic beta", 2024, "2407.08639")
MADPO_PAPER = Paper("Margin Adaptive DPO: Leveraging Reward Model for Granular Control in Preference Optimization",
                    2025, "2510.05342")


class _PairwisePreferenceLoss(nn.Module):
    """Shared forward: validates hyperparameters once, forwards keywords."""

    _fn = None  # set by subclasses

    def __init__(self, beta: float = 0.1, length_normalize: bool | None = False, nll_weight: float = 0.0,
                 reduction: str = "mean"):
        super().__init__()
        self.beta = P._check_beta(beta)
        if length_normalize not in (True, False, None):
            raise ValueError(f"length_normalize: expected True, False or None, got {length_normalize!r}")
        self.length_normalize = length_normalize
        if not (nll_weight >= 0 and math.isfinite(nll_weight)):
            raise ValueError(f"nll_weight: expected a finite float >= 0, got {nll_weight}")
        self.nll_weight = float(nll_weight)
        self.reduction = check_reduction(reduction)

    def _extra(self) -> dict:
        return {}

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor, *, chosen_lengths: Tensor | None = None,
                rejected_lengths: Tensor | None = None, margin: Tensor | float | None = None,
                sample_weight: Tensor | None = None, chosen_nll: Tensor | None = None) -> Tensor:
        return type(self)._fn(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            beta=self.beta, **self._extra(), margin=margin, chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths, length_normalize=self.length_normalize,
            nll_weight=self.nll_weight, chosen_nll=chosen_nll, sample_weight=sample_weight,
            reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, length_normalize={self.length_normalize}, nll_weight={self.nll_weight}, " \
               f"reduction={self.reduction!r}"


@register("dpo", family="preference", task="preference", paper=DPO_PAPER,
          summary="DPO sigmoid loss -log sigma(beta h); ln 2 at zero margin.")
class DPOLoss(_PairwisePreferenceLoss):
    """Direct Preference Optimization: ``-log sigma(beta h - margin)`` (+ ``nll_weight`` NLL(y_w), RPO)."""

    _fn = staticmethod(P.dpo_loss)


@register("hinge", family="preference", task="preference", paper=SLIC_PAPER,
          summary="SLiC hinge on the DPO log-ratio: max(0, 1 - beta h).")
class HingePreferenceLoss(_PairwisePreferenceLoss):
    """Hinge (SLiC / TRL ``hinge``): ``max(0, 1 - (beta h - margin))``; ``1/beta`` is the log-ratio margin."""

    _fn = staticmethod(P.hinge_loss)


@register("ipo", family="preference", task="preference", paper=IPO_PAPER,
          summary="IPO squared loss (h - 1/(2 beta))^2, length-normalised when lengths are given (as TRL).")
class IPOLoss(_PairwisePreferenceLoss):
    """IPO: ``(h - (1/2 + margin)/beta)^2``.

    ``length_normalize=None`` (default) divides each log-ratio by its
    completion length when ``chosen_lengths`` and ``rejected_lengths`` are
    given (TRL's form, confirmed with the IPO authors); ``False`` is the
    paper's unnormalised equation; ``True`` requires the lengths.
    """

    _fn = staticmethod(P.ipo_loss)

    def __init__(self, beta: float = 0.1, length_normalize: bool | None = None, nll_weight: float = 0.0,
                 reduction: str = "mean"):
        super().__init__(beta, length_normalize, nll_weight, reduction)


@register("robust", family="preference", task="preference", paper=RDPO_PAPER,
          summary="Robust DPO, unbiased under label-flip rate epsilon; epsilon=0 is DPO.")
class RobustDPOLoss(_PairwisePreferenceLoss):
    """rDPO: ``[-(1-eps) log sigma(z) + eps log sigma(-z)] / (1 - 2 eps)``, ``z = beta h - margin``."""

    _fn = staticmethod(P.robust_dpo_loss)

    def __init__(self, beta: float = 0.1, epsilon: float = 0.1, length_normalize: bool | None = False,
                 nll_weight: float = 0.0, reduction: str = "mean"):
        super().__init__(beta, length_normalize, nll_weight, reduction)
        if not (0.0 <= epsilon < 0.5):
            raise ValueError(f"epsilon: expected a flip rate in [0, 0.5), got {epsilon}")
        self.epsilon = float(epsilon)

    def _extra(self) -> dict:
        return {"epsilon": self.epsilon}


@register("madpo", family="preference", task="preference", paper=MADPO_PAPER,
          summary="DPO reweighted per pair by a detached function of the reward-model margin.")
class MADPOLoss(_PairwisePreferenceLoss):
    """MADPO: ``w(m) * DPO`` with ``w(m) = sigma(c(|m|) m) / sigma(m)`` for ``m > -tau`` (else 1).

    ``forward`` needs ``reward_margin=`` (``[B]``, ``r(y_w) - r(y_l)`` from a
    frozen reward model).  ``lam`` is the paper's lambda.
    """

    def __init__(self, beta: float = 0.1, c_max: float = 2.0, c_min: float = 0.5, lam: float = 1.0,
                 tau: float = P.MADPO_TAU, length_normalize: bool | None = False, nll_weight: float = 0.0,
                 reduction: str = "mean"):
        super().__init__(beta, length_normalize, nll_weight, reduction)
        P.madpo_weights(torch.zeros(1), c_max, c_min, lam, tau)  # validates the shape parameters
        self.c_max, self.c_min, self.lam, self.tau = float(c_max), float(c_min), float(lam), float(tau)

    def weights(self, reward_margin: Tensor) -> Tensor:
        return P.madpo_weights(reward_margin, self.c_max, self.c_min, self.lam, self.tau)

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor, *, reward_margin: Tensor | None = None,
                chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                margin: Tensor | float | None = None, sample_weight: Tensor | None = None,
                chosen_nll: Tensor | None = None) -> Tensor:
        if reward_margin is None:
            raise TypeError("madpo needs reward_margin= (a [B] tensor of reward-model margins r(y_w) - r(y_l))")
        return P.madpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, reward_margin,
            beta=self.beta, c_max=self.c_max, c_min=self.c_min, lam=self.lam, tau=self.tau, margin=margin,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            length_normalize=self.length_normalize, nll_weight=self.nll_weight, chosen_nll=chosen_nll,
            sample_weight=sample_weight, reduction=self.reduction)


@register("beta-dpo", family="preference", task="preference", paper=BETA_DPO_PAPER,
          summary="DPO with batch-adaptive beta and beta-guided filtering from running reward-gap statistics.")
class BetaDPOLoss(_PairwisePreferenceLoss):
    """beta-DPO with its running state.

    Buffers (saved in ``state_dict``): ``gap_mean`` (M0), ``gap_std``
    (sigma), ``num_updates`` and ``last_beta``.  In training mode each call
    first updates ``M0 <- (1 - momentum) M0 + momentum mean(M)`` and the same
    for sigma (the batch's std), as the official code does, then filters and
    computes the loss; in eval mode the state is only read.  ``momentum=0.1``
    is the official gamma 0.9.  ``keep_ratio=0.8`` keeps 80% of each batch.
    ``official_gap=False`` uses the paper's ``M_i = beta h_i``; ``True`` uses
    ``h_i`` as the official code (equivalent to ``alpha / beta``).
    Under gradient accumulation each micro-batch is one update (as in the
    official code).  Pass ``generator=`` to ``forward`` for reproducible filtering.
    """

    def __init__(self, beta: float = 0.1, alpha: float = 0.6, keep_ratio: float = 0.8, momentum: float = 0.1,
                 min_beta: float = 1e-3, official_gap: bool = False, length_normalize: bool | None = False,
                 nll_weight: float = 0.0, reduction: str = "mean"):
        super().__init__(beta, length_normalize, nll_weight, reduction)
        if not (0.0 < keep_ratio <= 1.0):
            raise ValueError(f"keep_ratio: expected a fraction in (0, 1], got {keep_ratio}")
        if not (0.0 < momentum <= 1.0):
            raise ValueError(f"momentum: expected a value in (0, 1], got {momentum}")
        if min_beta <= 0:
            raise ValueError(f"min_beta: expected > 0, got {min_beta}")
        self.alpha, self.keep_ratio, self.momentum = float(alpha), float(keep_ratio), float(momentum)
        self.min_beta, self.official_gap = float(min_beta), bool(official_gap)
        self.register_buffer("gap_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("gap_std", torch.zeros((), dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_beta", torch.full((), float(beta), dtype=torch.float64))

    @torch.no_grad()
    def update_state(self, h: Tensor) -> None:
        """EMA update of M0 and sigma from a batch of log-ratios ``h`` (detached)."""
        if h.numel() == 0:
            return
        gap = (h if self.official_gap else self.beta * h).detach().to(self.gap_mean.dtype)
        std = gap.std() if gap.numel() > 1 else torch.zeros((), dtype=gap.dtype, device=gap.device)
        g = 1.0 - self.momentum
        self.gap_mean.mul_(g).add_(gap.mean().to(self.gap_mean.device), alpha=self.momentum)
        self.gap_std.mul_(g).add_(std.to(self.gap_std.device), alpha=self.momentum)
        self.num_updates += 1

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor, *, chosen_lengths: Tensor | None = None,
                rejected_lengths: Tensor | None = None, margin: Tensor | float | None = None,
                sample_weight: Tensor | None = None, chosen_nll: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        inp = P.check_preference_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                        ref_rejected_logps)
        if self.training:
            self.update_state(P.preference_logratio(inp, chosen_lengths, rejected_lengths, self.length_normalize))
        out, beta_batch, _ = P.beta_dpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            self.gap_mean, self.gap_std, beta=self.beta, alpha=self.alpha, keep_ratio=self.keep_ratio,
            min_beta=self.min_beta, official_gap=self.official_gap, generator=generator, margin=margin,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            length_normalize=self.length_normalize, nll_weight=self.nll_weight, chosen_nll=chosen_nll,
            sample_weight=sample_weight, reduction=self.reduction, return_details=True)
        if self.training:
            self.last_beta.fill_(float(beta_batch))
        return out
