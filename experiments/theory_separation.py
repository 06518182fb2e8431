"""Iterations to separate against the step size, Normalized LR+GD vs LR+GD (Tyurin 2024).

Two tables: the paper's worst-case data (n = 1000) and a real imbalanced
binary task from scikit-learn's bundled digits (every "3" against a tenth of
the "8"s, pixels scaled to [0, 1], a constant feature for the bias).

    PYTHONPATH=src python experiments/theory_separation.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from losskit.optim.normalized_lrgd import iterations_to_separate, worst_case_dataset


def digits_task(pos: int = 3, neg: int = 8, neg_fraction: float = 0.1, seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    ip = np.flatnonzero(y == pos)
    ineg = np.flatnonzero(y == neg)
    ineg = rng.choice(ineg, size=max(1, int(round(neg_fraction * len(ineg)))), replace=False)
    idx = np.concatenate([ip, ineg])
    a = np.concatenate([x[idx] / 16.0, np.ones((len(idx), 1))], axis=1)
    lab = np.where(y[idx] == pos, 1.0, -1.0)
    return torch.tensor(a), torch.tensor(lab), len(ip), len(ineg)


def row(a, y, gamma, max_iter):
    out = []
    for normalized in (True, False):
        t0 = time.perf_counter()
        try:
            it = iterations_to_separate(a, y, gamma, normalized=normalized, max_iter=max_iter)
        except RuntimeError:
            it = f"> {max_iter}"
        out.append((it, time.perf_counter() - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gammas", type=float, nargs="+", default=[1000, 100, 10, 1, 0.1])
    ap.add_argument("--max-iter", type=int, default=200_000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    a, y = worst_case_dataset(1000)
    print("worst-case data (n = 1000): iterations to 100% training accuracy")
    print("| gamma | Normalized LR+GD | LR+GD |")
    print("|---|---|---|")
    for g in args.gammas:
        (n_it, _), (p_it, _) = row(a, y, g, args.max_iter)
        print(f"| {g:g} | {n_it} | {p_it} |")
    a, y, npos, nneg = digits_task()
    print(f"\ndigits 3 vs 8 (imbalanced: {npos} threes, {nneg} eights; 64 pixels + bias): iterations to separate")
    print("| gamma | Normalized LR+GD | LR+GD |")
    print("|---|---|---|")
    for g in args.gammas:
        (n_it, _), (p_it, _) = row(a, y, g, args.max_iter)
        print(f"| {g:g} | {n_it} | {p_it} |")


if __name__ == "__main__":
    main()
