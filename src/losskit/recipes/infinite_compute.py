"""Pre-training under infinite compute: the regularised recipe, ensembles,
asymptote fits and ensemble distillation.

Kim, Kotha, Liang, Hashimoto, "Pre-training under infinite compute" (2025,
arXiv:2509.14786); code marin-community/marin ``experiments/data_efficiency``
(``utils.py``: the hyperparameter grid and ``get_bounding_box``).

* **Neighbour-certified search** (:func:`neighbour_search`, recipe
  ``regularized-recipe-search``): hyperparameters live on a grid (the paper:
  lr in {1e-4 .. 3e-2}, weight decay in {0, 0.1, .., 6.4}, epochs in
  {1, 2, .., 64}); from a start point evaluate every one-step neighbour (one
  coordinate one grid step up or down), move to the best if it is better,
  and stop when none is.  The point is *certified* when every neighbour is
  strictly worse.  A coordinate at the edge of its grid has one neighbour
  there (the code's ``extract_neighbors`` repeats the value); the result lists
  those coordinates, since the optimum may lie beyond the grid.
* **Ensembles** (:func:`ensemble_logits`): members' logits averaged (not
  their probabilities).  The paper trains members with 2x the epochs and 1/2
  the weight decay of the best single model (:func:`member_hparams`).
* **Power laws** (:func:`fit_power_law`): ``L(N) = A / N^alpha + E`` by bounded
  least squares (``A, alpha, E >= 0``; scipy's ``curve_fit`` with ``bounds``),
  with percentile bootstrap intervals over resampled points; ``E`` is the
  asymptote (in data ``N`` for a recipe, in member count ``K`` for an
  ensemble).
* **Ensemble distillation** (:func:`run_ensemble_distillation`, recipe
  ``ensemble-distillation``): a student trained with cross-entropy on a mix of
  sequences sampled from the teacher ensemble (fraction ``mix``, 0.9) and real
  data (0.1), the paper's sequence-level distillation.

Needs scipy for the fits (``pip install 'losskit[fits]'``), imported inside
:func:`fit_power_law` only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from losskit.core.checks import check_hparam, check_int, shape_str
from losskit.core.registry import Paper, register

__all__ = ["INFINITE_COMPUTE_PAPER", "PAPER_GRID", "neighbours", "SearchResult", "neighbour_search",
           "run_regularized_search", "member_hparams", "ensemble_logits", "PowerLawFit", "fit_power_law",
           "sample_autoregressive", "DistillationLog", "run_ensemble_distillation", "gain_kept"]

INFINITE_COMPUTE_PAPER = Paper("Pre-training under infinite compute", 2025, "2509.14786")

#: the paper's grid (marin experiments/data_efficiency/utils.py)
PAPER_GRID = {
    "lr": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "weight_decay": (0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4),
    "epochs": (1, 2, 4, 8, 16, 32, 64),
}


# ----------------------------------------------------------------------------- search

def _check_grid(grid: Mapping[str, Sequence[Any]], point: Mapping[str, Any]) -> None:
    if not grid:
        raise ValueError("grid: expected at least one hyperparameter with its values")
    for k, vals in grid.items():
        if len(vals) == 0:
            raise ValueError(f"grid[{k!r}]: expected at least one value")
        if len(set(vals)) != len(vals):
            raise ValueError(f"grid[{k!r}]: values must be distinct, got {list(vals)}")
    missing = [k for k in grid if k not in point]
    extra = [k for k in point if k not in grid]
    if missing or extra:
        raise ValueError(f"start: expected exactly the grid's hyperparameters {sorted(grid)}, got {sorted(point)}")
    for k, v in point.items():
        if v not in grid[k]:
            raise ValueError(f"start[{k!r}]: expected one of the grid's values {list(grid[k])}, got {v!r}")


def neighbours(point: Mapping[str, Any], grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every point one grid step away along one coordinate (inside the grid)."""
    _check_grid(grid, point)
    out = []
    for k, vals in grid.items():
        i = list(vals).index(point[k])
        for j in (i - 1, i + 1):
            if 0 <= j < len(vals):
                out.append({**point, k: vals[j]})
    return out


