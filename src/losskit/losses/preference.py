"""Preference-optimisation objectives (family ``preference``, task ``preference``).

Call::

    loss = losskit.get("dpo", beta=0.1)
    value = loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 chosen_lengths=lc, rejected_lengths=lr)
    value = loss(losskit.PreferenceBatch(...))          # the same, as one validated value

Every module shares one ``forward`` (:class:`PreferenceObjective`): the four
log-probabilities with the keywords ``chosen_lengths``, ``rejected_lengths``
(completion token counts, ``[B]``), ``margin`` (per-pair offset in reward
units) and ``chosen_nll`` (``[B]``, for the RPO-style term weighted by the
``nll_weight`` hyperparameter) become one :class:`~losskit.PreferenceBatch`;
``sample_weight`` (``[B]``) is applied by the one reduction.  A loss's own
per-call inputs are declared in ``inputs`` (``madpo``: ``reward_margin``,
required; ``beta-dpo``: ``generator``).  Hyperparameters are validated once,
at construction.  Formulas: :mod:`losskit.functional.preference`.

A new preference loss is its formula (a function ``fn(batch, **hp,
sample_weight=, reduction=)``) plus::

    @register("my-po", family="preference", task="preference", paper=...)
    class MyPOLoss(PreferenceObjective):
        fn = staticmethod(my_po_loss)
        defaults = {"beta": 0.1, "gamma": 0.5}     # its own hyperparameters, in signature order

The class gets ``__init__(self, beta=0.1, gamma=0.5, length_normalize=False,
nll_weight=0.0, reduction='mean')``: its ``defaults`` followed by
:data:`SHARED_DEFAULTS` (a loss may override a shared default, as ``ipo``
does ``length_normalize``).  The registry reads the hyperparameters from that
signature, so they are written once, here.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from losskit.core.context import PreferenceBatch
from losskit.core.registry import Paper, register
from losskit.functional import preference as P

__all__ = ["PreferenceObjective", "SHARED_DEFAULTS", "trl_stats", "DPOLoss", "HingePreferenceLoss", "IPOLoss", "RobustDPOLoss", "MADPOLoss",
           "BetaDPOLoss"]

DPO_PAPER = Paper("Direct Preference Optimization: Your Language Model is Secretly a Reward Model", 2023, "2305.18290")
IPO_PAPER = Paper("A General Theoretical Paradigm to Understand Learning from Human Preferences", 2023, "2310.12036")
SLIC_PAPER = Paper("SLiC-HF: Sequence Likelihood Calibration with Human Feedback", 2023, "2305.10425")
RDPO_PAPER = Paper("Provably Robust DPO: Aligning Language Models with Noisy Feedback", 2024, "2403.00409")
BETA_DPO_PAPER = Paper("beta-DPO: Direct Preference Optimization with Dynamic beta", 2024, "2407.08639")
MADPO_PAPER = Paper("Margin Adaptive DPO: Leveraging Reward Model for Granular Control in Preference Optimization",
                    2025, "2510.05342")


#: the hyperparameters every preference objective has, after its own ``defaults``
SHARED_DEFAULTS: dict[str, Any] = {"length_normalize": False, "nll_weight": 0.0, "reduction": "mean"}


def _init_from(defaults: dict[str, Any]) -> Callable[..., None]:
    """An ``__init__`` whose signature is ``defaults`` then :data:`SHARED_DEFAULTS`."""
    merged = {k: v for k, v in defaults.items() if k not in SHARED_DEFAULTS}
    merged.update({k: defaults.get(k, v) for k, v in SHARED_DEFAULTS.items()})
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    sig = inspect.Signature([inspect.Parameter("self", kind)] +
                            [inspect.Parameter(k, kind, default=v) for k, v in merged.items()])

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        PreferenceObjective.__init__(self, **dict(list(bound.arguments.items())[1:]))

    __init__.__signature__ = sig
    return __init__


@torch.no_grad()
def trl_stats(batch: PreferenceBatch, beta: float) -> dict[str, Tensor]:
    """The statistics TRL's ``DPOTrainer`` logs for a batch, under its names: the implicit
    rewards ``beta * (log pi - log pi_ref)`` of the chosen and rejected completions
    (``rewards/chosen``, ``rewards/rejected``), their difference (``rewards/margins``), the
    fraction of pairs whose chosen reward is the larger (``rewards/accuracies``) and the
    policy's summed log-probabilities (``logps/chosen``, ``logps/rejected``); each the batch
    mean, a detached 0-dim tensor (TRL computes the rewards from the summed log-probabilities
    whatever the loss's length normalisation)."""
    chosen = beta * (batch.policy_chosen_logps - batch.ref_chosen_logps).float()
    rejected = beta * (batch.policy_rejected_logps - batch.ref_rejected_logps).float()
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(), "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": batch.policy_chosen_logps.detach().float().mean(),
            "logps/rejected": batch.policy_rejected_logps.detach().float().mean()}


