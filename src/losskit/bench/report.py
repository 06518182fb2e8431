"""Aggregating cells over seeds; the leaderboard; results as JSON and CSV.

The same for every task: the columns, their labels, their format and the
metric the leaderboard is sorted by come from the task (``task.metrics``,
``task.primary``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from .measure import MEMORY_LABELS
from .store import atomic_write_json

__all__ = ["aggregate", "format_leaderboard", "write_results", "paired", "compare", "budget_warnings",
           "still_improving", "leaderboard_rows"]


def _stats(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    finite = v[np.isfinite(v)]
    if len(finite) == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std(ddof=1)) if len(finite) > 1 else math.nan,
            "n": int(len(finite))}


def _unit(c: dict[str, Any]) -> str:
    """A cell's (seed, split) as a JSON key: ``"seed/split"``."""
    return f"{c['seed']}/{c.get('split', 0)}"


def _curve(mine: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    """The held-out metric over training: epochs tracked by every cell, mean and std over cells."""
    curves = [dict((int(e), float(v)) for e, v in c.get("epoch_metric", [])) for c in mine]
    if not curves or not all(curves):
        return [], [], []
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    arr = np.asarray([[c[e] for e in epochs] for c in curves], dtype=float)
    std = arr.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(epochs))
    return epochs, arr.mean(0).tolist(), std.tolist()


def aggregate(cells: list[dict[str, Any]], objectives: list[str], task) -> list[dict[str, Any]]:
    """One row per objective (those with cells): mean/std/n of every number over its (seed, class
    split) cells, and each metric's value per cell (``values``, for the paired comparisons);
    sorted by the task's primary metric, best first (``objectives`` order among equals;
    undefined last).  Baseline cells (``"baseline": True``) give rows without training numbers."""
    rows = []
    for name in objectives:
        mine = sorted((c for c in cells if c["objective"] == name), key=lambda c: (c.get("split", 0), c["seed"]))
        if not mine:
            continue
        keys = list(dict.fromkeys(k for c in mine for k in c["metrics"]))
        row: dict[str, Any] = {"objective": name, "seeds": sorted({c["seed"] for c in mine}),
                               "splits": sorted({c.get("split", 0) for c in mine}), "n": len(mine),
                               "baseline": bool(mine[0].get("baseline")),
                               "metrics": {k: _stats([c["metrics"].get(k) for c in mine]) for k in keys},
                               "values": {k: {_unit(c): c["metrics"].get(k) for c in mine} for k in keys}}
        for k in ("train_time_s", "eval_time_s", "peak_memory_mb"):
            row[k] = _stats([c.get(k) for c in mine])
        row["memory_kind"] = sorted({c["memory_kind"] for c in mine if "memory_kind" in c})
        losses = [c["epoch_loss"] for c in mine if c.get("epoch_loss")]
        epochs = min((len(x) for x in losses), default=0)
        curves = np.asarray([x[:epochs] for x in losses], dtype=float).reshape(len(losses), epochs)
        row["epoch_loss_mean"] = curves.mean(0).tolist() if len(losses) else []
        row["epoch_loss_std"] = (curves.std(0, ddof=1) if len(losses) > 1 else np.zeros(epochs)).tolist()
        row["metric_epochs"], row["epoch_metric_mean"], row["epoch_metric_std"] = _curve(mine)
        rows.append(row)
    lower = task.metric(task.primary).lower_is_better
    rows.sort(key=lambda r: _rank(r["metrics"].get(task.primary, {}).get("mean", math.nan), lower))
    return rows


# ---------------------------------------------------------------- paired comparisons

