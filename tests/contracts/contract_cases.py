"""Case factories for the contract suite: for every registered entry, how to
build it small and what valid inputs look like.

A new entry gets the whole suite by registering, as long as its kind/task has
a generic factory here:

* objective, task ``embedding``: ``loss(embeddings [B, D], labels [B],
  sample_weight=None)``; ``num_classes`` / ``embedding_dim`` are filled in
  when the constructor needs them; labels are class-balanced (every class has
  >= 2 rows, so the episode losses' default support/query split has queries);
* objective, task ``preference``: the four ``[B]`` log-prob tensors;
* entries of task ``logits`` listed in :data:`LOGITS_PAIRED` also take a second
  ``[B, C]`` logit tensor (differentiated too);
* objective, task ``paired``: ``loss(a [B, D], b [B, D], sample_weight=None)``, row i of a and b a
  positive pair; entries with more inputs (hard negatives) have a row in :data:`PAIRED_INPUTS`;
* objective, task ``logits``: ``loss(logits [B, NUM_CLASSES], labels [B], ...)``
  (reference-model logits and other extras come from EXTRA_INPUTS);
* weighter, memory, miner: built with their defaults (``memory_size`` small);
* optimizer: ``get(name, params)``; scheduler: ``get(name, optimizer)``;
* recipe: needs a runner in :data:`RECIPE_RUNS`.

Entries that need more (another required hyperparameter, an extra input,
another mean denominator, a documented exemption) have a row in the tables
below.  An entry with no case is a test *failure* saying
``no contract case for <name>``, never a silent skip.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import Tensor

import losskit

B = 12  # default batch: 3 classes x 4 rows
D = 8
NUM_CLASSES = 5  # for heads: tiny
MARGIN_HEADS = {  # head variants run for every objective with a ``head`` hyperparameter
    "dense": {"head": "dense"},
    "chunked": {"head": "chunked", "chunk_size": 2},  # several class chunks even at C = 5
    "fused": {"head": "fused"},
    "sampled": {"head": "sampled", "sample_rate": 0.8},  # 4 of 5 classes: positives plus a random one
}

PREF_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


class NoCase(Exception):
    pass


def fail_no_case(name: str, why: str) -> None:
    pytest.fail(f"no contract case for {name!r}: {why}. Add a row to tests/contracts/contract_cases.py "
                "(a new kind/task needs a case factory; an entry with extra required hyperparameters or "
                "inputs needs a row in EXTRA_HPARAMS / EXTRA_INPUTS).", pytrace=False)


# ----------------------------------------------------------------------------- per-entry tables

#: constructor hyperparameters an entry needs besides the generic ones
EXTRA_HPARAMS: dict[str, dict[str, Any]] = {
    "comp-sum": {"tau": 1.5},   # its default tau = 1 is cross-entropy's case; test a GCE one
    "pamc": {"num_clusters": 3},
}

#: extra keyword inputs per entry: name -> {keyword: builder(B, dtype, device, generator)}
EXTRA_INPUTS: dict[str, dict[str, Callable]] = {
    # negative-flip updates (losses/negative_flips.py): an old model on the first 3 classes, a new one on all
    "mpt": {"old_logits": lambda b, dt, dev, g: (torch.randn(b, 3, generator=g, dtype=torch.float64) * 2).to(dt).to(dev),
            "new_logits": lambda b, dt, dev, g: (torch.randn(b, NUM_CLASSES, generator=g, dtype=torch.float64) * 2)
            .to(dt).to(dev)},
    "focal-distillation": {"ref_logits": lambda b, dt, dev, g: (torch.randn(b, 3, generator=g, dtype=torch.float64)
                                                                * 2).to(dt).to(dev)},
    # MADPO: reward-model margins r(y_w) - r(y_l) (losses/preference.py)
    "madpo": {"reward_margin": lambda b, dt, dev, g: (torch.randn(b, generator=g, dtype=torch.float64) * 3)
              .to(dt).to(dev)},
}


def _hard_negatives(b, d, dt, dev, g, h=2):
    return torch.randn(b, h, d, generator=g, dtype=torch.float64).to(dt).to(dev)


def _concreteness(b, d, dt, dev, g, h=2):
    return (1 + 4 * torch.rand(b, h, generator=g, dtype=torch.float64)).to(dt).to(dev)  # the 1-5 norms' scale


#: task ``paired``: extra inputs per entry, name -> {keyword: (builder(B, D, dtype, device, generator),
#: differentiable)}; a differentiable input is gradchecked and poisoned like a and b
PAIRED_INPUTS: dict[str, dict[str, tuple[Callable, bool]]] = {
    # Cement: H = 2 perturbed-caption embeddings per row and the concreteness of each changed word
    "cement": {"hard_negatives": (_hard_negatives, True), "concreteness": (_concreteness, False)},
}


def _pamc_inputs(b, d, dtype, device, g, noncontiguous=False) -> "Inputs":
    """PamC: embeddings [B, D] and A~ of their 1-NN graph (2 hops); one node: a self-loop."""
    from losskit.functional.contrastive import knn_adjacency, propagated_adjacency

    x = torch.randn(d, b, generator=g, dtype=torch.float64).t() if noncontiguous else \
        torch.randn(b, d, generator=g, dtype=torch.float64)
    if b >= 2:
        adj = propagated_adjacency(knn_adjacency(x, 1), 2).to(torch.float64)
    else:
        adj = torch.sparse_coo_tensor(torch.zeros(2, b, dtype=torch.long), torch.ones(b, dtype=torch.float64),
                                      (b, b)).coalesce()
    return Inputs(("embeddings", "adjacency"), {"embeddings": x.to(dtype).to(device), "adjacency": adj.to(device)},
                  ("embeddings",), None)


#: task ``other``: entry -> builder(B, D, dtype, device, generator, noncontiguous) -> Inputs
OTHER_INPUTS: dict[str, Callable] = {
    "pamc": _pamc_inputs,
}


#: logits objectives that take a second [B, C] logits input, by keyword (task 'logits')
LOGITS_PAIRED: dict[str, str] = {
    # h(x') of the smooth adversarial comp-sum loss (losses/comp_sum.py)
    "adversarial-comp-sum": "adv_logits",
}


def _query_rows(inp: "Inputs") -> Tensor:
    """The documented default split: the first ceil(n_c / 2) rows of each
    class (in batch order) are support, the rest are queries."""
    y = inp.labels.tolist()
    seen: dict[int, int] = {}
    total = {c: y.count(c) for c in set(y)}
    q = []
    for c in y:
        seen[c] = seen.get(c, 0) + 1
        q.append(seen[c] > (total[c] + 1) // 2)
    return torch.tensor(q, dtype=torch.bool)


#: rows an objective scores (others hold 0 with reduction='none'); the
#: documented mean denominator is their number unless DENOMINATORS says otherwise
SCORED_ROWS: dict[str, Callable[["Inputs"], Tensor]] = {
    # episode losses: support rows define the prototypes and are not scored;
    # 'mean' divides by the number of query rows (functional/episodes.py)
    "proto-triplet": _query_rows,
    "gpam": _query_rows,
}

#: documented 'mean' denominators other than the number of scored rows: fn(inputs, hparams) -> N
DENOMINATORS: dict[str, Callable[["Inputs", dict], float]] = {
    # beta-DPO: the mean is over the pairs kept by the beta-guided filter (paper and official code)
    "beta-dpo": lambda inp, hp: max(1, int(inp.B * hp.get("keep_ratio", 0.8))) if inp.B else 1,
}

#: entries whose per-row gradient depends only on that row (a zero weight on
#: row i gives a zero gradient on row i, not just a zero total); default: the
#: families below, minus the exceptions
ROW_INDEPENDENT_FAMILIES = ("baseline", "margin", "preference")
ROW_COUPLED = {
    "unpg": "in-batch negative pairs enter every row's softmax",
}

#: entries whose 'none' output does not follow a permutation of the rows, and why
NOT_PERMUTATION_EQUIVARIANT = {
    "elastic-arcface": "margins are drawn per row in batch order",
    "elastic-cosface": "margins are drawn per row in batch order",
    "beta-dpo": "the beta-guided filter draws the kept pairs at random, in batch order",
    "pamc": "the graph (adjacency) is not permuted by the generic row permutation; "
            "tests/losses/test_contrastive_pamc.py permutes nodes and graph together",
}

#: entries that gradcheck cannot check, and why (the gradient is right by design, not the full derivative)
GRADCHECK_EXEMPT = {
    "cfcd": "scale and margin are detached batch statistics (stop-gradient, as the paper)",
    "beta-dpo": "beta_batch is a detached batch statistic (as the paper and official code)",
    "pamc": "the target distribution P is detached (as DEC, the paper and the official code); "
            "tests/losses/test_contrastive_pamc.py gradchecks with P given",
}

#: the no-host-sync contract (test_forward_makes_no_host_sync_with_checks_off): what reads tensors on
#: the host by design even with ``losskit.tensor_checks(False)``, so it cannot be traced by
#: ``torch.compile(fullgraph=True)``.  Key: an entry name (every head) or ``"head=<backend>"`` (every
#: entry on that head); value: the reason, shown in the skip message.  Everything else must pass
#: (docs/margin.md, "torch.compile and tensor_checks(False)").
HOST_SYNC_EXEMPT = {
    "head=fused": "the fused kernel groups target columns by class tile (a host list per row block) and "
                  "recomputes the rows whose fixed-reference sum underflows (a data-dependent row set); "
                  "head='auto' picks chunked/dense instead with tensor checks off",
    "head=sampled": "Partial FC draws a data-dependent class set (torch.unique of the batch's positives)",
    "cfcd": "the adaptive scale and margin come from batch statistics (the median by default) read as "
            "Python floats",
    "unpg": "box-and-whisker filtering keeps a data-dependent number of in-batch negatives",
    "multi-similarity": "the block kernel lists each row block's mined pairs with nonzero (a data-dependent "
                        "count); that is what keeps it near the matmul floor (docs/pair.md)",
    "tcm": "its default base loss is multi-similarity (see there); the regulariser alone is sync-free",
    "triplet": "semi-hard (the default) and all mining walk row blocks that list each block's mined "
               "triplets with nonzero (a data-dependent count); mining='hard' is sync-free and compiles "
               "(tests/losses/test_pair_no_sync.py)",
}
# The probe patches the Python-level reads (item, tolist, bool, int, float, nonzero); ops whose output shape
# depends on the data inside C++ (torch.unique, boolean-mask indexing: the episode losses' query split,
# semi-hard mining) are not caught by it -- the torch.compile(fullgraph=True) tests in tests/heads and
# tests/losses are the check for what is claimed to compile.


def host_sync_exemption(case: "ObjectiveCase") -> str | None:
    """The documented reason why ``case`` may read tensors on the host, or ``None``."""
    head = case.variant.get("head")
    return HOST_SYNC_EXEMPT.get(case.name) or (HOST_SYNC_EXEMPT.get(f"head={head}") if head else None)


#: hyperparameter values that must be refused at construction with a ValueError naming them
#: (found by trying the library from outside, issue 9 item 4; NaN is checked for every float)
INVALID_HPARAMS: dict[str, dict[str, list]] = {
    "combined-margin": {"m1": [0.0, -1.0]},
    "elastic-arcface": {"mean": [math.pi]},
    "cfcd": {"min_scale": [0.0]},
    "triplet": {"margin": [-1.0]},
    "arcface": {"margin": [-0.1, math.pi]},
    "cosface": {"margin": [-0.1]},
    "dpo": {"beta": [0.0, -1.0]},
    "mpt": {"temperature": [0.0, -1.0], "alpha": [-1.0], "beta": [-1.0]},
    "focal-distillation": {"temperature": [0.0], "alpha": [-0.5]},
}

#: entries the issue says must be registered, by kind and class (or function) name
EXPECTED_ENTRIES = {
    ("weighter", "GLOW"),
    ("memory", "CrossBatchMemory"),
    ("miner", "MultiSimilarityMiner"),
    ("miner", "TripletMiner"),
    ("recipe", "run_drift"),
    ("optimizer", "FRUGAL"),
    ("scheduler", "LinearDecayLR"),
    ("scheduler", "RefinedLR"),
    ("recipe", "run_ignite"),
    ("recipe", "run_fedavg"),
    ("recipe", "run_fedprox"),
    ("recipe", "run_fedld"),
    ("recipe", "run_fedlex"),
    ("recipe", "run_self_training"),
    ("recipe", "run_model_update"),
    ("recipe", "run_online_continual"),
    ("recipe", "run_dmm"),
    ("recipe", "run_oracle_matching"),
    ("recipe", "run_gradient_ascent"),
    ("recipe", "run_gradient_difference"),
    ("recipe", "run_retain_finetune"),
    ("recipe", "run_ast"),
    ("recipe", "run_mtt"),
    ("recipe", "run_regularized_search"),
    ("recipe", "run_ensemble_distillation"),
}


# ----------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    """Named inputs of one call: ``positional`` names, then keywords."""

    positional: tuple[str, ...]
    tensors: dict[str, Tensor]
    float_names: tuple[str, ...]  # the differentiable inputs (poisoned by the non-finite test)
    labels: Tensor | None = None
    extra_float: tuple[str, ...] = ()  # other float inputs that must be finite (not differentiated)

    @property
    def B(self) -> int:
        return self.tensors[self.positional[0]].shape[0]

    def replace(self, **new: Tensor) -> "Inputs":
        t = dict(self.tensors)
        t.update(new)
        return Inputs(self.positional, t, self.float_names, t.get("labels", self.labels), self.extra_float)

    def leaves(self) -> "Inputs":
        """A copy whose float inputs are fresh leaves requiring grad."""
        return self.replace(**{n: self.tensors[n].detach().clone().requires_grad_(True) for n in self.float_names})

    def to(self, dtype: torch.dtype | None = None, device=None) -> "Inputs":
        new = {}
        for n in self.float_names + self.extra_float:
            new[n] = self.tensors[n].detach().to(device=device or self.tensors[n].device, dtype=dtype)
        if device is not None:
            for n, t in self.tensors.items():
                if n not in new:
                    new[n] = t.to(device)
        return self.replace(**new)

    def permute(self, perm: Tensor) -> "Inputs":
        return self.replace(**{n: t[perm] for n, t in self.tensors.items()})

    def call(self, obj, sample_weight: Tensor | None = None, seed: int = 0):
        torch.manual_seed(seed)  # entries that draw random numbers (ElasticFace, Partial FC, beta-DPO)
        args = [self.tensors[n] for n in self.positional]
        kw = {n: t for n, t in self.tensors.items() if n not in self.positional}
        if sample_weight is not None:
            kw["sample_weight"] = sample_weight
        return obj(*args, **kw)


def balanced_labels(b: int, g: torch.Generator, one_class: bool = False) -> Tensor:
    """Shuffled labels with ``min(3, ceil(b / 2))`` classes of near-equal size."""
    if one_class or b == 0:
        return torch.zeros(b, dtype=torch.long)
    c = min(3, max(1, (b + 1) // 2))
    y = torch.arange(b) % c
    return y[torch.randperm(b, generator=g)]


def class_order_permutation(labels: Tensor, g: torch.Generator) -> Tensor:
    """A random permutation that keeps the order of the rows within each class
    (so that batch-order rules, like the episode split, are unchanged)."""
    slots = labels[torch.randperm(labels.shape[0], generator=g)]
    queues = {int(c): (labels == c).nonzero().squeeze(1).tolist() for c in torch.unique(labels)}
    return torch.tensor([queues[int(c)].pop(0) for c in slots], dtype=torch.long)


# ----------------------------------------------------------------------------- objective cases

@dataclass
class ObjectiveCase:
    id: str
    name: str
    spec: Any
    variant: dict[str, Any] = field(default_factory=dict)
    missing: str | None = None  # why no case can be built (reported as a failure)

    # -- building
    @property
    def task(self) -> str:
        return self.spec.task

    def hparams(self, d: int = D) -> dict[str, Any]:
        if self.missing:
            fail_no_case(self.name, self.missing)
        hp = dict(EXTRA_HPARAMS.get(self.name, {}))
        req = set(self.spec.required) | set(self.spec.hparams)
        if "num_classes" in req:
            hp["num_classes"] = NUM_CLASSES
        if "embedding_dim" in req:
            hp["embedding_dim"] = d
        hp.update(self.variant)
        return hp

    def build(self, reduction: str = "mean", *, d: int = D, device="cpu", seed: int = 0, **over):
        torch.manual_seed(seed)
        hp = {**self.hparams(d), **over}
        if "reduction" in self.spec.hparams or "reduction" in self.spec.required:
            hp["reduction"] = reduction
        obj = losskit.get(self.name, **hp)
        if isinstance(obj, torch.nn.Module):
            obj = obj.to(device)
        return obj

    # -- inputs
    def inputs(self, b: int = B, *, d: int = D, dtype=torch.float32, device="cpu", seed: int = 0,
               one_class: bool = False, noncontiguous: bool = False) -> Inputs:
        if self.missing:
            fail_no_case(self.name, self.missing)
        g = torch.Generator().manual_seed(seed)
        extra = {k: f(b, dtype, device, g) for k, f in EXTRA_INPUTS.get(self.name, {}).items()}
        if self.task == "embedding":
            if noncontiguous:
                x = torch.randn(d, b, generator=g, dtype=torch.float64).t()  # strides (1, B)
            else:
                x = torch.randn(b, d, generator=g, dtype=torch.float64)
            x = x.to(dtype).to(device)
            if noncontiguous:
                assert b < 2 or d < 2 or not x.is_contiguous()
            y = balanced_labels(b, g, one_class).to(device)
            return Inputs(("embeddings", "labels"), {"embeddings": x, "labels": y, **extra}, ("embeddings",), y,
                          tuple(extra))
        if self.task == "other" and self.name in OTHER_INPUTS:
            return OTHER_INPUTS[self.name](b, d, dtype, device, g, noncontiguous)
        if self.task == "paired":
            ts = {}
            for n in ("a", "b"):
                t = torch.randn(d, b, generator=g, dtype=torch.float64).t() if noncontiguous else \
                    torch.randn(b, d, generator=g, dtype=torch.float64)
                ts[n] = t.to(dtype).to(device)
            diff, other = ["a", "b"], []
            for n, (f, differentiable) in PAIRED_INPUTS.get(self.name, {}).items():
                ts[n] = f(b, d, dtype, device, g)
                (diff if differentiable else other).append(n)
            return Inputs(("a", "b"), {**ts, **extra}, tuple(diff), None, tuple(other) + tuple(extra))
        if self.task == "logits":
            c = NUM_CLASSES
            z = (torch.randn(c, b, generator=g, dtype=torch.float64).t() if noncontiguous
                 else torch.randn(b, c, generator=g, dtype=torch.float64)) * 2
            ts = {"logits": z.to(dtype).to(device)}
            y = balanced_labels(b, g, one_class).to(device)
            floats = ("logits",)
            paired = LOGITS_PAIRED.get(self.name)
            if paired:   # a second logits input, differentiated too (h(x') of adversarial comp-sum)
                ts[paired] = (z + 0.3 * torch.randn(z.shape, generator=g, dtype=torch.float64)).to(dtype).to(device)
                floats = ("logits", paired)
            return Inputs(("logits", "labels"), {**ts, "labels": y, **extra}, floats, y, tuple(extra))
        if self.task == "preference":
            ts = {}
            for n in PREF_NAMES:
                t = -(torch.rand(2 * b if noncontiguous else b, generator=g, dtype=torch.float64) * 8 + 0.5)
                t = t.to(dtype).to(device)
                ts[n] = t[::2] if noncontiguous else t
            return Inputs(PREF_NAMES, {**ts, **extra}, PREF_NAMES, None, tuple(extra))
        fail_no_case(self.name, f"task {self.task!r} has no input factory")

    # -- documented rules
    def scored(self, inp: Inputs) -> Tensor:
        f = SCORED_ROWS.get(self.name)
        dev = inp.tensors[inp.positional[0]].device
        return f(inp).to(dev) if f is not None else torch.ones(inp.B, dtype=torch.bool, device=dev)

    def denominator(self, inp: Inputs) -> float:
        f = DENOMINATORS.get(self.name)
        if f is not None:
            return float(f(inp, {**self.spec.hparams, **self.hparams()}))
        return float(max(int(self.scored(inp).sum()), 1))

    @property
    def row_independent(self) -> bool:
        return self.spec.family in ROW_INDEPENDENT_FAMILIES and self.name not in ROW_COUPLED

    @property
    def has_classes(self) -> bool:
        return self.task == "embedding"


def objective_cases() -> list[ObjectiveCase]:
    out = []
    for s in losskit.specs(kind="objective"):
        missing = None
        if s.task not in ("embedding", "preference", "paired", "logits") and s.name not in OTHER_INPUTS:
            missing = f"task {s.task!r} has no input factory"
        else:
            generic = {"num_classes", "embedding_dim"}
            extra = [r for r in s.required if r not in generic and r not in EXTRA_HPARAMS.get(s.name, {})]
            if extra:
                missing = f"required hyperparameters {extra} have no value in EXTRA_HPARAMS"
        out.append(ObjectiveCase(s.name, s.name, s, {}, missing))
        if missing is None and "head" in s.hparams:
            for hname, v in MARGIN_HEADS.items():
                out.append(ObjectiveCase(f"{s.name}[head={hname}]", s.name, s, dict(v)))
    return out


# ----------------------------------------------------------------------------- other kinds

#: constructor hyperparameters per entry of the other kinds
KIND_HPARAMS: dict[str, dict[str, Any]] = {
    # FRUGAL: an SVD subspace renewed every 2 steps, so the round trip crosses a renewal (optim/frugal.py)
    "frugal": {"projection": "svd", "rho": 0.5, "update_gap": 2},
    # the refined schedule needs a previous run's gradient norms (optim/schedules.py)
    "refined": {"grad_norms": [3.0, 2.5, 2.0, 1.0, 1.2, 0.8, 0.7, 0.9, 0.5, 0.4], "warmup_steps": 2},
}

#: for the "load_state_dict keeps the constructor's hyperparameters" check: other values per entry
ALT_HPARAMS: dict[str, dict[str, Any]] = {
    "glow": {"alpha": 2.0, "beta": 5.0, "w_min": 0.1},
}

def _toy_margins(ps):
    """Margins of the contract's least-squares toy (the target's direction as the label)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, ps[0].shape[0], generator=g).to(ps[0].device)
    t = torch.randn(16, ps[0].shape[1], generator=g).to(ps[0].device)
    return ((x @ ps[0] + ps[1]) * t).sum(-1)