class PreferenceObjective(nn.Module):
    """The one forward of every preference objective.

    Subclasses set ``fn`` (the functional form, called as
    ``fn(batch, **hyperparameters, sample_weight=..., **inputs)``) and
    ``defaults`` (their own hyperparameters; the class gets an ``__init__``
    with those and :data:`SHARED_DEFAULTS`).  Construction validates every
    hyperparameter once with
    :func:`~losskit.functional.preference.check_preference_hparams` and stores
    each as an attribute (``self.hparams`` holds the arguments as given).
    ``inputs`` maps a loss's own per-call keywords to ``(required,
    description)``; :meth:`compute` can be overridden, and :meth:`build_state`
    registers the buffers of a stateful loss.
    """

    fn: ClassVar[Callable[..., Tensor] | None] = None
    defaults: ClassVar[dict[str, Any]] = {}
    inputs: ClassVar[dict[str, tuple[bool, str]]] = {}

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "defaults" in cls.__dict__ and "__init__" not in cls.__dict__:
            cls.__init__ = _init_from(cls.defaults)

    def __init__(self, **hparams: Any):
        super().__init__()
        if "hparams" not in self.__dict__:  # the registry captures them for registered classes
            object.__setattr__(self, "hparams", dict(hparams))
        for k, v in P.check_preference_hparams(**self.hparams).items():
            setattr(self, k, v)
        self.build_state()

    def build_state(self) -> None:
        """Register buffers (called once, after the hyperparameters are set); none by default."""

    @property
    def input_names(self) -> tuple[str, ...]:
        """Every keyword ``forward`` accepts."""
        return _BATCH_KEYWORDS + ("sample_weight",) + tuple(self.inputs)

    def forward(self, policy_chosen_logps: Tensor | PreferenceBatch, policy_rejected_logps: Tensor | None = None,
                ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None, *,
                chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                margin: Tensor | float | None = None, chosen_nll: Tensor | None = None,
                sample_weight: Tensor | None = None, return_stats: bool = False,
                **inputs: Any) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The loss of one batch: the four ``[B]`` log-probabilities (or one
        :class:`~losskit.PreferenceBatch`), ``sample_weight`` and the loss's own
        ``inputs``.  ``return_stats=True`` returns ``(loss, stats)``, ``stats`` the
        values TRL's DPOTrainer logs (:func:`trl_stats`, with this loss's ``beta``)."""
        batch = PreferenceBatch.of(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                   chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, margin=margin,
                                   chosen_nll=chosen_nll)
        name = getattr(self, "registry_name", type(self).__name__)
        unknown = [k for k in inputs if k not in self.inputs]
        if unknown:
            raise TypeError(f"{name}: unexpected keyword {', '.join(unknown)}; accepted: {', '.join(self.input_names)}")
        for key, (required, what) in self.inputs.items():
            if required and inputs.get(key) is None:
                raise TypeError(f"{name} needs {key}= ({what})")
        loss = self.compute(batch, sample_weight, **inputs)
        if return_stats:
            return loss, trl_stats(batch, float(getattr(self, "beta", 1.0)))
        return loss

    def hyperparameters(self, *exclude: str) -> dict[str, Any]:
        """The validated hyperparameters (those named in ``exclude`` left out)."""
        return {k: getattr(self, k) for k in self.hparams if k not in exclude}

    def compute(self, batch: PreferenceBatch, sample_weight: Tensor | None = None, **inputs: Any) -> Tensor:
        return type(self).fn(batch, **self.hyperparameters(), sample_weight=sample_weight, **inputs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())


#: the PreferenceBatch fields ``forward`` takes by keyword (read from its signature: written once)
_BATCH_KEYWORDS = tuple(n for n, p in inspect.signature(PreferenceObjective.forward).parameters.items()
                        if p.kind == p.KEYWORD_ONLY and n not in ("sample_weight", "return_stats"))


@register("dpo", family="preference", task="preference", paper=DPO_PAPER,
          summary="DPO sigmoid loss -log sigma(beta h); ln 2 at zero margin.")
class DPOLoss(PreferenceObjective):
    """Direct Preference Optimization: ``-log sigma(beta h - margin)`` (+ ``nll_weight`` NLL(y_w), RPO)."""

    fn = staticmethod(P.dpo_loss)
    defaults = {"beta": 0.1}


@register("hinge", family="preference", task="preference", paper=SLIC_PAPER,
          summary="SLiC hinge on the DPO log-ratio: max(0, 1 - beta h).")
class HingePreferenceLoss(PreferenceObjective):
    """Hinge (SLiC / TRL ``hinge``): ``max(0, 1 - (beta h - margin))``; ``1/beta`` is the log-ratio margin."""

    fn = staticmethod(P.hinge_loss)
    defaults = {"beta": 0.1}


@register("ipo", family="preference", task="preference", paper=IPO_PAPER,
          summary="IPO squared loss (h - 1/(2 beta))^2, length-normalised when lengths are given (as TRL).")
class IPOLoss(PreferenceObjective):
    """IPO: ``(h - (1/2 + margin)/beta)^2``.

    ``length_normalize=None`` (default) divides each log-ratio by its
    completion length when ``chosen_lengths`` and ``rejected_lengths`` are
    given (TRL's form, confirmed with the IPO authors); ``False`` is the
    paper's unnormalised equation; ``True`` requires the lengths.  Only one of
    the two lengths is an error (never a silently unnormalised loss).
    """

    fn = staticmethod(P.ipo_loss)
    defaults = {"beta": 0.1, "length_normalize": None}


@register("robust", family="preference", task="preference", paper=RDPO_PAPER,
          summary="Robust DPO, unbiased under label-flip rate epsilon; epsilon=0 is DPO.")
class RobustDPOLoss(PreferenceObjective):
    """rDPO: ``[-(1-eps) log sigma(z) + eps log sigma(-z)] / (1 - 2 eps)``, ``z = beta h - margin``."""

    fn = staticmethod(P.robust_dpo_loss)
    defaults = {"beta": 0.1, "epsilon": 0.1}


@register("madpo", family="preference", task="preference", paper=MADPO_PAPER,
          summary="DPO reweighted per pair by a detached function of the reward-model margin.")
class MADPOLoss(PreferenceObjective):
    """MADPO: ``w(m) * DPO`` with ``w(m) = sigma(c(|m|) m) / sigma(m)`` for ``m > -tau`` (else 1).

    ``forward`` needs ``reward_margin=`` (``[B]``, ``r(y_w) - r(y_l)`` from a
    frozen reward model).  ``lam`` is the paper's lambda.
    """

    fn = staticmethod(P.madpo_loss)
    defaults = {"beta": 0.1, "c_max": 2.0, "c_min": 0.5, "lam": 1.0, "tau": P.MADPO_TAU}
    inputs = {"reward_margin": (True, "a [B] tensor of reward-model margins r(y_w) - r(y_l)")}

    def weights(self, reward_margin: Tensor) -> Tensor:
        return P.madpo_weights(reward_margin, self.c_max, self.c_min, self.lam, self.tau)


@register("beta-dpo", family="preference", task="preference", paper=BETA_DPO_PAPER,
          summary="DPO with batch-adaptive beta and beta-guided filtering from running reward-gap statistics.")
class BetaDPOLoss(PreferenceObjective):
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

    defaults = {"beta": 0.1, "alpha": 0.6, "keep_ratio": 0.8, "momentum": 0.1, "min_beta": 1e-3,
                "official_gap": False}
    inputs = {"generator": (False, "a torch.Generator for reproducible filtering")}

    def build_state(self) -> None:
        self.register_buffer("gap_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("gap_std", torch.zeros((), dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_beta", torch.full((), self.beta, dtype=torch.float64))

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

    def compute(self, batch: PreferenceBatch, sample_weight: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        if self.training:
            self.update_state(P.preference_logratio(batch, self.length_normalize))
        out, beta_batch, _ = P.beta_dpo_loss(batch, self.gap_mean, self.gap_std, generator=generator,
                                             sample_weight=sample_weight, return_details=True,
                                             **self.hyperparameters("momentum"))
        if self.training:
            self.last_beta.copy_(beta_batch.detach())
        return out