@dataclass
class SearchResult:
    best: dict[str, Any]
    value: float
    certified: bool  # every one-step neighbour evaluated and strictly worse
    at_edge: list[str]  # coordinates of ``best`` on an edge of the grid
    evaluations: dict[tuple, float] = field(default_factory=dict)
    path: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_evaluations(self) -> int:
        return len(self.evaluations)


def neighbour_search(evaluate: Callable[[dict[str, Any]], float], grid: Mapping[str, Sequence[Any]],
                     start: Mapping[str, Any], *, max_evaluations: int = 100) -> SearchResult:
    """Coordinate descent over ``grid`` from ``start`` until no one-step neighbour is better.

    ``evaluate(hparams) -> loss`` (lower is better) is called once per point.
    Stops with ``certified=False`` when ``max_evaluations`` runs out.
    """
    if not callable(evaluate):
        raise TypeError("evaluate: expected a callable hparams -> loss")
    max_evaluations = check_int("max_evaluations", max_evaluations, low=1)
    grid = {k: tuple(v) for k, v in grid.items()}
    start = dict(start)
    _check_grid(grid, start)
    keys = list(grid)
    cache: dict[tuple, float] = {}
    t0 = time.perf_counter()

    def value(p: dict) -> float | None:
        key = tuple(p[k] for k in keys)
        if key not in cache:
            if len(cache) >= max_evaluations:
                return None
            v = float(evaluate(dict(p)))
            if math.isnan(v):
                raise ValueError(f"evaluate: returned NaN at {p}")
            cache[key] = v
        return cache[key]

    cur = start
    cur_v = value(cur)
    path = [dict(cur)]
    certified = False
    while True:
        vals = [(value(nb), nb) for nb in neighbours(cur, grid)]
        if any(v is None for v, _ in vals):
            break
        better = [(v, nb) for v, nb in vals if v < cur_v]
        if not better:
            certified = all(v > cur_v for v, _ in vals)
            break
        cur_v, cur = min(better, key=lambda t: t[0])
        path.append(dict(cur))
    edge = [k for k in keys if len(grid[k]) > 1 and grid[k].index(cur[k]) in (0, len(grid[k]) - 1)]
    return SearchResult(dict(cur), cur_v, certified, edge, cache, path, time.perf_counter() - t0)


@register("regularized-recipe-search", family="unlearning", kind="recipe", paper=INFINITE_COMPUTE_PAPER,
          summary="The regularised recipe: neighbour-certified coordinate search over lr, weight decay and epochs.")