#: optimizers whose step takes a closure returning per-sample margins, not a loss (Normalized LR+GD:
#: the step is normalized by the logistic weights sigma(-m_i)); the contract steps them with this closure
MARGIN_CLOSURE_OPTIMIZERS: dict[str, Callable] = {
    "normalized-lr-gd": _toy_margins,
}

#: fills for common required hyperparameters of optimizers and schedulers
COMMON_FILLS = {"lr": 0.05, "total_steps": 10, "T_max": 10, "step_size": 2, "num_training_steps": 10,
                "warmup_steps": 2, "num_warmup_steps": 2}


def kind_hparams(s, extra: dict | None = None) -> dict[str, Any]:
    hp = dict(KIND_HPARAMS.get(s.name, {}))
    if s.kind == "memory" and "memory_size" in s.hparams:
        hp.setdefault("memory_size", 16)  # wraps around within a few steps of B = 6
    if s.kind == "memory" and "start_iteration" in s.hparams:
        hp.setdefault("start_iteration", 2)  # a warm-up, so that a lost iteration count shows
    for r in s.required:
        if r in hp:
            continue
        if r in COMMON_FILLS:
            hp[r] = COMMON_FILLS[r]
        else:
            fail_no_case(s.name, f"required hyperparameter {r!r} has no value in KIND_HPARAMS")
    hp.update(extra or {})
    return hp


