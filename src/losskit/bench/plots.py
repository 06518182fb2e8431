"""PNG plots of a bench run (matplotlib, Agg backend), for every task: metric bars, training
curves, cost; then the task's own plots (:meth:`Task.plots`; embedding: similarity histograms).
:func:`grid` and :func:`finish_grid` lay out one panel per objective for those."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


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
    """One panel per metric: the objectives' bars sorted best first in that panel, on an axis
    that spans the values (not from zero), each labelled with mean±std; baselines are vertical
    dashed lines."""
    metrics = [m for m in task.metrics if any(m.key in r["metrics"] for r in rows)]
    objs = [r for r in rows if not r.get("baseline")]
    bases = [r for r in rows if r.get("baseline")]
    n = len(objs)
    nr, nc = math.ceil(len(metrics) / 3), min(3, len(metrics))
    fig, axes = plt.subplots(nr, nc, figsize=(6.0 * nc, 0.9 + (0.3 * n + 1.2) * nr),
                             squeeze=False, layout="constrained")
    palette = dict(zip([r["objective"] for r in objs], plt.cm.tab20(np.linspace(0, 1, max(n, 2)))[:n]))
    line_styles = ["--", ":", "-.", (0, (5, 1))]
    for ax, m in zip(axes.flat, metrics):
        scale = 100.0 if m.percent else 1.0
        have = [r for r in objs if math.isfinite(r["metrics"].get(m.key, {}).get("mean", math.nan))]
        have.sort(key=lambda r: r["metrics"][m.key]["mean"] * (1 if m.lower_is_better else -1))
        mean = np.array([r["metrics"][m.key]["mean"] for r in have], dtype=float) * scale
        std = np.nan_to_num(np.array([r["metrics"][m.key]["std"] for r in have], dtype=float) * scale)
        base_vals = [(b["objective"], b["metrics"].get(m.key, {}).get("mean", math.nan) * scale) for b in bases]
        base_vals = [(name, v) for name, v in base_vals if math.isfinite(v)]
        every = [*(mean - std), *(mean + std), *(v for _, v in base_vals)]
        if not every:
            ax.axis("off")
            continue
        lo, hi = min(every), max(every)
        pad = max(0.08 * (hi - lo), 1e-3 * max(abs(hi), 1.0))
        left = lo - pad
        y = np.arange(len(have))
        ax.barh(y, mean - left, left=left, xerr=std, color=[palette[r["objective"]] for r in have],
                error_kw={"capsize": 2, "elinewidth": 1})
        fmt = (lambda v: f"{v:.1f}") if m.percent else (lambda v: f"{v:.3g}")
        labels = [f"{r['objective']}  {fmt(v)}" + (f"±{fmt(s_)}" if s_ > 0 else "")
                  for r, v, s_ in zip(have, mean, std)]
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        for i, (name, v) in enumerate(base_vals):
            ax.axvline(v, color="black", ls=line_styles[i % len(line_styles)], lw=1, label=f"{name} {fmt(v)}")
        if base_vals:
            ax.legend(fontsize=6, loc="lower right" if not m.lower_is_better else "lower left", framealpha=0.8)
        ax.set_xlim(left, hi + pad)
        better = "lower" if m.lower_is_better else "higher"
        ax.set_title(f"{m.label}{' (%)' if m.percent else ''}: {better} is better", fontsize=10)
        ax.set_xlabel(f"{m.label}{' (%)' if m.percent else ''} (axis starts at {fmt(left)}, not 0)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(title + "\nmean over seeds (and class splits), error bars = std; each panel sorted best first; "
                 "dashed lines = baselines", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish_grid(plt, fig, axes, used: int, path: Path, suptitle: str) -> None:
    """Hide the grid's unused panels, title the figure, save and close it."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curves(plt, task, rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Per objective: the training loss per epoch (left axis) and the held-out primary metric
    as it trains (right axis, when the task tracks it), mean and std band over seeds."""
    from .report import still_improving

    rows = [r for r in rows if not r.get("baseline")]
    m = task.metric(task.primary)
    scale = 100.0 if m.percent else 1.0
    order = [r["objective"] for r in rows]
    nr, nc = grid(len(order))
    fig, axes = plt.subplots(nr, nc, figsize=(max(3.8 * nc, 7.5), 2.6 * nr + 1.2),
                             squeeze=False, layout="constrained")
    for ax, r in zip(axes.flat, rows):
        mean = np.asarray(r["epoch_loss_mean"])
        std = np.asarray(r["epoch_loss_std"])
        ep = np.arange(1, len(mean) + 1)
        ax.plot(ep, mean, marker="o", ms=2, color="tab:blue")
        ax.fill_between(ep, mean - std, mean + std, alpha=0.25, color="tab:blue")
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_ylabel("train loss", fontsize=7, color="tab:blue")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        name = r["objective"]
        if r.get("metric_epochs"):
            ax2 = ax.twinx()
            me = np.asarray(r["metric_epochs"])
            mm = np.asarray(r["epoch_metric_mean"]) * scale
            ms = np.asarray(r["epoch_metric_std"]) * scale
            ax2.plot(me, mm, marker="s", ms=2, color="tab:orange")
            ax2.fill_between(me, mm - ms, mm + ms, alpha=0.2, color="tab:orange")
            ax2.set_ylabel(f"held-out {m.label}{' %' if m.percent else ''}", fontsize=7, color="tab:orange")
            ax2.tick_params(labelsize=7)
            if still_improving(r, m.lower_is_better):
                name += "  [still improving]"
        ax.set_title(name, fontsize=9)
    finish_grid(plt, fig, axes, len(order), path, title + f"\ntraining loss (blue, left) and held-out {m.label} "
                 "(orange, right) per epoch; mean over seeds, band = std;\neach objective on its own scale")


def _cost(plt, rows: list[dict[str, Any]], path: Path, title: str) -> None:
    rows = [r for r in rows if not r.get("baseline")]
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
    from .report import leaderboard_rows

    plt = _plt()
    cfg, task = run.config, run.task
    rows = leaderboard_rows(run)
    out = Path(run.out) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    name = getattr(run, "data_name", "")
    try:
        title = task.plot_title(cfg, name) if name else task.plot_title(cfg)
    except TypeError:  # a task whose plot_title takes the config alone
        title = task.plot_title(cfg)
    paths = [out / "metrics.png", out / "training_curves.png", out / "cost.png"]
    _bars(plt, task, rows, paths[0], title)
    _curves(plt, task, rows, paths[1], title)
    _cost(plt, rows, paths[2], title)
    return paths + task.plots(plt, run, [r for r in rows if not r.get("baseline")], out, title)