#: the confidence level of the paired intervals and of the shared ranks
CONFIDENCE = 0.95


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile (scipy, a dependency of scikit-learn and so of the ``bench`` extra)."""
    try:
        from scipy.stats import t
    except ImportError:  # pragma: no cover - the normal quantile, a little narrow for few pairs
        from statistics import NormalDist

        return NormalDist().inv_cdf(p)
    return float(t.ppf(p, dof))


def paired(a: dict[str, float], b: dict[str, float], lower_is_better: bool = False) -> dict[str, Any]:
    """``a - b`` over the (seed, split) pairs both have: mean, its 95% t-interval, and whether
    ``a`` is better (``+1``), worse (``-1``) or within noise (``0``; also with < 2 pairs)."""
    shared = [u for u in a if u in b and a[u] is not None and b[u] is not None
              and math.isfinite(a[u]) and math.isfinite(b[u])]
    d = np.asarray([a[u] - b[u] for u in shared], dtype=float)
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": math.nan, "low": math.nan, "high": math.nan, "better": 0}
    mean = float(d.mean())
    if n < 2:
        return {"n": n, "mean": mean, "low": math.nan, "high": math.nan, "better": 0}
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
    low, high = mean - half, mean + half
    sign = -1 if lower_is_better else 1
    better = 1 if (low > 0 if sign > 0 else high < 0) else (-1 if (high < 0 if sign > 0 else low > 0) else 0)
    return {"n": n, "mean": mean, "low": low, "high": high, "better": better}


def compare(rows: list[dict[str, Any]], task) -> None:
    """Add to each row ``rank`` (objectives: 1 + the number of objectives better on the primary
    metric by a paired interval; equal ranks are within noise; baselines: None), ``vs_best``
    (the paired difference to the best objective) and ``vs_baselines`` (to each baseline)."""
    key, lower = task.primary, task.metric(task.primary).lower_is_better
    objs = [r for r in rows if not r["baseline"]]
    bases = [r for r in rows if r["baseline"]]
    vals = {r["objective"]: r["values"].get(key, {}) for r in rows}
    testable = any(len(v) > 1 for v in vals.values())
    for i, r in enumerate(objs):
        if testable:
            beaten = sum(1 for o in objs if o is not r and paired(vals[o["objective"]], vals[r["objective"]],
                                                                     lower)["better"] == 1)
            r["rank"] = 1 + beaten
        else:
            r["rank"] = i + 1
    for b in bases:
        b["rank"] = None
    best = objs[0]["objective"] if objs else None
    for r in rows:
        r["vs_best"] = paired(vals[r["objective"]], vals[best], lower) if best is not None else None
        r["vs_baselines"] = {b["objective"]: paired(vals[r["objective"]], vals[b["objective"]], lower)
                             for b in bases if b is not r}


def _rank(x: float, lower_is_better: bool) -> float:
    """Sort key: best first, an undefined value last."""
    if x is None or not math.isfinite(x):
        return math.inf
    return x if lower_is_better else -x


def _fmt(stat: dict[str, float], how: str) -> str:
    """``how``: ``percent`` (x100, one decimal), ``plain`` (3 significant digits), ``fixed`` (2 decimals)."""
    m, s = stat["mean"], stat["std"]
    if not math.isfinite(m):
        return "-"
    if how == "plain":
        return f"{m:.3g}" + ("" if not math.isfinite(s) else f"±{s:.1g}")
    if how == "fixed":
        return f"{m:.2f}" + ("" if not math.isfinite(s) else f"±{s:.2f}")
    return f"{100 * m:.1f}" + ("" if not math.isfinite(s) else f"±{100 * s:.1f}")


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _delta(cmp: dict[str, Any] | None, m) -> str:
    if not cmp or not cmp["n"] or not math.isfinite(cmp["mean"]):
        return "-"
    scale = 100.0 if m.percent else 1.0
    if not math.isfinite(cmp["low"]):
        return f"{scale * cmp['mean']:+.1f}" if m.percent else f"{cmp['mean']:+.3g}"
    if m.percent:
        return f"{scale * cmp['mean']:+.1f} [{scale * cmp['low']:+.1f},{scale * cmp['high']:+.1f}]"
    return f"{cmp['mean']:+.3g} [{cmp['low']:+.3g},{cmp['high']:+.3g}]"


def format_leaderboard(rows: list[dict[str, Any]], task, title: str = "", notes: list[str] | None = None) -> str:
    """The terminal leaderboard: mean±std over the (seed, class split) cells of the task's
    metrics, sorted by its primary one, with the baseline rows among them, shared ranks and
    each row's paired difference to the best objective."""
    if rows and "rank" not in rows[0]:
        compare(rows, task)
    present = [m for m in task.metrics if any(m.key in r["metrics"] for r in rows)]
    pm = task.metric(task.primary)
    multi_split = any(len(r.get("splits", [0])) > 1 for r in rows)
    head = ["#", "objective", "runs" if multi_split else "seeds"]
    head += [m.label + (" %" if m.percent else "") for m in present]
    head += [f"Δ{pm.label} vs best", "train s", "mem MB"]
    ranks = [r.get("rank") for r in rows if not r.get("baseline")]
    body = []
    for r in rows:
        if r.get("baseline"):
            rank = "base"
        else:
            rank = str(r["rank"]) + ("=" if ranks.count(r["rank"]) > 1 else "")
        line = [rank, r["objective"], str(r.get("n", len(r["seeds"])))]
        line += [_fmt(r["metrics"][m.key], "percent" if m.percent else "plain") if m.key in r["metrics"] else "-"
                 for m in present]
        best_row = not r.get("baseline") and r is next((x for x in rows if not x.get("baseline")), None)
        line += ["best" if best_row else _delta(r.get("vs_best"), pm)]
        line += [_fmt(r["train_time_s"], "fixed"), _fmt(r["peak_memory_mb"], "fixed")]
        body.append(line)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    left = {0, 1}

    def render(cols: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))

    lines = [title] if title else []
    lines += [render(head), "-" * len(render(head))] + [render(b) for b in body]
    said = [f"sorted by {pm.label}", *([task.leaderboard_note] if task.leaderboard_note else [])]
    lower = [m.label for m in present if m.lower_is_better]
    if lower:
        said.append(f"{_and(lower)}: lower is better")
    unit = "(seed, class split) runs" if multi_split else "seeds"
    lines.append(f"mean±std over {unit} (std is blank with one); " + "; ".join(said) + ".")
    n_pairs = max((r.get("n", 0) for r in rows if not r.get("baseline")), default=0)
    if n_pairs >= 2:
        lines.append(
            f"# = 1 + the number of objectives better on {pm.label} by a paired {100 * CONFIDENCE:.0f}% t-interval over "
            f"the {n_pairs} {unit} (same seed and split = same initialisation, batches and test classes; no "
            f"correction for multiple comparisons): equal ranks (=) are within noise of each other. "
            f"Δ{pm.label} vs best = the paired difference to the top objective"
            f"{' in points' if pm.percent else ''} [{100 * CONFIDENCE:.0f}% interval].")
    else:
        lines.append(f"# = position: with one {unit[:-1] if unit.endswith('s') else unit} there is no noise estimate, "
                     "so no difference is tested (use --seeds 3 or more).")
    bases = [r for r in rows if r.get("baseline")]
    if bases:
        notes_b = getattr(task, "baseline_notes", {}) or {}
        lines.append("base = a reference row, not trained: " + "; ".join(
            f"{b['objective']} = {notes_b.get(b['objective'], 'a baseline')}" for b in bases) + ".")
        if n_pairs >= 2:
            for b in bases:
                weak = [r["objective"] for r in rows if not r.get("baseline")
                        and r["vs_baselines"].get(b["objective"], {}).get("better", 0) != 1]
                if weak:
                    lines.append(f"NOT better than {b['objective']} on {pm.label} within noise: {', '.join(weak)}.")
        else:
            for b in bases:
                mb = b["metrics"].get(task.primary, {}).get("mean", math.nan)
                weak = [r["objective"] for r in rows if not r.get("baseline")
                        and not _rank(r["metrics"].get(task.primary, {}).get("mean", math.nan), pm.lower_is_better)
                        < _rank(mb, pm.lower_is_better)]
                if weak:
                    lines.append(f"NOT above {b['objective']} on {pm.label}: {', '.join(weak)}.")
    kinds = sorted({k for r in rows for k in r["memory_kind"]})
    for k in kinds:
        lines.append(f"mem MB = {MEMORY_LABELS.get(k, k)}.")
    if kinds:
        lines.append("train s = wall time of the training steps" +
                     (" (the first, profiled step excluded)" if "cpu_profiler_step" in kinds else "") + ".")
    lines += notes or []
    return "\n".join(lines)