def _toy_drift(recipe) -> None:
    from losskit.recipes.drift import DSATRecord

    class Tab(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.zeros(3, 4))
            self.g = torch.Generator().manual_seed(0)

        def sample(self, contexts):
            return [int(torch.multinomial(torch.softmax(self.logits[x].detach(), 0), 1, generator=self.g))
                    for x, _, _ in contexts]

        def logprobs(self, prompts, responses):
            lp = torch.log_softmax(self.logits[torch.as_tensor(prompts)], -1)
            return lp.gather(1, torch.as_tensor(responses)[:, None]).squeeze(1)

    pol = Tab()
    logs = recipe(pol, [DSATRecord(x, 0) for x in range(3)])
    assert len(logs) >= 1 and all(math.isfinite(lg.loss_last) for lg in logs if lg.pairs)


def _toy_ignite(recipe) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.sin(x).sum(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    logs = recipe(model, (x, y))
    assert len(logs) == 2 * 2 and all(math.isfinite(lg.loss) and lg.lam >= 0 for lg in logs)
    assert logs[-1].loss < logs[0].loss


def _toy_federated(recipe) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hist = recipe(model, [(x[:20], y[:20]), (x[20:], y[20:])], eval_data=(x, y))
    assert len(hist.rounds) == 2 and all(math.isfinite(r["accuracy"]) for r in hist.rounds)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


_FED = {"rounds": 2, "local_epochs": 1, "batch_size": 8}
def _toy_blobs(n_per: int, c: int, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * 3
    y = torch.arange(c).repeat_interleave(n_per)
    return centres[y] + torch.randn(len(y), d, generator=g), y


def _toy_self_training(recipe) -> None:
    torch.manual_seed(0)
    x, y = _toy_blobs(10, 3)
    lab = torch.arange(len(y)) % 5 == 0
    res = recipe(torch.nn.Linear(4, 3), x[lab], y[lab], x[~lab], y_unlabelled_true=y[~lab])
    assert res.rounds and res.rounds[0].added > 0 and res.pseudo_labels.shape == (int((~lab).sum()),)


def _toy_model_update(recipe) -> None:
    from losskit.recipes.model_update import train_classifier
    torch.manual_seed(0)
    x, y = _toy_blobs(8, 3)
    old = torch.nn.Linear(4, 2)
    train_classifier(old, x[y < 2], y[y < 2], epochs=2)
    res = recipe(torch.nn.Linear(4, 3), x, y, old)
    assert len(res.epoch_losses) == 2 and all(math.isfinite(v) for v in res.epoch_losses)


def _toy_mvp(recipe) -> None:
    from losskit.data.streams import si_blurry_stream
    from losskit.recipes.prompt_vit import TinyViT
    torch.manual_seed(0)
    y = torch.arange(6).repeat_interleave(4)
    x = torch.rand(len(y), 1, 8, 8)
    bb = TinyViT(image_size=8, patch_size=4, dim=8, depth=3, heads=2, num_classes=3)
    res = recipe(bb, x, y, x, y, si_blurry_stream(y, 2, seed=0))
    assert 0 <= res.a_auc <= 1 and len(res.curve.task_end) == 2


def _toy_unlearning(kind: str) -> Callable:
    def run(recipe) -> None:
        from losskit.recipes.unlearning import Datamodels, UnlearningData

        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(12, 4, generator=g), torch.randint(3, (12,), generator=g)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        before = copy.deepcopy(model.state_dict())
        data = UnlearningData(x, y, torch.tensor([0, 5]))
        extra = {"dmm": (Datamodels(torch.randn(12, 12, 3, generator=g)),),
                 "oracle-matching": (torch.randn(12, 3, generator=g),)}.get(kind, ())
        log = recipe(model, data, *extra)
        assert log.steps >= 1 and math.isfinite(log.loss_last) and log.seconds >= 0
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "model unchanged"
    return run


def _toy_distillation(recipe) -> None:
    from losskit.recipes.distillation import train_expert

    g = torch.Generator().manual_seed(0)
    y = torch.arange(2).repeat_interleave(6)
    x = torch.randn(12, 1, 3, 3, generator=g) + y[:, None, None, None]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2, 2))
    traj = train_expert(copy.deepcopy(net), x, y, epochs=3, lr=0.1)
    kw = {"init_model": net} if recipe.func.registry_name == "ast" else {}
    out = recipe(net, [traj], x, y, **kw)
    assert out.images.shape == (4, 1, 3, 3) and torch.isfinite(out.images).all() and len(out.losses) == 2


