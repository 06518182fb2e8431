"""Aggregating cells over seeds; the leaderboard; results as JSON and CSV."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from .train import MEMORY_LABELS

__all__ = ["aggregate", "format_leaderboard", "write_results", "metric_label", "LEADERBOARD_METRICS"]

#: Metrics shown on the leaderboard, in order (when present in the cells).
LEADERBOARD_METRICS = ("recall@1", "recall@4", "map@r", "tar@far=0.001", "tar@far=0.01", "eer", "opis")
#: Metrics where lower is better.
LOWER_IS_BETTER = {"eer", "opis", "epsilon_opis"}
_PERCENT = {"eer"}  # everything in [0, 1] except OPIS is printed in percent


def metric_label(key: str) -> str:
    if key.startswith("recall@"):
        return "R@" + key.split("@")[1]
    if key.startswith("tar@far="):
        far = float(key.split("=")[1])
        return f"TAR@{far:.0e}".replace("e-0", "e-")
    return {"map@r": "MAP@R", "eer": "EER", "opis": "OPIS", "precision@1": "P@1"}.get(key, key)


def _stats(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    finite = v[np.isfinite(v)]
    if len(finite) == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std(ddof=1)) if len(finite) > 1 else math.nan,
            "n": int(len(finite))}


def aggregate(cells: list[dict[str, Any]], objectives: list[str]) -> list[dict[str, Any]]:
    """One row per objective (in ``objectives`` order, those with cells): mean/std/n of every number."""
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
    rows.sort(key=lambda r: -_nan_low(r["metrics"].get("recall@1", {}).get("mean", math.nan)))
    return rows


def _nan_low(x: float) -> float:
    return -math.inf if x is None or not math.isfinite(x) else x


def _fmt(stat: dict[str, float], key: str) -> str:
    m, s = stat["mean"], stat["std"]
    if not math.isfinite(m):
        return "-"
    if key == "opis":
        return f"{m:.3g}" + ("" if not math.isfinite(s) else f"±{s:.1g}")
    if key in ("train_time_s", "eval_time_s"):
        return f"{m:.2f}" + ("" if not math.isfinite(s) else f"±{s:.2f}")
    if key == "peak_memory_mb":
        return f"{m:.2f}" + ("" if not math.isfinite(s) else f"±{s:.2f}")
    return f"{100 * m:.1f}" + ("" if not math.isfinite(s) else f"±{100 * s:.1f}")


def format_leaderboard(rows: list[dict[str, Any]], title: str = "", notes: list[str] | None = None) -> str:
    """The terminal leaderboard: mean±std over seeds, sorted by Recall@1 (best first)."""
    present = [k for k in LEADERBOARD_METRICS if any(k in r["metrics"] for r in rows)]
    head = ["#", "objective", "seeds"] + [metric_label(k) + (" %" if k != "opis" else "") for k in present]
    head += ["train s", "mem MB"]
    body = []
    for i, r in enumerate(rows, 1):
        line = [str(i), r["objective"], str(len(r["seeds"]))]
        line += [_fmt(r["metrics"][k], k) if k in r["metrics"] else "-" for k in present]
        line += [_fmt(r["train_time_s"], "train_time_s"), _fmt(r["peak_memory_mb"], "peak_memory_mb")]
        body.append(line)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    left = {0, 1}

    def render(cols: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))

    lines = [title] if title else []
    lines += [render(head), "-" * len(render(head))] + [render(b) for b in body]
    lines.append("mean±std over seeds (std is blank with one seed); sorted by R@1; "
                 "all metrics on the held-out classes; EER and OPIS: lower is better.")
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
    from .runner import atomic_write_json

    cfg = run.config
    cells = sorted(run.cells, key=lambda c: (cfg.objectives.index(c["objective"])
                                             if c["objective"] in cfg.objectives else 1e9, c["seed"]))
    rows = aggregate(cells, cfg.objectives)
    missing = [(o, s) for o in cfg.objectives for s in range(cfg.seeds)
               if not any(c["objective"] == o and c["seed"] == s for c in cells)]
    notes = []
    if run.failed:
        notes.append("FAILED cells (see cells/*.error.txt; --resume retries them): "
                     + ", ".join(f"{o}/seed{s}" for o, s in run.failed))
    if missing:
        notes.append(f"INCOMPLETE: {len(missing)} of {len(cfg.objectives) * cfg.seeds} cells missing; "
                     f"finish with: losskit bench --resume {run.out}")
    title = (f"losskit bench: {cfg.dataset}, {len(cfg.objectives)} objectives x {cfg.seeds} seeds, "
             f"{cfg.epochs} epochs, embedding dim {cfg.embedding_dim}")
    board = format_leaderboard(rows, title, notes)
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
