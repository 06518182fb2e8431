"""PNG plots of a bench run (matplotlib, Agg backend), for every task: metric bars, training
curves, cost; then the task's own plots (:meth:`Task.plots`; embedding: similarity histograms).
:func:`grid` and :func:`finish_grid` lay out one panel per objective for those."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .report import aggregate

__all__ = ["write_plots", "grid", "finish_grid"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def grid(n: int) -> tuple[int, int]:
    """(rows, columns) of a grid of ``n`` panels."""
    cols = min(n, 4 if n <= 12 else 5)
    return math.ceil(n / cols), cols


def _bars(plt, task, rows: list[dict[str, Any]], path: Path, title: str) -> None:
    metrics = [m for m in task.metrics if any(m.key in r["metrics"] for r in rows)]
    n = len(rows)
    nr, nc = math.ceil(len(metrics) / 3), min(3, len(metrics))
    fig, axes = plt.subplots(nr, nc, figsize=(5.2 * nc, 0.9 + (0.32 * n + 0.9) * nr),
                             squeeze=False, layout="constrained")
    names = [r["objective"] for r in rows]
    y = np.arange(n)
    colors = plt.cm.tab20(np.linspace(0, 1, max(n, 2)))[:n]
    for ax, m in zip(axes.flat, metrics):
        mean = np.array([r["metrics"].get(m.key, {}).get("mean", np.nan) for r in rows], dtype=float)
        std = np.array([r["metrics"].get(m.key, {}).get("std", np.nan) for r in rows], dtype=float)
        scale = 100.0 if m.percent else 1.0
        ax.barh(y, np.nan_to_num(mean * scale), xerr=np.nan_to_num(std * scale), color=colors,
                error_kw={"capsize": 3, "elinewidth": 1})
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        better = "lower" if m.lower_is_better else "higher"
        ax.set_title(f"{m.label}{' (%)' if m.percent else ''} ({better} is better)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        for yi, v in zip(y, mean):
            if np.isfinite(v):
                ax.text(0, yi, f" {v * scale:.3g}", va="center", ha="left", fontsize=7, color="black")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    primary = task.metric(task.primary).label
    fig.suptitle(title + f"\nmean over seeds, error bars = std over seeds; sorted by {primary}", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish_grid(plt, fig, axes, used: int, path: Path, suptitle: str) -> None:
    """Hide the grid's unused panels, title the figure, save and close it."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curves(plt, rows: list[dict[str, Any]], path: Path, title: str) -> None:
    order = [r["objective"] for r in rows]
    nr, nc = grid(len(order))
    fig, axes = plt.subplots(nr, nc, figsize=(max(3.6 * nc, 7.5), 2.5 * nr + 1.0),
                             squeeze=False, layout="constrained")
    for ax, r in zip(axes.flat, rows):
        m = np.asarray(r["epoch_loss_mean"])
        s = np.asarray(r["epoch_loss_std"])
        ep = np.arange(1, len(m) + 1)
        ax.plot(ep, m, marker="o", ms=3, color="tab:blue")
        ax.fill_between(ep, m - s, m + s, alpha=0.25, color="tab:blue")
        ax.set_title(r["objective"], fontsize=9)
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_ylabel("train loss", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    finish_grid(plt, fig, axes, len(order), path, title + "\ntraining loss per epoch (mean over seeds, "
                 "band = std);\neach objective on its own scale")


def _cost(plt, rows: list[dict[str, Any]], path: Path, title: str) -> None:
    names = [r["objective"] for r in rows]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.9 + 0.32 * len(rows) + 0.9),
                             squeeze=False, layout="constrained")
    for ax, key, label in ((axes[0, 0], "train_time_s", "training time (s)"),
                           (axes[0, 1], "peak_memory_mb", "peak memory (MB)")):
        mean = np.array([r[key]["mean"] for r in rows], dtype=float)
        std = np.array([r[key]["std"] for r in rows], dtype=float)
        ax.barh(y, np.nan_to_num(mean), xerr=np.nan_to_num(std), color="tab:gray",
                error_kw={"capsize": 3, "elinewidth": 1})
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    kinds = sorted({k for r in rows for k in r["memory_kind"]})
    fig.suptitle(title + f"\nmean±std over seeds; memory measure: {', '.join(kinds)} (see leaderboard.txt)",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(run) -> list[Path]:
    """Write plots/metrics.png, plots/training_curves.png, plots/cost.png and the task's plots
    (embedding: plots/similarity_hist.png)."""
    plt = _plt()
    cfg, task = run.config, run.task
    rows = aggregate(run.cells, cfg.objectives, task)
    out = Path(run.out) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    title = task.plot_title(cfg)
    paths = [out / "metrics.png", out / "training_curves.png", out / "cost.png"]
    _bars(plt, task, rows, paths[0], title)
    _curves(plt, rows, paths[1], title)
    _cost(plt, rows, paths[2], title)
    return paths + task.plots(plt, run, rows, out, title)