def _toy_search(recipe) -> None:
    res = recipe(lambda p: (p["a"] - 2) ** 2 + (p["b"] - 1) ** 2)
    assert res.best == {"a": 2, "b": 1} and res.certified


def _toy_ensemble_distillation(recipe) -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Flatten(), torch.nn.Linear(4, 4))
    before = copy.deepcopy(student.state_dict())
    data = lambda n: (torch.randint(4, (n, 2), generator=g), torch.randint(4, (n,), generator=g))
    log = recipe(student, data(8), data(16))
    assert log.steps >= 1 and math.isfinite(log.loss_last)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def _toy_unfolding(recipe) -> None:
    from losskit.recipes.unfolded import SparseProblem, UnfoldedISTA

    pb = SparseProblem(n=8, m=4, seed=0)
    model = UnfoldedISTA(pb.a, lam=0.05, layers=2)
    log = recipe(model, pb)
    assert len(log.losses) == 3 and all(math.isfinite(v) for v in log.losses)


def _toy_linear_mdp(recipe) -> None:
    from losskit.recipes.linear_mdp import random_linear_mdp, switching_losses

    mdp = random_linear_mdp(horizon=2, states=2, actions=2, dim=2, seed=0)
    run = recipe(mdp, switching_losses(mdp, 5, seed=0))
    assert run.regret.shape == (5,) and all(math.isfinite(v) for v in run.regret)


