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

__all__ = ["aggregate", "format_leaderboard", "write_results"]


def _stats(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    finite = v[np.isfinite(v)]
    if len(finite) == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std(ddof=1)) if len(finite) > 1 else math.nan,
            "n": int(len(finite))}


def aggregate(cells: list[dict[str, Any]], objectives: list[str], task) -> list[dict[str, Any]]:
    """One row per objective (those with cells): mean/std/n of every number; sorted by the
    task's primary metric, best first (``objectives`` order among equals; undefined last)."""
    rows = []
    for name in objectives:
        mine = sorted((c for c in cells if c["objective"] == name), key=lambda c: c["seed"])
        if not mine:
            continue
        keys = list(dict.fromkeys(k for c in mine for k in c["metrics"]))
        row: dict[str, Any] = {"objective": name, "seeds": [c["seed"] for c in mine],
                               "metrics": {k: _stats([c["metrics"].get(k) for c in mine]) for k in keys}}
        for k in ("train_time_s", "eval_time_s", "peak_memory_mb"):
            row[k] = _stats([c[k] for c in mine])
        row["memory_kind"] = sorted({c["memory_kind"] for c in mine})
        epochs = min(len(c["epoch_loss"]) for c in mine)
        curves = np.asarray([c["epoch_loss"][:epochs] for c in mine], dtype=float)
        row["epoch_loss_mean"] = curves.mean(0).tolist()
        row["epoch_loss_std"] = (curves.std(0, ddof=1) if len(mine) > 1 else np.zeros(epochs)).tolist()
        rows.append(row)
    lower = task.metric(task.primary).lower_is_better
    rows.sort(key=lambda r: _rank(r["metrics"].get(task.primary, {}).get("mean", math.nan), lower))
    return rows


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


def format_leaderboard(rows: list[dict[str, Any]], task, title: str = "", notes: list[str] | None = None) -> str:
    """The terminal leaderboard: mean±std over seeds of the task's metrics, sorted by its primary one."""
    present = [m for m in task.metrics if any(m.key in r["metrics"] for r in rows)]
    head = ["#", "objective", "seeds"] + [m.label + (" %" if m.percent else "") for m in present]
    head += ["train s", "mem MB"]
    body = []
    for i, r in enumerate(rows, 1):
        line = [str(i), r["objective"], str(len(r["seeds"]))]
        line += [_fmt(r["metrics"][m.key], "percent" if m.percent else "plain") if m.key in r["metrics"] else "-"
                 for m in present]
        line += [_fmt(r["train_time_s"], "fixed"), _fmt(r["peak_memory_mb"], "fixed")]
        body.append(line)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    left = {0, 1}

    def render(cols: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))

    lines = [title] if title else []
    lines += [render(head), "-" * len(render(head))] + [render(b) for b in body]
    said = [f"sorted by {task.metric(task.primary).label}", *([task.leaderboard_note] if task.leaderboard_note else [])]
    lower = [m.label for m in task.metrics if m.lower_is_better]
    if lower:
        said.append(f"{_and(lower)}: lower is better")
    lines.append("mean±std over seeds (std is blank with one seed); " + "; ".join(said) + ".")
    kinds = sorted({k for r in rows for k in r["memory_kind"]})
    for k in kinds:
        lines.append(f"mem MB = {MEMORY_LABELS.get(k, k)}.")
    lines.append("train s = wall time of the training steps" +
                 (" (the first, profiled step excluded)" if "cpu_profiler_step" in kinds else "") + ".")
    lines += notes or []
    return "\n".join(lines)


def _flat_cell(c: dict[str, Any]) -> dict[str, Any]:
    row = {"objective": c["objective"], "seed": c["seed"]}
    row.update(c["metrics"])
    for k in ("train_time_s", "eval_time_s", "peak_memory_mb", "memory_kind", "steps", "device"):
        row[k] = c.get(k)
    row["final_loss"] = c["epoch_loss"][-1] if c["epoch_loss"] else None
    row["hparams"] = ";".join(f"{k}={v}" for k, v in c.get("hparams", {}).items())
    return row


def _flat_row(r: dict[str, Any]) -> dict[str, Any]:
    out = {"objective": r["objective"], "n_seeds": len(r["seeds"])}
    for k, s in r["metrics"].items():
        out[f"{k}_mean"], out[f"{k}_std"] = s["mean"], s["std"]
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


def write_results(run) -> str:
    """Write results.json, cells.csv, summary.csv, leaderboard.txt; return the leaderboard text."""
    cfg, task = run.config, run.task
    cells = sorted(run.cells, key=lambda c: (cfg.objectives.index(c["objective"])
                                             if c["objective"] in cfg.objectives else 1e9, c["seed"]))
    rows = aggregate(cells, cfg.objectives, task)
    missing = [(o, s) for o in cfg.objectives for s in range(cfg.seeds)
               if not any(c["objective"] == o and c["seed"] == s for c in cells)]
    notes = []
    if run.failed:
        notes.append("FAILED cells (see cells/*.error.txt; --resume retries them): "
                     + ", ".join(f"{o}/seed{s}" for o, s in run.failed))
    if missing:
        notes.append(f"INCOMPLETE: {len(missing)} of {len(cfg.objectives) * cfg.seeds} cells missing; "
                     f"finish with: losskit bench --resume {run.out}")
    board = format_leaderboard(rows, task, task.title(cfg, len(cfg.objectives)), notes)
    atomic_write_json(run.out / "results.json", {
        "complete": not missing,
        "missing": [list(m) for m in missing],
        "failed": {f"{o}/seed{s}": m for (o, s), m in run.failed.items()},
        "summary": rows,
        "cells": [{k: v for k, v in c.items() if k != "protocol"} for c in cells],
        "memory_measure": {k: MEMORY_LABELS.get(k, k) for k in sorted({c["memory_kind"] for c in cells})},
    })
    if cells:
        _write_csv(run.out / "cells.csv", [_flat_cell(c) for c in cells])
        _write_csv(run.out / "summary.csv", [_flat_row(r) for r in rows])
    (run.out / "leaderboard.txt").write_text(board + "\n")
    run.leaderboard = board
    return board
