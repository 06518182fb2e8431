"""DRIFT: dissatisfaction-refined iterative preference training.

Wang et al., "DRIFT: Learning from Abundant User Dissatisfaction in
Real-World Preference Learning" (2025, arXiv:2510.02341); code cacayaya/DRIFT.

Data: records ``(x, y_dsat, u)`` -- a prompt, a response the user was
dissatisfied with (DSAT), and optional feedback.  Each iteration ``t``:

1. freeze a copy of the current policy: ``pi_t`` (the reference);
2. for every record sample ``y+ ~ pi_t(. | refine(x, y_dsat, u))`` -- the
   policy is shown the DSAT response and the feedback and asked to improve;
3. train ``pi_{t+1}`` by DPO on ``(x, y+, y_dsat)`` with reference ``pi_t``
   and the RPO term ``nll_weight * NLL(y+)``; the training prompt is ``x``
   alone (the feedback is *not* in it).

The DSAT responses stay as fixed, anchored negatives across iterations
while the positives come from the improving policy, so the margin does not
vanish (unlike self-play where both sides drift together).  An optional
seed stage trains on given ``(x, y_sat, y_dsat)`` pairs first.

Any policy works that implements :class:`SamplingPolicy`: it is an
``nn.Module`` (so it can be copied and optimised) with ``sample(contexts)``
and ``logprobs(prompts, responses)``.

Registered as the recipe ``drift``: ``losskit.get("drift", iterations=3)``
binds the options and returns ``run_drift`` to call with ``(policy, records)``.
(The function was called ``drift`` before; it is ``run_drift`` now, so that
``losskit.recipes.drift`` is this module.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from losskit.core.checks import check_hparam, check_int
from losskit.core.context import PreferenceBatch
from losskit.core.registry import Paper, register
from losskit.functional.preference import dpo_loss

__all__ = ["SamplingPolicy", "DSATRecord", "DriftIterationLog", "default_refine_context", "run_drift"]

DRIFT_PAPER = Paper("DRIFT: Learning from Abundant User Dissatisfaction in Real-World Preference Learning", 2025,
                    "2510.02341")


@runtime_checkable
class SamplingPolicy(Protocol):
    """What DRIFT needs from a policy (an ``nn.Module``)."""

    def sample(self, contexts: Sequence[Any]) -> list[Any]:
        """One response per context (no gradient needed)."""

    def logprobs(self, prompts: Sequence[Any], responses: Sequence[Any]) -> Tensor:
        """``[B]`` summed log pi(response | prompt), differentiable."""


@dataclass
class DSATRecord:
    prompt: Any
    response: Any  # the dissatisfying response: the anchored negative
    feedback: Any = None


@dataclass
class DriftIterationLog:
    iteration: int
    pairs: int
    loss_first: float
    loss_last: float
    margin_mean: float  # mean h = log-ratio margin under (pi_{t+1}, pi_t) after training
    extra: dict = field(default_factory=dict)


def default_refine_context(prompt: Any, dsat: Any, feedback: Any) -> tuple:
    """``(prompt, dsat, feedback)``: the policy decides how to read it
    (an LLM policy would format "x / previous answer / feedback / improve it")."""
    return (prompt, dsat, feedback)


def _lengths(policy: Any, responses: Sequence[Any], like: Tensor) -> Tensor | None:
    fn = getattr(policy, "lengths", None)
    if fn is None:
        return None
    return torch.as_tensor(fn(responses), dtype=like.dtype, device=like.device)


def _train_dpo(policy: nn.Module, ref_chosen: Tensor, ref_rejected: Tensor, prompts: list, chosen: list,
               rejected: list, optimizer: torch.optim.Optimizer, steps: int, batch_size: int, beta: float,
               nll_weight: float, generator: torch.Generator) -> tuple[float, float]:
    n = len(prompts)
    first = last = float("nan")
    for s in range(steps):
        idx = torch.randperm(n, generator=generator)[:batch_size].tolist()
        p = [prompts[i] for i in idx]
        yc = [chosen[i] for i in idx]
        yr = [rejected[i] for i in idx]
        pc = policy.logprobs(p, yc)
        pr = policy.logprobs(p, yr)
        lc = _lengths(policy, yc, pc)
        nll = None
        if nll_weight > 0:
            nll = -pc / (lc if lc is not None else torch.ones_like(pc))
        loss = dpo_loss(PreferenceBatch(pc, pr, ref_chosen[idx], ref_rejected[idx], chosen_nll=nll), beta=beta,
                        nll_weight=nll_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if s == 0:
            first = float(loss.detach())
        last = float(loss.detach())
    return first, last


@register("drift", family="preference", kind="recipe", paper=DRIFT_PAPER,
          summary="DRIFT: iterated DPO with anchored dissatisfied (DSAT) negatives and self-refined positives.")
def run_drift(policy: nn.Module, records: Sequence[DSATRecord], *, iterations: int = 3,
          steps_per_iteration: int = 100, batch_size: int = 32, beta: float = 0.1, nll_weight: float = 0.001,
          optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
          refine_context: Callable[[Any, Any, Any], Any] = default_refine_context,
          seed_pairs: Sequence[tuple[Any, Any, Any]] | None = None,
          accept: Callable[[DSATRecord, Any], bool] | None = None,
          callback: Callable[[int, nn.Module], dict | None] | None = None,
          seed: int = 0) -> list[DriftIterationLog]:
    """Run DRIFT in place on ``policy``; returns one log per iteration (seed stage is iteration 0).

    ``optimizer_factory(policy)`` builds a fresh optimiser each iteration
    (default Adam, lr 1e-2).  ``accept(record, y_plus)`` may drop a sampled
    positive (for example one identical to the DSAT response).  ``callback``
    runs after each iteration and may return extra numbers to log.
    Defaults follow the paper: ``beta`` 0.1, ``nll_weight`` 0.001.
    """
    if not isinstance(policy, nn.Module) or not isinstance(policy, SamplingPolicy):
        raise TypeError("policy: expected an nn.Module with sample(contexts) and logprobs(prompts, responses)")
    iterations = check_int("iterations", iterations, low=0)
    steps_per_iteration = check_int("steps_per_iteration", steps_per_iteration, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    beta = check_hparam("beta", beta, low=0.0, low_open=True)
    nll_weight = check_hparam("nll_weight", nll_weight, low=0.0)
    seed = check_int("seed", seed)
    if optimizer_factory is None:
        def optimizer_factory(m):
            return torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    logs: list[DriftIterationLog] = []

    def run_stage(t: int, prompts: list, chosen: list, rejected: list) -> None:
        ref = copy.deepcopy(policy).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            rc = ref.logprobs(prompts, chosen).detach()
            rr = ref.logprobs(prompts, rejected).detach()
        policy.train()
        opt = optimizer_factory(policy)
        first, last = _train_dpo(policy, rc, rr, prompts, chosen, rejected, opt, steps_per_iteration,
                                 batch_size, beta, nll_weight, gen)
        with torch.no_grad():
            h = (policy.logprobs(prompts, chosen) - rc) - (policy.logprobs(prompts, rejected) - rr)
        extra = (callback(t, policy) or {}) if callback is not None else {}
        logs.append(DriftIterationLog(t, len(prompts), first, last, float(h.mean()), extra))

    if seed_pairs:
        sp = list(seed_pairs)
        run_stage(0, [s[0] for s in sp], [s[1] for s in sp], [s[2] for s in sp])
    for t in range(1, iterations + 1):
        policy.eval()
        with torch.no_grad():
            y_plus = policy.sample([refine_context(r.prompt, r.response, r.feedback) for r in records])
        keep = [i for i, (r, y) in enumerate(zip(records, y_plus)) if accept is None or accept(r, y)]
        if not keep:
            logs.append(DriftIterationLog(t, 0, float("nan"), float("nan"), float("nan")))
            continue
        run_stage(t, [records[i].prompt for i in keep], [y_plus[i] for i in keep],
                  [records[i].response for i in keep])
    return logs


def __getattr__(name: str) -> Any:
    if name == "drift":
        raise AttributeError("losskit.recipes.drift.drift was renamed run_drift (losskit.recipes.drift is the "
                             "module); or build it from the registry: losskit.get('drift', **options)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