def run_regularized_search(evaluate: Callable[[dict[str, Any]], float], *, grid: Mapping | None = None,
                           start: Mapping | None = None, max_evaluations: int = 100) -> SearchResult:
    """:func:`neighbour_search` over ``grid`` (default :data:`PAPER_GRID`) from ``start``
    (default: the middle value of every coordinate)."""
    grid = dict(PAPER_GRID if grid is None else grid)
    if start is None:
        start = {k: v[(len(v) - 1) // 2] for k, v in grid.items()}
    return neighbour_search(evaluate, grid, start, max_evaluations=max_evaluations)


def member_hparams(best: Mapping[str, Any]) -> dict[str, Any]:
    """Ensemble members' hyperparameters in the paper: 2x the epochs, 1/2 the weight decay of the best single model."""
    out = dict(best)
    if "epochs" in out:
        out["epochs"] = out["epochs"] * 2
    if "weight_decay" in out:
        out["weight_decay"] = out["weight_decay"] / 2
    return out


# ----------------------------------------------------------------------------- ensembles

def ensemble_logits(members: Sequence[nn.Module] | Tensor, x: Tensor | None = None) -> Tensor:
    """The ensemble's logits: the mean of the members' logits.

    ``members``: modules (called on ``x`` without gradients) or stacked logits ``[K, ..., V]``.
    """
    if isinstance(members, Tensor):
        if members.dim() < 2 or members.shape[0] < 1:
            raise ValueError(f"members: expected stacked logits [K, ..., V], got {shape_str(members)}")
        return members.mean(0)
    if len(members) == 0:
        raise ValueError("members: expected at least one model")
    with torch.no_grad():
        return torch.stack([m(x) for m in members]).mean(0)


# ----------------------------------------------------------------------------- power laws

@dataclass
class PowerLawFit:
    A: float
    alpha: float
    E: float
    intervals: dict[str, tuple[float, float]]
    n_points: int
    bootstrap: int
    confidence: float
    samples: Tensor | None = None  # [bootstrap, 3] refits (A, alpha, E)

    def predict(self, n) -> Tensor:
        n = torch.as_tensor(n, dtype=torch.float64)
        return self.A / n ** self.alpha + self.E


def _power(n, a, alpha, e):
    return a / n ** alpha + e


def fit_power_law(n, loss, *, bounds: tuple[Sequence[float], Sequence[float]] = ((0.0, 0.0, 0.0),
                                                                                  (math.inf, 10.0, math.inf)),
                  p0: Sequence[float] | None = None, bootstrap: int = 1000, confidence: float = 0.95,
                  seed: int = 0) -> PowerLawFit:
    """Fit ``L(N) = A / N^alpha + E`` with bounds (default ``A, E >= 0``, ``0 <= alpha <= 10``).

    Bootstrap: ``bootstrap`` refits on points resampled with replacement (a
    resample with fewer than 3 distinct ``N`` is drawn again); the
    ``confidence`` percentile interval of each parameter.  Needs at least 3
    points with distinct ``N`` (three parameters).
    """
    try:
        import numpy as np
        from scipy.optimize import curve_fit
    except ImportError as e:
        raise ImportError("fit_power_law needs scipy: pip install 'losskit[fits]'", name="scipy") from e
    x = torch.as_tensor(n, dtype=torch.float64).flatten()
    y = torch.as_tensor(loss, dtype=torch.float64).flatten()
    if x.shape != y.shape:
        raise ValueError(f"loss: expected one value per N ({x.numel()}), got {y.numel()}")
    if x.unique().numel() < 3:
        raise ValueError(f"n: a power law A / N^alpha + E has 3 parameters; expected at least 3 points with "
                         f"distinct N, got {x.unique().numel()} ({x.numel()} points)")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()) or bool((x <= 0).any()):
        raise ValueError("n, loss: expected finite values and N > 0")
    bootstrap = check_int("bootstrap", bootstrap, low=0)
    confidence = check_hparam("confidence", confidence, low=0.0, high=1.0, low_open=True, high_open=True)
    lo, hi = [list(map(float, b)) for b in bounds]
    if len(lo) != 3 or len(hi) != 3 or any(a > b for a, b in zip(lo, hi)):
        raise ValueError(f"bounds: expected ((A_lo, alpha_lo, E_lo), (A_hi, alpha_hi, E_hi)) with lo <= hi, "
                         f"got {bounds}")
    xn, yn = x.numpy(), y.numpy()

    def start(xs, ys):
        if p0 is not None:
            return list(map(float, p0))
        e0 = max(lo[2], min(hi[2], float(ys.min()) * 0.9))
        a0 = max(float(ys.max()) - e0, 1e-8) * float(xs.min()) ** 0.5
        return [min(max(a0, lo[0]), hi[0]), min(max(0.5, lo[1]), hi[1]), e0]

    def fit(xs, ys):
        p, _ = curve_fit(_power, xs, ys, p0=start(xs, ys), bounds=(lo, hi), maxfev=20000)
        return p

    best = fit(xn, yn)
    gen = np.random.default_rng(seed)
    samples = []
    tries = 0
    while len(samples) < bootstrap and tries < 20 * max(bootstrap, 1):
        tries += 1
        idx = gen.integers(0, len(xn), len(xn))
        if len(set(xn[idx].tolist())) < 3:
            continue
        try:
            samples.append(fit(xn[idx], yn[idx]))
        except RuntimeError:  # a resample the optimiser cannot fit: drawn again
            continue
    intervals = {}
    s = torch.tensor(np.array(samples)) if samples else None
    for j, name in enumerate(("A", "alpha", "E")):
        if s is None:
            intervals[name] = (float("nan"), float("nan"))
        else:
            q = torch.quantile(s[:, j], torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2],
                                                      dtype=torch.float64))
            intervals[name] = (float(q[0]), float(q[1]))
    return PowerLawFit(float(best[0]), float(best[1]), float(best[2]), intervals, len(xn), len(samples),
                       confidence, s)


# ----------------------------------------------------------------------------- distillation

