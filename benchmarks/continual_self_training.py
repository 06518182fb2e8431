"""Self-training on scikit-learn's digits with 5% and 10% labelled (issue 12, item 3).

Base classifier: multinomial logistic regression (scikit-learn, C = 1,
max_iter 500) on the 64 pixels / 16.  The 1,797 digits are split 70/30
(stratified) into a pool and a test set; 5% or 10% of the pool is labelled,
the rest unlabelled (transductive pool).  Policies (max-probability margin,
at most 10 rounds, pseudo-labels weighted 1 unless said):

* ``labelled-only``: the baseline;
* ``fixed-0.9``, ``fixed-0.75`` (scikit-learn's default), ``mean``,
  ``curriculum`` (delta 0.2, pseudo-labels re-chosen every round),
  ``auto`` (Feofanov et al.'s transductive per-class thresholds, MSLA's
  "balanced" weights), ``top-k`` (k 50 per round),
  ``fixed-0.75-w0.3`` (pseudo-labels weighted 0.3).

Reported: test accuracy, the error rate of the final pseudo-labels and how
many there are, mean +- std over 5 labelled draws.

    PYTHONPATH=src python benchmarks/continual_self_training.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from losskit.recipes.self_training import run_self_training

POLICIES = {
    "fixed-0.9": dict(policy="fixed", threshold=0.9),
    "fixed-0.75": dict(policy="fixed", threshold=0.75),
    "fixed-0.75-w0.3": dict(policy="fixed", threshold=0.75, pseudo_weight=0.3),
    "mean": dict(policy="mean"),
    "curriculum": dict(policy="curriculum", delta=0.2, relabel=True, max_rounds=5),
    "auto": dict(policy="auto", pseudo_weight="balanced"),
    "top-k": dict(policy="top-k", k_best=50),
}


def main() -> None:
    import torch
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x, y = d.data / 16.0, d.target
    xp, xt, yp, yt = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    t0 = time.time()
    for frac in (0.05, 0.10):
        rows = {k: [] for k in ["labelled-only", *POLICIES]}
        for seed in range(5):
            rng = np.random.default_rng(seed)
            # at least one labelled point per class, then random
            idx = rng.permutation(len(yp))
            first = [idx[np.nonzero(yp[idx] == c)[0][0]] for c in range(10)]
            rest = [i for i in idx if i not in set(first)]
            n_l = int(round(frac * len(yp)))
            lab = np.array(first + rest[:n_l - 10])
            unl = np.setdiff1d(np.arange(len(yp)), lab)
            base = LogisticRegression(max_iter=500)
            base.fit(xp[lab], yp[lab])
            rows["labelled-only"].append((base.score(xt, yt), float("nan"), 0))
            for name, kw in POLICIES.items():
                kw = {"max_rounds": 10, **kw}
                res = run_self_training(LogisticRegression(max_iter=500), xp[lab], yp[lab], xp[unl], **kw,
                                        y_unlabelled_true=yp[unl])
                has = res.pseudo_labels != -1
                err = float(np.mean(res.pseudo_labels[has] != yp[unl][has])) if has.any() else float("nan")
                rows[name].append((res.classifier.score(xt, yt), err, int(has.sum())))
        print(f"\n{int(frac * 100)}% labelled ({n_l} of {len(yp)}; {len(yp) - n_l} unlabelled), test {len(yt)}, 5 draws")
        print("| policy | test accuracy (%) | pseudo-label error (%) | pseudo-labels |\n|---|---|---|---|")
        sd = lambda z: statistics.stdev(z) if len(z) > 1 else 0.0
        for k, v in rows.items():
            a = [100 * t[0] for t in v]
            e = [100 * t[1] for t in v if t[1] == t[1]]
            n = [t[2] for t in v]
            es = f"{statistics.mean(e):.1f} +- {sd(e):.1f}" if e else "-"
            print(f"| {k} | {statistics.mean(a):.1f} +- {sd(a):.1f} | {es} | {statistics.mean(n):.0f} |")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
