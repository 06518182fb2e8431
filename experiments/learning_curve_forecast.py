"""Forecast a learning curve's final value from its first 10%, 25% and 50%:
the accuracy pattern c - a x^-b against a plain power law a x^b.

Curves: scikit-learn's ``learning_curve`` on its bundled digits (5-fold CV,
30 training sizes spaced geometrically from 40 to all 1437 training rows),
for six estimators.  For each prefix the table gives |forecast - observed|
of the last level's mean test accuracy, in accuracy points, and the
prediction level / stopping point of the forecaster (epsilon 0.02 by default).

With ``--bench-run DIR`` it also scores the per-epoch held-out curves
(``epoch_metric``, the held-out Recall@1 of the embedding task) that a
``losskit bench`` run folder holds.

    PYTHONPATH=src python experiments/learning_curve_forecast.py [--bench-run runs/...]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

from losskit.metrics.learning_curves import LearningCurveForecaster, fit_accuracy_pattern, fit_power_law


def curves(levels: int, seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, learning_curve
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    est = {
        "logistic": LogisticRegression(max_iter=2000),
        "gaussian-nb": GaussianNB(),
        "knn-5": KNeighborsClassifier(5),
        "svc-rbf": SVC(gamma=0.05),
        "tree": DecisionTreeClassifier(random_state=seed),
        "forest-50": RandomForestClassifier(50, random_state=seed),
    }
    n_train = int(len(y) * 0.8)
    sizes = np.unique(np.geomspace(40, n_train, levels).astype(int))
    out = {}
    for name, e in est.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s, _, te = learning_curve(e, x, y, train_sizes=sizes, cv=StratifiedKFold(5, shuffle=True,
                                                                                       random_state=seed),
                                      n_jobs=1)
        out[name] = (s.astype(float), te.mean(1))
    return out


def bench_curves(run_dir: str) -> dict:
    """``{"objective/seed": (epochs, held-out metric)}`` from the cells of a bench run folder."""
    import pathlib

    out = {}
    for path in sorted(pathlib.Path(run_dir).rglob("*.json")):
        try:
            cell = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
        if isinstance(cell, dict) and cell.get("epoch_metric") and "objective" in cell:
            e, v = zip(*cell["epoch_metric"])
            out[f"{cell['objective']}/{cell.get('seed', 0)}"] = (np.asarray(e, float), np.asarray(v, float))
    if not out:
        raise SystemExit(f"no cell with an epoch_metric curve under {run_dir}")
    return out


def score(cs: dict, epsilon: float, title: str) -> list:
    rows = []
    print(title)
    print("| curve | final | pattern 10% | power 10% | pattern 25% | power 25% | pattern 50% | power 50% "
          "| trusted at | stop at | A_inf (all levels) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (x, y) in cs.items():
        r = {"estimator": name, "final": float(y[-1])}
        cells = []
        for frac in (0.10, 0.25, 0.50):
            k = max(3, int(round(frac * len(x))))
            pat = abs(float(fit_accuracy_pattern(x[:k], y[:k])(x[-1])) - y[-1]) * 100
            pw = abs(float(fit_power_law(x[:k], y[:k])(x[-1])) - y[-1]) * 100
            r[f"pattern_{frac}"], r[f"power_{frac}"] = pat, pw
            cells += [f"{pat:.2f}", f"{pw:.2f}"]
        f = LearningCurveForecaster(target_x=float(x[-1]), epsilon=epsilon, tol=0.005)
        stop = None
        for i, (xi, yi) in enumerate(zip(x, y)):
            f.update(xi, yi)
            if stop is None and f.should_stop:
                stop = i + 1
        r["level"], r["stop"] = f.level, stop
        rows.append(r)
        lv = f"{f.level}/{len(x)} (x={int(x[f.level - 1])})" if f.level else "never"
        st = f"{stop}/{len(x)} (x={int(x[stop - 1])})" if stop else "never"
        print(f"| {name} | {y[-1] * 100:.2f} | " + " | ".join(cells) + f" | {lv} | {st} | {f.asymptote * 100:.2f} |")
    mean = {k: np.mean([r[k] for r in rows]) for k in rows[0] if k.startswith(("pattern", "power"))}
    print("| mean | | " + " | ".join(f"{mean[f'{m}_{fr}']:.2f}" for fr in (0.1, 0.25, 0.5)
                                    for m in ("pattern", "power")) + " | | | |")
    return rows


def plot(cs: dict, path: str, frac: float = 0.25) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(11, 6), sharex=True)
    for ax, (name, (x, y)) in zip(axes.ravel(), cs.items()):
        k = max(3, int(round(frac * len(x))))
        xs = np.geomspace(x[0], x[-1], 200)
        ax.plot(x, y * 100, "k.", label="observed")
        ax.plot(x[:k], y[:k] * 100, "o", mfc="none", color="C3", label=f"first {frac:.0%} (fitted)")
        ax.plot(xs, fit_accuracy_pattern(x[:k], y[:k])(xs) * 100, "C0-", label="pattern c - a x^-b")
        ax.plot(xs, fit_power_law(x[:k], y[:k])(xs) * 100, "C1--", label="power law a x^b")
        ax.set(xscale="log", title=name, ylim=(min(y) * 100 - 5, 101))
    for ax in axes[1]:
        ax.set_xlabel("training-set size")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy %")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("digits learning curves: forecasts from the first 25% of each curve")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--epsilon", type=float, default=0.02)
    ap.add_argument("--plot", default=None, help="PNG: each digits curve with the fits from its first 25%%")
    ap.add_argument("--bench-run", default=None,
                    help="also score the per-epoch held-out curves of a `losskit bench` run folder")
    args = ap.parse_args()
    t0 = time.perf_counter()
    digits = curves(args.levels)
    rows = score(digits, args.epsilon,
                 f"digits learning curves ({args.levels} levels, 5-fold CV), |forecast - observed| of the final "
                 "accuracy in points (x = training-set size)")
    if args.bench_run:
        rows += score(bench_curves(args.bench_run), args.epsilon,
                      f"\nper-epoch held-out curves of the bench run {args.bench_run} (x = epoch), "
                      "|forecast - observed| of the last epoch's value in points")
    if args.plot:
        plot(digits, args.plot)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