#: a held-out metric that gained more than this (fraction; 0.5 points for a percentage) over the last
#: quarter of the tracked epochs is "still improving"
STILL_IMPROVING = 0.005


def still_improving(row: dict[str, Any], lower_is_better: bool) -> tuple[float, int, int] | None:
    """``(gain, epoch before, last epoch)`` when the row's mean held-out curve gained more than
    :data:`STILL_IMPROVING` between its best in the first three quarters and its last point."""
    epochs, curve = row.get("metric_epochs") or [], row.get("epoch_metric_mean") or []
    if len(epochs) < 3:
        return None
    cut = [i for i, e in enumerate(epochs) if e <= 0.75 * epochs[-1]]
    if not cut:
        return None
    head = [curve[i] for i in cut]
    best = min(head) if lower_is_better else max(head)
    gain = (best - curve[-1]) if lower_is_better else (curve[-1] - best)
    if gain > STILL_IMPROVING:
        return gain, epochs[cut[-1]], epochs[-1]
    return None


def budget_warnings(run, rows: list[dict[str, Any]] | None = None) -> list[str]:
    """One line naming the objectives whose held-out metric was still improving at the end."""
    task = run.task
    rows = rows if rows is not None else aggregate(run.cells, run.config.objectives, task)
    m = task.metric(task.primary)
    hits = []
    for r in rows:
        got = still_improving(r, m.lower_is_better)
        if got:
            gain, before, last = got
            amount = f"{100 * gain:.1f} points" if m.percent else f"{gain:.3g}"
            hits.append(f"{r['objective']} {'-' if m.lower_is_better else '+'}{amount}")
    if not hits:
        return []
    return [f"BUDGET: the held-out {m.label} was still improving over the last quarter of training for "
            f"{len(hits)} of {len(rows)} objectives ({'; '.join(hits)}): they may be under-trained; "
            "try a larger --epochs (plots/training_curves.png shows the curves)."]


