"""Closed-set Omniglot under symmetric label noise: cross-entropy against the
bounded comp-sum losses (GCE, MAE), through the bench's classification task.

Data: the first ``--classes`` characters (in the loader's sorted order) of
``images_background_small1`` (all 20 drawings each), 28x28; per class a fixed
``--test-fraction`` of the drawings is the clean test set, the rest train
(``closed_set``, the bench's split; noise only on the training labels).  One
bench run per noise level, every objective on the same network, batches and
seeds; the leaderboards are printed as the bench writes them.

    python experiments/omniglot_label_noise.py --data-dir /work/shared/datasets/omniglot \\
        --classes 60 --noise 0 0.2 0.4 --seeds 2 --epochs 30 --out /tmp/omni-noise
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def subset_split(data_dir: str, n_classes: int, image_size: int):
    from losskit.data import load_omniglot

    full = load_omniglot(data_dir, image_size=image_size)
    if not 2 <= n_classes <= len(full.train_classes):
        raise SystemExit(f"--classes: expected 2..{len(full.train_classes)} (images_background_small1), "
                         f"got {n_classes}")
    keep = full.train_y < n_classes
    x = full.train_x[keep]
    return SimpleNamespace(name=f"omniglot-small1[{n_classes} classes]", train_x=x, train_y=full.train_y[keep],
                           test_x=x[:0], test_y=full.train_y[:0], train_classes=list(full.train_classes[:n_classes]),
                           test_classes=[])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--classes", type=int, default=60)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    ap.add_argument("--objectives", default="cross-entropy,gce,mae")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--augment", default="shift")
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from losskit.bench import BenchConfig, run_bench
    from losskit.bench.tasks.classification import closed_set

    split = subset_split(args.data_dir, args.classes, 28)
    for eta in args.noise:
        data = closed_set(split, args.test_fraction, label_noise=eta)
        data.name = split.name
        cfg = BenchConfig(task="classification", dataset="omniglot", data_dir=args.data_dir,
                          objectives=args.objectives.split(","), seeds=args.seeds, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, model=args.model, augment=args.augment,
                          test_fraction=args.test_fraction, label_noise=eta, pgd_radius=0.0, track_every=0,
                          baselines=False, device="cpu")
        out = Path(args.out) / f"noise{eta:g}"
        t = time.perf_counter()
        run_bench(cfg, out, resume=(out / "config.json").exists(), progress=False, plots=False, log=lambda s: None,
                  data=data)
        print(f"\n# {split.name}, {len(data.train_y)} training / {len(data.test_y)} test images, "
              f"noise {eta:g} ({time.perf_counter() - t:.0f} s)\n")
        print((out / "leaderboard.txt").read_text())


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
