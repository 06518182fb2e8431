"""MVP on Si-Blurry streams of Omniglot characters, on CPU (issue 12, item 2).

A TinyViT (28x28, 7x7 patches, dim 64, depth 4, 4 heads) is pretrained by
cross-entropy on the 136 classes of ``images_background_small1`` (Bengali,
Early Aramaic, Hebrew, Greek, Latin); the stream shows only the 106 classes of
``images_background_small2`` that small1 lacks (Japanese katakana, Sanskrit,
Tagalog), never seen in pretraining: 15 drawings per class stream, 5 test.
Si-Blurry: 5 tasks, 50% disjoint classes, 10% blurred; batch 16, each batch
seen ``online_iter`` = 3 times (official script), Adam lr 5e-3 (MVP) / 1e-3
(ER, fine-tuning: the whole network), ER memory 500, eval every 100 samples.

    PYTHONPATH=src python benchmarks/continual_mvp.py --data ../shared/datasets/omniglot --seeds 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import losskit
from losskit.data import load_omniglot
from losskit.data.streams import si_blurry_stream
from losskit.recipes.prompt_vit import TinyViT


def pretrain(x, y, epochs: int, seed: int = 0) -> TinyViT:
    torch.manual_seed(seed)
    net = TinyViT(num_classes=int(y.max()) + 1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(y), generator=g)
        tot = 0.0
        for s in range(0, len(y), 64):
            i = perm[s:s + 64]
            loss = F.cross_entropy(net(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(i)
        print(f"pretrain epoch {ep + 1}: loss {tot / len(y):.3f}", flush=True)
    net.eval()
    return net


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--methods", nargs="+", default=["mvp", "mvp-batch-gsf", "er", "finetune"])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    d = load_omniglot(a.data, image_size=28)
    inv = lambda t: 1.0 - t  # strokes = 1 on a 0 background
    bb = pretrain(inv(d.train_x), d.train_y, a.pretrain_epochs)
    with torch.no_grad():
        acc = (bb(inv(d.train_x)).argmax(1) == d.train_y).float().mean().item()
    print(f"pretrained on {d.num_train_classes} classes: train accuracy {acc:.3f} ({time.time() - t0:.0f} s)")
    # stream classes: 15 train / 5 test drawings each (the first 15 in file order stream)
    y = d.test_y
    rank = torch.zeros_like(y)
    for c in y.unique():
        w = (y == c).nonzero().squeeze(1)
        rank[w] = torch.arange(len(w))
    tr, te = rank < 15, rank >= 15
    xs, ys, xt, yt = inv(d.test_x[tr]), y[tr], inv(d.test_x[te]), y[te]
    print(f"stream: {d.num_test_classes} classes, {len(ys)} stream / {len(yt)} test samples")
    # the ceiling of a frozen backbone: a linear head trained offline (many epochs, all classes at once)
    with torch.no_grad():
        fs, ft = bb.features(xs), bb.features(xt)
    head = torch.nn.Linear(fs.shape[1], int(ys.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(head(fs), ys).backward()
        opt.step()
    with torch.no_grad():
        probe = (head(ft).argmax(1) == yt).float().mean().item()
    print(f"offline linear probe on the frozen features (all {int(ys.max()) + 1} classes): {100 * probe:.1f}%")
    opts = {"mvp": {"method": "mvp", "lr": 5e-3}, "mvp-batch-gsf": {"method": "mvp", "lr": 5e-3, "gsf_mode": "batch"},
            "mvp-no-mask": {"method": "mvp", "lr": 5e-3, "use_mask": False},
            "mvp-no-afs": {"method": "mvp", "lr": 5e-3, "use_afs": False},
            "mvp-no-gsf": {"method": "mvp", "lr": 5e-3, "use_gsf": False},
            "er": {"method": "er", "lr": 1e-3}, "finetune": {"method": "finetune", "lr": 1e-3}}
    res = {m: [] for m in a.methods}
    for seed in a.seeds:
        st = si_blurry_stream(ys, 5, 0.5, 0.1, seed=seed)
        for m in a.methods:
            t = time.time()
            r = losskit.get("mvp", online_iter=3, eval_period=100, seed=seed, **opts[m])(bb, xs, ys, xt, yt, st)
            res[m].append((r.a_auc, r.a_last))
            print(f"seed {seed} {m:14s} A_auc {100 * r.a_auc:5.1f}  A_last {100 * r.a_last:5.1f}  "
                  f"({time.time() - t:.0f} s)", flush=True)
    print(f"\n| method | A_auc (%) | A_last (%) | seeds |\n|---|---|---|---|")
    for m, v in res.items():
        au = [100 * p[0] for p in v]
        la = [100 * p[1] for p in v]
        sd = lambda z: statistics.stdev(z) if len(z) > 1 else 0.0
        print(f"| {m} | {statistics.mean(au):.1f} +- {sd(au):.1f} | {statistics.mean(la):.1f} +- {sd(la):.1f} "
              f"| {len(v)} |")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
