"""Self-training over any classifier (Amini et al., "Self-Training: A Survey", 2022).

Fit on the labelled set ``S``; score the unlabelled points; give a
pseudo-label ``argmax_c p(c | x)`` to those whose margin passes the round's
threshold (the policies of :func:`losskit.functional.self_training.select_pseudo_labels`);
refit on ``S`` plus the pseudo-labelled points (each pseudo-label weighted by
``pseudo_weight``); stop when a round adds nothing, when the pool is empty or
after ``max_rounds``.

The classifier is a scikit-learn style estimator (``fit(X, y[, sample_weight])``
and ``predict_proba``) or a torch ``nn.Module`` mapping ``[N, ...]`` inputs to
``[N, C]`` logits, which is wrapped in :class:`TorchClassifier` (trained from
its initial weights at every fit).  As scikit-learn's
``SelfTrainingClassifier``, pseudo-labels are kept once given (``relabel=False``);
with ``relabel=True`` every round re-labels the whole pool from the refitted
model (curriculum labelling's protocol).

Registered as the recipe ``self-training``; ``losskit.get("self-training",
policy="auto")`` binds the options; call it with ``(classifier, x_labelled,
y_labelled, x_unlabelled)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from losskit.core.checks import check_bool, check_choice, check_hparam, check_int
from losskit.core.reduction import reduce_loss
from losskit.core.registry import Paper, register
from losskit.functional.self_training import MARGINS, POLICIES, prediction_margins, select_pseudo_labels

__all__ = ["TorchClassifier", "SelfTrainingRound", "SelfTrainingResult", "run_self_training"]

SURVEY = Paper("Self-Training: A Survey", 2022, "2202.12040")


class TorchClassifier:
    """``fit``/``predict_proba`` around an ``nn.Module`` that outputs logits.

    Every ``fit`` restarts from the module's initial weights and runs
    ``epochs`` passes of Adam on the weighted cross-entropy (``sample_weight``
    through :func:`losskit.core.reduction.reduce_loss`, mean over the rows)."""

    def __init__(self, module: nn.Module, epochs: int = 100, lr: float = 1e-2, batch_size: int = 256,
                 weight_decay: float = 0.0, seed: int = 0):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
        self.module = module
        self.epochs = check_int("epochs", epochs, low=1)
        self.lr = check_hparam("lr", lr, low=0.0, low_open=True)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.weight_decay = check_hparam("weight_decay", weight_decay, low=0.0)
        self.seed = check_int("seed", seed)
        self._init = copy.deepcopy(module.state_dict())
        self.classes_: np.ndarray | None = None

    def _tensor(self, x) -> Tensor:
        p = next(self.module.parameters(), None)
        dt = p.dtype if p is not None else torch.float32
        return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(dt)

    def fit(self, x, y, sample_weight=None) -> "TorchClassifier":
        self.module.load_state_dict(self._init)
        x = self._tensor(x)
        y_np = np.asarray(y.cpu() if isinstance(y, Tensor) else y)
        self.classes_ = np.unique(y_np)
        y_t = torch.as_tensor(np.searchsorted(self.classes_, y_np), dtype=torch.long)
        w = None if sample_weight is None else torch.as_tensor(np.asarray(sample_weight), dtype=x.dtype)
        g = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam(self.module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.module.train()
        n = x.shape[0]
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, self.batch_size):
                idx = perm[s:s + self.batch_size]
                logits = self.module(x[idx])
                if logits.shape[1] < len(self.classes_):
                    raise ValueError(f"module: outputs {logits.shape[1]} logits, the labels have "
                                     f"{len(self.classes_)} classes")
                ce = nn.functional.cross_entropy(logits, y_t[idx], reduction="none")
                loss = reduce_loss(ce, "mean", None if w is None else w[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.module.eval()
        return self

    @torch.no_grad()
    def predict_proba(self, x) -> np.ndarray:
        if self.classes_ is None:
            raise RuntimeError("TorchClassifier: call fit before predict_proba")
        logits = self.module(self._tensor(x))[:, :len(self.classes_)]
        return torch.softmax(logits.double(), 1).cpu().numpy()

    def predict(self, x) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(1)]


@dataclass
class SelfTrainingRound:
    round: int
    thresholds: list[float]       # per class (in the classifier's class order)
    added: int                    # points pseudo-labelled this round
    pseudo_total: int             # pseudo-labelled points after the round
    error_added: float | None     # error rate of this round's new pseudo-labels (true labels given)
    error_total: float | None     # error rate of all current pseudo-labels (true labels given)
    extra: dict = field(default_factory=dict)


@dataclass
class SelfTrainingResult:
    classifier: Any                 # fitted on S plus the final pseudo-labels
    rounds: list[SelfTrainingRound]
    pseudo_labels: np.ndarray       # [U]: the pseudo-label of each unlabelled point, -1 where none
    labelled_round: np.ndarray      # [U]: the round that labelled it, -1 where none
    termination: str                # "no_change", "all_labeled" or "max_rounds"


def _as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim < 1:
        raise ValueError(f"{name}: expected an array with one row per point, got a scalar")
    return a


@register("self-training", family="continual", kind="recipe", paper=SURVEY,
          summary="Self-training over any classifier (sklearn estimator or torch module): margins, threshold "
                  "policies fixed/mean/curriculum/auto (transductive bound)/top-k, weighted pseudo-labels.")
def run_self_training(classifier: Any, x_labelled, y_labelled, x_unlabelled, y_unlabelled_true=None, *,
                      policy: str = "fixed",
                      threshold: float | list = 0.75, margin: str = "max", k_best: int = 10, delta: float = 0.2,
                      max_rounds: int = 10, pseudo_weight: float | str = 1.0, relabel: bool = False,
                      grid: int = 50) -> SelfTrainingResult:
    """Run self-training; returns the classifier fitted on the final set and one log per round.

    ``pseudo_weight``: the weight of each pseudo-labelled point relative to a
    labelled one (1.0 = scikit-learn's; ``"balanced"`` = MSLA's ratio, Feofanov
    et al. 2019: the ``s`` pseudo-labelled points together weigh as much as
    the ``l`` labelled ones; MSLA's code gives ``1/l`` and ``1/s``, we give
    ``1`` and ``l/s``, the same ratio, so that an estimator whose
    regularisation is relative to the total weight (logistic regression) is
    not regularised ``l`` times harder).  With weights other than 1 the
    estimator's ``fit`` must accept ``sample_weight``.  ``y_unlabelled_true``
    (optional) gives the pseudo-label error rate per round.
    """
    if isinstance(classifier, nn.Module):
        classifier = TorchClassifier(classifier)
    if not (hasattr(classifier, "fit") and hasattr(classifier, "predict_proba")):
        raise TypeError("classifier: expected an estimator with fit(X, y) and predict_proba(X), or a torch "
                        f"nn.Module that outputs logits; got {type(classifier).__name__}")
    check_choice("policy", policy, POLICIES)
    check_choice("margin", margin, MARGINS)
    if not isinstance(threshold, (list, tuple, Tensor, np.ndarray)):
        threshold = check_hparam("threshold", threshold, low=0.0, high=1.0)
    else:
        th = np.asarray(threshold.cpu() if isinstance(threshold, Tensor) else threshold, dtype=float)
        if th.ndim != 1 or not np.all(np.isfinite(th)) or th.min() < 0 or th.max() > 1:
            raise ValueError(f"threshold: expected values in [0, 1], got {th.tolist()}")
        threshold = th.tolist()
    k_best = check_int("k_best", k_best, low=1)
    delta = check_hparam("delta", delta, low=0.0, high=1.0, low_open=True)
    max_rounds = check_int("max_rounds", max_rounds, low=1)
    relabel = check_bool("relabel", relabel)
    grid = check_int("grid", grid, low=1)
    if isinstance(pseudo_weight, str):
        check_choice("pseudo_weight", pseudo_weight, ("balanced",))
    else:
        pseudo_weight = check_hparam("pseudo_weight", pseudo_weight, low=0.0)

    xl = _as_numpy(x_labelled, "x_labelled")
    yl = _as_numpy(y_labelled, "y_labelled")
    xu = _as_numpy(x_unlabelled, "x_unlabelled")
    if xl.shape[0] == 0:
        raise ValueError("x_labelled: expected at least one labelled point, got 0")
    if yl.shape != (xl.shape[0],):
        raise ValueError(f"y_labelled: expected shape ({xl.shape[0]},) (one label per labelled point), "
                         f"got {yl.shape}")
    if xu.shape[0] == 0:
        raise ValueError("x_unlabelled: expected a non-empty unlabelled set, got 0 points")
    if xu.shape[1:] != xl.shape[1:]:
        raise ValueError(f"x_unlabelled: expected points of shape {xl.shape[1:]} (as x_labelled), got {xu.shape[1:]}")
    yt = None
    if y_unlabelled_true is not None:
        yt = _as_numpy(y_unlabelled_true, "y_unlabelled_true")
        if yt.shape != (xu.shape[0],):
            raise ValueError(f"y_unlabelled_true: expected shape ({xu.shape[0]},), got {yt.shape}")

    u = xu.shape[0]
    pseudo = np.full(u, -1, dtype=yl.dtype if yl.dtype.kind in "iu" else object)
    has = np.zeros(u, dtype=bool)
    when = np.full(u, -1, dtype=np.int64)

    def fit_now():
        idx = np.nonzero(has)[0]
        x = np.concatenate([xl, xu[idx]]) if idx.size else xl
        y = np.concatenate([yl, pseudo[idx].astype(yl.dtype)]) if idx.size else yl
        if isinstance(pseudo_weight, str):
            s = idx.size
            w = np.concatenate([np.ones(len(yl)), np.full(s, len(yl) / s)]) if s else None
        elif pseudo_weight != 1.0 and idx.size:
            w = np.concatenate([np.ones(len(yl)), np.full(idx.size, pseudo_weight)])
        else:
            w = None
        if w is None:
            classifier.fit(x, y)
        else:
            classifier.fit(x, y, sample_weight=w)

    rounds: list[SelfTrainingRound] = []
    fit_now()
    termination = "max_rounds"
    for t in range(max_rounds):
        pool = np.arange(u) if relabel else np.nonzero(~has)[0]
        if pool.size == 0:
            termination = "all_labeled"
            break
        proba = torch.as_tensor(np.asarray(classifier.predict_proba(xu[pool]), dtype=np.float64))
        classes = np.asarray(getattr(classifier, "classes_", np.arange(proba.shape[1])))
        reference = None
        if policy == "curriculum":  # the quantile runs over the whole unlabelled set's current margins
            full = proba if relabel else torch.as_tensor(np.asarray(classifier.predict_proba(xu), dtype=np.float64))
            reference = prediction_margins(full, margin)
        sel, lab, th = select_pseudo_labels(proba, policy, threshold=threshold, margin=margin, k_best=k_best,
                                            round_index=t, delta=delta, grid=grid, reference_margins=reference)
        sel_np = sel.numpy()
        new_idx = pool[sel_np]
        new_lab = classes[lab.numpy()[sel_np]]
        if relabel:
            before = has.copy()
            has[:] = False
            pseudo[:] = -1
            has[new_idx] = True
            pseudo[new_idx] = new_lab
            added = int((has & ~before).sum())
            when[has & ~before] = t + 1
            when[~has] = -1
        else:
            has[new_idx] = True
            pseudo[new_idx] = new_lab
            when[new_idx] = t + 1
            added = int(new_idx.size)
        err_added = err_total = None
        if yt is not None:
            err_added = float(np.mean(new_lab != yt[new_idx])) if new_idx.size else None
            cur = np.nonzero(has)[0]
            err_total = float(np.mean(pseudo[cur] != yt[cur])) if cur.size else None
        rounds.append(SelfTrainingRound(t + 1, th.tolist(), added, int(has.sum()), err_added, err_total))
        if new_idx.size == 0:
            termination = "no_change"
            break
        fit_now()
        if has.all() and not relabel:
            termination = "all_labeled"
            break
    return SelfTrainingResult(classifier, rounds, pseudo, when, termination)
