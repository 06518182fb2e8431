"""Negative flips of a model update on digits and Omniglot, on CPU (issue 12, item 1).

The old model (an MLP, 2 hidden layers of 256; on Omniglot also a small CNN:
two 3x3 conv blocks of 32 and 64 channels, a 128-unit layer) is trained on
the first half of the classes; the update (same architecture, all classes) is trained by

* ``scratch``: cross-entropy from a fresh initialisation;
* ``finetune``: cross-entropy starting from the old model's weights (old
  head rows copied, new rows fresh);
* ``fd``: CE + focal distillation from the old model (alpha 1, beta 5, T 5);
* ``calibration``: CE with the new classes' logits + 4 during training, no distillation;
* ``mpt``: margin calibration (b 4) + double-source focal distillation (the
  old model, and an independently trained new model = the ``scratch`` run of
  the same seed); ``mpt-b1``, ``mpt-b2``: the same with b = 1, 2 (the paper's grid).

Reported on the held-out samples: accuracy over all classes, NFR and relative
NFR on the old classes' samples (the paper's protocol), mean +- std over seeds.

    PYTHONPATH=src python benchmarks/continual_model_update.py --data ../shared/datasets/omniglot
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import losskit
from losskit.metrics.flips import flip_summary
from losskit.recipes.model_update import train_classifier


def mlp(d_in: int, c: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, c))


def cnn(side: int, c: int) -> nn.Module:
    """Two conv blocks and two linear layers, for the Omniglot images ([N, side * side] flattened)."""
    q = side // 4
    return nn.Sequential(nn.Unflatten(1, (1, side, side)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * q * q, 128), nn.ReLU(), nn.Linear(128, c))


def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    p = torch.randperm(len(y), generator=g)
    n = int(0.5 * len(y))  # half trains, half tests: enough test errors to count flips
    return x[p[:n]], y[p[:n]], x[p[n:]], y[p[n:]], 10


def omniglot(path: str, classes: int = 60):
    from losskit.data import load_omniglot
    d = load_omniglot(path, image_size=20)
    keep = d.train_y < classes
    x, y = 1.0 - d.train_x[keep], d.train_y[keep]
    rank = torch.zeros_like(y)
    for c in y.unique():
        w = (y == c).nonzero().squeeze(1)
        rank[w] = torch.arange(len(w))
    tr = rank < 12
    return x[tr].flatten(1), y[tr], x[~tr].flatten(1), y[~tr], classes


def run(name, data, seeds, epochs, lr, net=mlp):
    xtr, ytr, xte, yte, C = data
    c_old = C // 2
    rows = {m: [] for m in ("scratch", "finetune", "fd", "calibration", "mpt-b1", "mpt-b2", "mpt")}
    for seed in seeds:
        torch.manual_seed(100 + seed)
        old = net(xtr.shape[1], c_old)
        m_old = ytr < c_old
        train_classifier(old, xtr[m_old], ytr[m_old], epochs=epochs, lr=lr, seed=seed)
        with torch.no_grad():
            old_pred = old(xte).argmax(1)
        torch.manual_seed(200 + seed)
        init = net(xtr.shape[1], C)
        models = {}
        models["scratch"] = copy.deepcopy(init)
        train_classifier(models["scratch"], xtr, ytr, epochs=epochs, lr=lr, seed=seed + 1)
        ft = copy.deepcopy(init)
        with torch.no_grad():
            for (n, p), po in zip(ft.named_parameters(), old.parameters()):
                if p.shape == po.shape:
                    p.copy_(po)
                else:  # the last layer: old rows copied, new rows keep their fresh init
                    p[:c_old].copy_(po)
        models["finetune"] = copy.deepcopy(ft)
        train_classifier(models["finetune"], xtr, ytr, epochs=epochs, lr=lr, seed=seed + 1)
        models["fd"] = copy.deepcopy(init)
        losskit.get("model-update", method="focal-distillation", epochs=epochs, lr=lr, seed=seed + 1)(
            models["fd"], xtr, ytr, old)
        models["calibration"] = copy.deepcopy(init)
        losskit.get("model-update", method="calibration", epochs=epochs, lr=lr, seed=seed + 1)(
            models["calibration"], xtr, ytr, old)
        for key, b in (("mpt-b1", 1.0), ("mpt-b2", 2.0), ("mpt", 4.0)):
            models[key] = copy.deepcopy(init)
            losskit.get("model-update", method="mpt", bias=b, epochs=epochs, lr=lr, seed=seed + 1)(
                models[key], xtr, ytr, old, models["scratch"])
        for m, model in models.items():
            with torch.no_grad():
                z = model(xte)
            acc = (z.argmax(1) == yte).float().mean().item()
            s = flip_summary(z, old_pred, yte, num_old_classes=c_old)
            rows[m].append((acc, s["nfr"], s["relative_nfr"]))
    old_acc = (old_pred[yte < c_old] == yte[yte < c_old]).float().mean().item()
    print(f"\n{name}: {C} classes ({c_old} old), {len(ytr)} train / {len(yte)} test, {epochs} epochs, "
          f"{len(seeds)} seeds; old model accuracy on old classes {100 * old_acc:.1f}% (last seed)")
    print("| update | accuracy (%) | NFR (%) | relative NFR |\n|---|---|---|---|")
    sd = lambda z: statistics.stdev(z) if len(z) > 1 else 0.0
    for m, v in rows.items():
        a, n, r = ([100 * t[0] for t in v], [100 * t[1] for t in v], [t[2] for t in v])
        print(f"| {m} | {statistics.mean(a):.1f} +- {sd(a):.1f} | {statistics.mean(n):.2f} +- {sd(n):.2f} "
              f"| {statistics.mean(r):.2f} +- {sd(r):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None, help="Omniglot folder (skipped if not given)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    run("digits", digits(), a.seeds, a.epochs, 1e-3)
    if a.data:
        run("omniglot (MLP)", omniglot(a.data), a.seeds, a.epochs, 1e-3)
        run("omniglot (CNN)", omniglot(a.data), a.seeds, a.epochs, 1e-3, net=lambda d, c: cnn(20, c))
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
