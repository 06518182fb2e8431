"""IGNITE on offline black-box optimisation tasks that need no download.

Tasks (maximisation, the oracle is known, as Design-Bench's continuous tasks):

* ``rosenbrock``: ``f(x) = -sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2`` in 20
  dimensions, designs uniform in [-2, 2]^20;
* ``random-net``: a fixed random tanh network 32 -> 64 -> 64 -> 1 (seed 1234),
  designs standard normal in 32 dimensions.

Per seed: 4,000 designs are drawn; the offline data set is the lower-scoring
half (Design-Bench's low-scoring region); scores are normalised as Design-Bench
does, ``(y - y_min) / (y_max - y_min)`` with the min and max of all 4,000 draws.
The surrogate (MLP d -> 128 -> 128 -> 1, ReLU) is trained on z-scored x and y with
Adam (lr 1e-3, batch 128, 50 epochs), with or without IGNITE (the paper's
defaults: rho 0.05, r 0.05, eps 0.1, lambda0 1e-3, eta 1e-3; ``--eta`` adds
another dual step size); the same data, initialisation and batches for both.
Then gradient ascent on the surrogate from the 128 best offline designs:
100 Adam steps of lr 0.01 in z-scored design space (``Grad. Ascent`` of
Design-Bench with Adam); the oracle scores the 128 final designs and the 100th
and 50th percentiles of their normalised scores are reported, mean +- std over
8 seeds.

    PYTHONPATH=src python benchmarks/ignite_offline.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch import nn


def rosenbrock(x):
    return -(100 * (x[:, 1:] - x[:, :-1] ** 2) ** 2 + (1 - x[:, :-1]) ** 2).sum(1)


def _random_net():
    g = torch.Generator().manual_seed(1234)
    ws = [torch.randn(32, 64, generator=g) / 32 ** 0.5, torch.randn(64, 64, generator=g) / 8,
          torch.randn(64, 1, generator=g) / 8]

    def f(x):
        h = torch.tanh(x @ ws[0])
        h = torch.tanh(h @ ws[1])
        return (h @ ws[2]).squeeze(1)

    return f


TASKS = {
    "rosenbrock": (20, lambda n, g: torch.rand(n, 20, generator=g) * 4 - 2, rosenbrock),
    "random-net": (32, lambda n, g: torch.randn(n, 32, generator=g), _random_net()),
}


def surrogate(d):
    return nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1),
                         nn.Flatten(0))


def run(task, seed, ignite, eta, epochs=50):
    from losskit.recipes.ignite import run_ignite

    d, draw, oracle = TASKS[task]
    g = torch.Generator().manual_seed(seed)
    x_all = draw(4000, g)
    y_all = oracle(x_all)
    lo, hi = float(y_all.min()), float(y_all.max())
    keep = y_all <= y_all.median()
    x, y = x_all[keep], y_all[keep]
    mx, sx = x.mean(0), x.std(0)
    my, sy = y.mean(), y.std()
    xz, yz = (x - mx) / sx, (y - my) / sy
    torch.manual_seed(seed)
    model = surrogate(d)
    logs = run_ignite(model, (xz, yz), epochs=epochs, batch_size=128, lr=1e-3, regularise=ignite, dual_lr=eta, seed=seed)
    model.eval()
    start = xz[yz.argsort(descending=True)[:128]].clone().requires_grad_(True)
    opt = torch.optim.Adam([start], lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        (-model(start).sum()).backward()
        opt.step()
    final = start.detach() * sx + mx
    score = (oracle(final) - lo) / (hi - lo)
    best_offline = (float(y.max()) - lo) / (hi - lo)
    return float(score.max()), float(score.median()), best_offline, logs[-1].lam


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--eta", type=float, nargs="+", default=[1e-3], help="IGNITE dual step sizes to run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=50, help="surrogate training epochs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads) if args.threads else None
    out = []
    print("| task | surrogate training | 100th pct (mean +- std) | 50th pct (mean +- std) | best offline | final lambda |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks:
        variants = [("plain (no IGNITE)", False, 0.0)] + [(f"IGNITE (eta {e:g})", True, e) for e in args.eta]
        for label, ig, eta in variants:
            rs = [run(task, s, ig, eta, args.epochs) for s in range(args.seeds)]
            p100, p50, off, lam = zip(*rs)
            print(f"| {task} | {label} | {statistics.mean(p100):.3f} +- {statistics.stdev(p100):.3f} | "
                  f"{statistics.mean(p50):.3f} +- {statistics.stdev(p50):.3f} | {statistics.mean(off):.3f} | "
                  f"{statistics.mean(lam):.4f} |",
                  flush=True)
            out.append({"task": task, "variant": label, "p100": p100, "p50": p50, "best_offline": off, "lambda": lam})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