def _flat_cell(c: dict[str, Any]) -> dict[str, Any]:
    row = {"objective": c["objective"], "seed": c["seed"], "split": c.get("split", 0)}
    row.update(c["metrics"])
    for k in ("train_time_s", "eval_time_s", "peak_memory_mb", "memory_kind", "steps", "device"):
        row[k] = c.get(k)
    row["final_loss"] = c["epoch_loss"][-1] if c.get("epoch_loss") else None
    row["hparams"] = ";".join(f"{k}={v}" for k, v in c.get("hparams", {}).items())
    return row


def _flat_row(r: dict[str, Any]) -> dict[str, Any]:
    out = {"objective": r["objective"], "baseline": r.get("baseline", False), "rank": r.get("rank"),
           "n_seeds": len(r["seeds"]), "n_runs": r.get("n", len(r["seeds"]))}
    for k, s in r["metrics"].items():
        out[f"{k}_mean"], out[f"{k}_std"] = s["mean"], s["std"]
    vb = r.get("vs_best") or {}
    out["primary_vs_best_mean"], out["primary_vs_best_low"], out["primary_vs_best_high"] = (
        vb.get("mean"), vb.get("low"), vb.get("high"))
    for k in ("train_time_s", "eval_time_s", "peak_memory_mb"):
        out[f"{k}_mean"], out[f"{k}_std"] = r[k]["mean"], r[k]["std"]
    out["memory_kind"] = ";".join(r["memory_kind"])
    return out


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def leaderboard_rows(run) -> list[dict[str, Any]]:
    """The objectives' and the baselines' rows, sorted and compared (:func:`compare`)."""
    cfg, task = run.config, run.task
    base_names = list(dict.fromkeys(c["objective"] for c in getattr(run, "baseline_cells", [])))
    rows = aggregate([*run.cells, *getattr(run, "baseline_cells", [])], [*cfg.objectives, *base_names], task)
    compare(rows, task)
    return rows