#: recipes: (hyperparameters for get, runner(recipe) that runs it on a toy problem and asserts)
RECIPE_RUNS: dict[str, tuple[dict, Callable]] = {
    "self-training": ({"policy": "fixed", "threshold": 0.5, "max_rounds": 2}, _toy_self_training),
    "model-update": ({"method": "mpt", "epochs": 2, "lr": 0.05}, _toy_model_update),
    "mvp": ({"method": "mvp", "online_iter": 1, "eval_period": 8, "batch_size": 4, "num_prompts": 2}, _toy_mvp),
    "drift": ({"iterations": 1, "steps_per_iteration": 2, "batch_size": 2}, _toy_drift),
    "ignite": ({"epochs": 2, "batch_size": 32, "lr": 1e-2}, _toy_ignite),
    "fedavg": (_FED, _toy_federated),
    "fedprox": (_FED, _toy_federated),
    "fedld": (_FED, _toy_federated),
    "fedlex": ({**_FED, "explore_epochs": 1}, _toy_federated),
    "dmm": ({"epochs": 2, "lr": 1e-2}, _toy_unlearning("dmm")),
    "oracle-matching": ({"epochs": 2, "lr": 1e-2}, _toy_unlearning("oracle-matching")),
    "gradient-ascent": ({"epochs": 1}, _toy_unlearning("gradient-ascent")),
    "gradient-difference": ({"epochs": 1}, _toy_unlearning("gradient-difference")),
    "retain-finetune": ({"epochs": 1}, _toy_unlearning("retain-finetune")),
    "ast": ({"ipc": 2, "iterations": 2, "syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 2, "lr_img": 1.0},
            _toy_distillation),
    "mtt": ({"ipc": 2, "iterations": 2, "syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 2, "lr_img": 1.0},
            _toy_distillation),
    "regularized-recipe-search": ({"grid": {"a": (0, 1, 2, 3), "b": (0, 1, 2)}, "start": {"a": 0, "b": 0}},
                                  _toy_search),
    "ensemble-distillation": ({"epochs": 1, "batch_size": 4}, _toy_ensemble_distillation),
    "deep-unfolding": ({"iterations": 3, "batch_size": 4}, _toy_unfolding),
    "log-barrier-po": ({"eta": 0.5}, _toy_linear_mdp),
}


def specs_of(kind: str) -> list:
    return losskit.specs(kind=kind)


def deepcopy(obj):
    return copy.deepcopy(obj)