def sample_autoregressive(logits_fn: Callable[[Tensor], Tensor], prompt: Tensor, length: int, *,
                          context: int, temperature: float = 1.0,
                          generator: torch.Generator | None = None) -> Tensor:
    """Continue ``prompt [B, T0]`` by ``length`` tokens sampled from ``softmax(logits_fn(window) / T)``,
    ``window`` the last ``context`` tokens ``[B, context]``; returns ``[B, T0 + length]``."""
    length = check_int("length", length, low=0)
    context = check_int("context", context, low=1)
    temperature = check_hparam("temperature", temperature, low=0.0, low_open=True)
    if prompt.dim() != 2 or prompt.shape[1] < context:
        raise ValueError(f"prompt: expected token ids [B, >= context={context}], got {shape_str(prompt)}")
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(length):
            z = logits_fn(seq[:, -context:]) / temperature
            nxt = torch.multinomial(torch.softmax(z.float(), -1), 1, generator=generator)
            seq = torch.cat([seq, nxt], 1)
    return seq


@dataclass
class DistillationLog:
    steps: int
    examples: int
    seconds: float
    loss_first: float
    loss_last: float


@register("ensemble-distillation", family="unlearning", kind="recipe", paper=INFINITE_COMPUTE_PAPER,
          summary="Distil an ensemble into a student on a mix of teacher-sampled (0.9) and real (0.1) data.")
def run_ensemble_distillation(student: nn.Module, real: tuple[Tensor, Tensor], synthetic: tuple[Tensor, Tensor], *,
                              mix: float = 0.9, epochs: int = 4, lr: float = 3e-3, weight_decay: float = 0.1,
                              batch_size: int = 256, seed: int = 0) -> DistillationLog:
    """Train ``student`` in place with cross-entropy on batches drawn ``mix`` from ``synthetic``
    (inputs, targets sampled from the teacher ensemble: :func:`sample_autoregressive`) and
    ``1 - mix`` from ``real``.  An epoch is ``len(synthetic) / mix`` examples.  AdamW."""
    mix = check_hparam("mix", mix, low=0.0, high=1.0)
    epochs = check_int("epochs", epochs, low=1)
    lr = check_hparam("lr", lr, low=0.0, low_open=True)
    weight_decay = check_hparam("weight_decay", weight_decay, low=0.0)
    batch_size = check_int("batch_size", batch_size, low=1)
    (xr, yr), (xs, ys) = real, synthetic
    for name, (a, b) in (("real", real), ("synthetic", synthetic)):
        if a.shape[0] != b.shape[0] or a.shape[0] == 0:
            raise ValueError(f"{name}: expected (inputs [n, ...], targets [n]) with n > 0, got "
                             f"{shape_str(a)} and {shape_str(b)}")
    gen = torch.Generator().manual_seed(check_int("seed", seed))
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    n_syn = max(1, int(round(batch_size * mix)))
    n_real = batch_size - n_syn if mix < 1 else 0
    if mix == 0.0:
        n_syn, n_real = 0, batch_size
    per_epoch = max(1, math.ceil((xs.shape[0] / mix if mix > 0 else xr.shape[0]) / batch_size))
    steps = examples = 0
    first = last = float("nan")
    t0 = time.perf_counter()
    student.train()
    for _ in range(epochs * per_epoch):
        parts_x, parts_y = [], []
        if n_syn:
            i = torch.randint(xs.shape[0], (n_syn,), generator=gen)
            parts_x.append(xs[i])
            parts_y.append(ys[i])
        if n_real:
            i = torch.randint(xr.shape[0], (n_real,), generator=gen)
            parts_x.append(xr[i])
            parts_y.append(yr[i])
        xb, yb = torch.cat(parts_x), torch.cat(parts_y)
        loss = nn.functional.cross_entropy(student(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        examples += xb.shape[0]
        first = float(loss.detach()) if steps == 1 else first
        last = float(loss.detach())
    return DistillationLog(steps, examples, time.perf_counter() - t0, first, last)


def gain_kept(single: float, ensemble: float, student: float) -> float:
    """The share of the ensemble's loss improvement over the single model that the student keeps:
    ``(single - student) / (single - ensemble)``."""
    if not single > ensemble:
        raise ValueError(f"ensemble: expected a loss below the single model's {single}, got {ensemble}")
    return (single - student) / (single - ensemble)