def write_results(run) -> str:
    """Write results.json, cells.csv, summary.csv, leaderboard.txt; return the leaderboard text."""
    cfg, task = run.config, run.task
    order = {o: i for i, o in enumerate(cfg.objectives)}
    cells = sorted(run.cells, key=lambda c: (order.get(c["objective"], 1e9), c.get("split", 0), c["seed"]))
    rows = leaderboard_rows(run)
    units = run.units() if hasattr(run, "units") else [(s, 0) for s in range(cfg.seeds)]
    have = {(c["objective"], c["seed"], c.get("split", 0)) for c in cells}
    missing = [(o, s, sp) for o in cfg.objectives for s, sp in units if (o, s, sp) not in have]
    notes = []
    if run.failed:
        notes.append("FAILED cells (see cells/*.error.txt; --resume retries them): "
                     + ", ".join("/".join([k[0], f"seed{k[1]}", *([f"split{k[2]}"] if len(k) > 2 else [])])
                                 for k in run.failed))
    if missing:
        notes.append(f"INCOMPLETE: {len(missing)} of {len(cfg.objectives) * len(units)} cells missing; "
                     f"finish with: losskit bench --resume {run.out}")
    notes += [f"WARNING (data): {w}" for w in getattr(run, "warnings", [])]
    notes += budget_warnings(run, [r for r in rows if not r.get("baseline")])
    title = task.title(cfg, len(cfg.objectives))
    if getattr(run, "data_name", "") and title.startswith(f"losskit bench: {cfg.dataset},") \
            and run.data_name != cfg.dataset:
        title = title.replace(f"losskit bench: {cfg.dataset},", f"losskit bench: {run.data_name},", 1)
    board = format_leaderboard(rows, task, title, notes)
    plain_rows = [{k: v for k, v in r.items() if k != "values"} for r in rows]
    atomic_write_json(run.out / "results.json", {
        "complete": not missing,
        "missing": [list(m) if m[2] else list(m[:2]) for m in missing],
        "failed": {"/".join(map(str, k)): m for k, m in run.failed.items()},
        "summary": [r for r in plain_rows if not r.get("baseline")],
        "baselines": [r for r in plain_rows if r.get("baseline")],
        "cells": [{k: v for k, v in c.items() if k != "protocol"} for c in cells],
        "baseline_cells": [{k: v for k, v in c.items() if k != "protocol"} for c in getattr(run, "baseline_cells", [])],
        "warnings": list(getattr(run, "warnings", [])),
        "memory_measure": {k: MEMORY_LABELS.get(k, k) for k in sorted({c["memory_kind"] for c in cells})},
    })
    if cells:
        _write_csv(run.out / "cells.csv", [_flat_cell(c) for c in cells])
        _write_csv(run.out / "summary.csv", [_flat_row(r) for r in rows if not r.get("baseline")])
    base_cells = getattr(run, "baseline_cells", [])
    if base_cells:
        _write_csv(run.out / "baselines.csv", [_flat_row(r) for r in rows if r.get("baseline")])
    (run.out / "leaderboard.txt").write_text(board + "\n")
    run.leaderboard = board
    return board
