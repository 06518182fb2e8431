"""Accuracy against round for FedAvg, FedProx, FedLD and FedLEx under label skew (in-process, no Flower).

Data (``--dataset``):

* ``digits`` (default): scikit-learn's bundled 8x8 digits, all 10 classes, a seeded 80/20
  split (losskit.integrations.flower.task.load_digits_classification: 1437 train, 360 test);
* ``omniglot --data-dir PATH``: closed-set classification on one Omniglot background split
  (losskit.integrations.flower.task.load_omniglot_classification; PATH holds
  ``images_background_small1.zip`` or its extracted folder): ``--classes`` of its 136
  characters drawn with ``numpy.random.default_rng(--class-seed)``, 28x28, strokes = 1,
  flattened; in each class drawings ``_01`` to ``_15`` (sorted file names) train and
  ``_16`` to ``_20`` test.

The training rows are split over the clients by a Dirichlet(alpha) label partition
(losskit.data.partition, min 2 rows per client).  Model: MLP in -> ``--hidden`` -> classes
(64-32-10 for digits).
Same local budget for every method: SGD lr ``--lr`` (0.05), momentum 0.5, weight decay 5e-4,
2 local epochs, batch 32, all clients every round.  Method settings: FedProx mu 0.01;
FedLD lambda 0.03, k 0.8 m; FedLEx 2 exploration epochs on every client, server
momentum 0.9 (its official value) and also 0 (``fedlex-m0``: the guidance alone).
Ablations (``--methods``): ``fedavg+margin`` (FedLD's loss, FedAvg's server), ``fedld-pga-only``
(lambda 0), and Adam lr 3e-3 (FedLEx's own local optimiser) for FedAvg and FedLEx.

    PYTHONPATH=src python benchmarks/federated_heterogeneity.py                  # the full grid on digits
    PYTHONPATH=src python benchmarks/federated_heterogeneity.py --clients 10 --alphas 0.1 --seeds 0 --rounds 5
    PYTHONPATH=src python benchmarks/federated_heterogeneity.py --dataset omniglot \
        --data-dir /path/to/omniglot --classes 50 --hidden 128 --methods fedavg fedprox fedld fedlex

Prints the test accuracy (mean +- std over seeds) at selected rounds and writes every
curve to --out (JSON).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np
import torch

from losskit.data.partition import dirichlet_partition
from losskit.integrations.flower.task import load_digits_classification, load_omniglot_classification, make_model
from losskit.recipes.federated import LocalConfig, run_federated

METHODS = {
    "fedavg": dict(algorithm="fedavg"),
    "fedprox": dict(algorithm="fedprox", mu=0.01),
    "fedld": dict(algorithm="fedld"),
    "fedlex": dict(algorithm="fedlex", server_momentum=0.9),
    "fedlex-m0": dict(algorithm="fedlex", server_momentum=0.0),
    # ablations (run with --methods ...): FedLD's two parts alone; Adam, FedLEx's own local optimiser
    "fedavg+margin": dict(algorithm="fedavg", loss="margin-control"),
    "fedld-pga-only": dict(algorithm="fedld", lam=0.0),
    "fedavg-adam": dict(algorithm="fedavg", optimizer="adam", lr=3e-3, weight_decay=0.0),
    "fedlex-adam": dict(algorithm="fedlex", optimizer="adam", lr=3e-3, weight_decay=0.0, server_momentum=0.9),
    "fedlex-adam-m0": dict(algorithm="fedlex", optimizer="adam", lr=3e-3, weight_decay=0.0, server_momentum=0.0),
    "fedld-lr0.1": dict(algorithm="fedld", lr=0.1),  # longer local steps against PGA's shorter server step
    "fedld-lr0.2": dict(algorithm="fedld", lr=0.2),
    "fedavg-lr0.1": dict(algorithm="fedavg", lr=0.1),
    "fedavg-lr0.2": dict(algorithm="fedavg", lr=0.2),
}


@functools.lru_cache(maxsize=1)
def load(dataset: str, data_dir: str | None, classes: int | None, class_seed: int):
    if dataset == "digits":
        return load_digits_classification(0)
    if not data_dir:
        raise SystemExit("--dataset omniglot needs --data-dir PATH (a folder holding images_background_small1.zip)")
    return load_omniglot_classification(data_dir, num_classes=classes, class_seed=class_seed)


def describe(a) -> str:
    x, y, xt, _ = load(a.dataset, a.data_dir, a.classes, a.class_seed)
    c = int(y.max()) + 1
    name = "digits" if a.dataset == "digits" else f"omniglot small1, {c} classes (class seed {a.class_seed}), 28x28"
    return f"{name}, {len(x)} train / {len(xt)} test, MLP {x.shape[1]}-{a.hidden}-{c}, lr {a.lr}, {a.rounds} rounds"


def run_one(method: str, clients: int, alpha: float, seed: int, rounds: int, a) -> list[float]:
    x, y, xt, yt = load(a.dataset, a.data_dir, a.classes, a.class_seed)
    parts = dirichlet_partition(y, clients, alpha, seed=seed, min_size=2)
    data = [(x[torch.as_tensor(p)], y[torch.as_tensor(p)]) for p in parts]
    m = dict(METHODS[method])
    alg = m.pop("algorithm")
    over = {k: m.pop(k) for k in ("mu", "optimizer", "lr", "weight_decay", "loss", "lam") if k in m}
    local = LocalConfig(**{**dict(epochs=2, batch_size=32, lr=a.lr, optimizer="sgd", momentum=0.5,
                                  weight_decay=5e-4), **over})
    model = make_model(a.hidden, seed, in_features=x.shape[1], num_classes=int(y.max()) + 1)
    h = run_federated(model, data, algorithm=alg, rounds=rounds, local=local, explore_epochs=2, seed=seed,
                      eval_data=(xt, yt), **m)
    return h.accuracy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS)[:5])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--report", type=int, nargs="+", default=[5, 10, 20, 30])
    ap.add_argument("--out", default="federated_heterogeneity.json")
    ap.add_argument("--dataset", choices=["digits", "omniglot"], default="digits")
    ap.add_argument("--data-dir", default=None, help="omniglot: a folder holding images_background_small1.zip")
    ap.add_argument("--classes", type=int, default=100, help="omniglot: number of characters (of 136)")
    ap.add_argument("--class-seed", type=int, default=0, help="omniglot: draws which characters")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05, help="local SGD lr (methods with their own lr keep it)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    curves: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for c in a.clients:
        for al in a.alphas:
            for meth in a.methods:
                for s in a.seeds:
                    curves[f"{c}|{al}|{meth}|{s}"] = run_one(meth, c, al, s, a.rounds, a)
            print(f"# done clients={c} alpha={al} ({time.perf_counter() - t0:.0f} s)", flush=True)
            with open(a.out, "w") as f:
                json.dump({"args": vars(a), "curves": curves}, f)
    rep = [r for r in a.report if r <= a.rounds]
    print(f"\ntest accuracy (%), mean +- std over seeds {a.seeds}; {describe(a)}\n")
    print("| clients | alpha | method | " + " | ".join(f"round {r}" for r in rep) + " |")
    print("|---|---|---|" + "---|" * len(rep))
    for c in a.clients:
        for al in a.alphas:
            for meth in a.methods:
                accs = np.array([curves[f"{c}|{al}|{meth}|{s}"] for s in a.seeds]) * 100
                cells = [f"{accs[:, r - 1].mean():.1f} +- {accs[:, r - 1].std():.1f}" for r in rep]
                print(f"| {c} | {al} | {meth} | " + " | ".join(cells) + " |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
