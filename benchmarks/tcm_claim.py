"""TCM's claim, tested: does adding the TCM regulariser to a base loss lower
OPIS at about the same Recall@1 on classes never seen in training?

    PYTHONPATH=src python benchmarks/tcm_claim.py --dataset digits --splits 3
    PYTHONPATH=src python benchmarks/tcm_claim.py --dataset omniglot --data-dir ../shared/datasets/omniglot --splits 3

An experiment, not a speed benchmark.  For each class split (all classes of
the data set pooled, then cut at random into two halves by the split's seed:
train on one half, evaluate on the other), each configuration trains the
same network from the same initialisation on the same class-balanced
batches (Adam 1e-3, P x K batches) and is evaluated on the held-out half:
Recall@1, MAP@R, EER, OPIS and epsilon-OPIS (``losskit.metrics``, cosine).

Configurations (``--configs``): ``ms`` (Multi-Similarity, paper defaults
alpha 2, beta 50, lambda 1, eps 0.1), ``ms+tcm`` (the same plus TCM at
pytorch-metric-learning's defaults lambda+- 1, m+ 0.9, m- 0.5), ``ms05`` and
``ms05+tcm`` (the official code's base hyperparameters alpha 2, beta 40,
lambda 0.5), ``ms+tcm-m7`` (m- 0.7).

Diagnostics printed with each run: during the last training epoch, the share
of the batch's positive pairs with S <= m+ and of negative pairs with
S >= m- (the pairs TCM selects; measured for every configuration, TCM or
not), and on the held-out classes the 5/50/95 % quantiles of genuine and
impostor cosine similarities, the calibration range of OPIS (the thresholds
at FAR 1e-1 and 1e-2) and the shares of held-out genuine pairs below m+ and
impostor pairs above m-.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import losskit
from losskit.bench.model import build_model
from losskit.data.samplers import PKSampler, pk_batch_shape
from losskit.metrics import epsilon_opis, evaluate_embeddings

CONFIGS = {
    "ms": ("multi-similarity", {}),
    "ms+tcm": ("tcm", {}),
    "ms05": ("multi-similarity", {"beta": 40.0, "lam": 0.5}),
    "ms05+tcm": ("tcm", {"base_kwargs": {"beta": 40.0, "lam": 0.5}}),
    "ms+tcm-m7": ("tcm", {"margin_minus": 0.7}),
}
M_PLUS, M_MINUS = 0.9, 0.5


def load(args):
    if args.dataset == "digits":
        from losskit.data.digits import load_digits

        d = load_digits()
    else:
        from losskit.data.omniglot import load_omniglot

        d = load_omniglot(args.data_dir, max_per_class=args.max_per_class)
    # pool both sides: every class once, labels 0..C-1
    x = torch.cat([d.train_x, d.test_x])
    y = torch.cat([d.train_y, d.test_y + d.num_train_classes])
    return x, y, d.num_train_classes + d.num_test_classes


def split(y, n_classes, seed):
    perm = np.random.default_rng(1000 + seed).permutation(n_classes)
    train_c = torch.as_tensor(np.sort(perm[: n_classes // 2]))
    is_train = torch.isin(y, train_c)
    return is_train


def relabel(y):
    _, inv = torch.unique(y, return_inverse=True)
    return inv


def selected_shares(emb, yb):
    s = F.normalize(emb.detach(), dim=1) @ F.normalize(emb.detach(), dim=1).T
    same = yb[:, None] == yb[None, :]
    eye = torch.eye(len(yb), dtype=torch.bool)
    pos, neg = same & ~eye, ~same
    return float((s[pos] <= M_PLUS).float().mean()), float((s[neg] >= M_MINUS).float().mean())


def run(args, x, y, is_train, cfg_name, seed):
    name, kw = CONFIGS[cfg_name]
    xt, yt = x[is_train], relabel(y[is_train])
    xv, yv = x[~is_train], relabel(y[~is_train])
    model = build_model("auto", tuple(x.shape[1:]), args.embedding_dim, seed)
    loss_fn = losskit.get(name, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    p, k = pk_batch_shape(yt, 80, args.batch_classes, args.batch_samples)
    sampler = PKSampler(yt, p, k, seed)
    torch.manual_seed(seed)
    steps = args.epochs * sampler.steps_per_epoch
    last = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = torch.as_tensor(sampler.batch())
        emb = model(xt[idx])
        loss = loss_fn(emb, yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= steps - sampler.steps_per_epoch:
            last.append(selected_shares(emb, yt[idx]))
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        ev = torch.cat([model(xv[i:i + 512]) for i in range(0, len(xv), 512)])
    m = evaluate_embeddings(ev, yv)
    eps = epsilon_opis(ev, yv)
    e = F.normalize(ev, dim=1)
    s = e @ e.T
    same = yv[:, None] == yv[None, :]
    iu = torch.triu_indices(len(yv), len(yv), 1)
    sv, sm = s[iu[0], iu[1]], same[iu[0], iu[1]]
    gen, imp = sv[sm], sv[~sm]
    q = torch.tensor([0.05, 0.5, 0.95])
    from losskit.metrics.opis import thresholds_from_impostor

    thr = thresholds_from_impostor(imp)
    return {
        "r1": 100 * m["recall@1"], "mapr": 100 * m["map@r"], "eer": 100 * m["eer"], "opis": m["opis"], "eps": eps,
        "sel_p": 100 * statistics.mean(a for a, _ in last), "sel_n": 100 * statistics.mean(b for _, b in last),
        "gen_q": torch.quantile(gen, q).tolist(), "imp_q": torch.quantile(imp, q).tolist(),
        "cal": (float(thr[0]), float(thr[-1])),
        "gen_below": 100 * float((gen <= M_PLUS).float().mean()), "imp_above": 100 * float((imp >= M_MINUS).float().mean()),
        "train_s": train_s, "pk": (p, k), "steps": steps,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=["digits", "omniglot"], default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--splits", type=int, default=3)
    ap.add_argument("--only-splits", type=int, nargs="+", default=None,
                    help="run only these split indices (of 0..splits-1)")
    ap.add_argument("--epochs", type=int, default=None, help="default: 30 (digits), 10 (omniglot)")
    ap.add_argument("--configs", nargs="+", default=["ms", "ms+tcm", "ms05", "ms05+tcm"], choices=list(CONFIGS))
    ap.add_argument("--embedding-dim", type=int, default=64)
    ap.add_argument("--batch-classes", type=int, default=0)
    ap.add_argument("--batch-samples", type=int, default=0)
    ap.add_argument("--max-per-class", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.dataset == "omniglot" and not args.data_dir:
        ap.error("--data-dir is required for omniglot")
    if args.epochs is None:
        args.epochs = 30 if args.dataset == "digits" else 10
    if args.dataset == "omniglot" and not args.batch_classes:
        args.batch_classes, args.batch_samples = 16, 5
    torch.set_num_threads(args.threads)
    x, y, C = load(args)
    print(f"# TCM's claim on {args.dataset}: {C} classes pooled, {args.splits} random half/half class splits, "
          f"{args.epochs} epochs, embedding dim {args.embedding_dim}, seed = split")
    print(f"load average {os.getloadavg()}, torch {torch.__version__}, threads {args.threads}\n")
    print("| split | config | R@1 % | MAP@R % | EER % | OPIS | eps-OPIS | train: pos S<=m+ % | train: neg S>=m- % "
          "| held-out genuine S q5/q50/q95 | held-out impostor S q5/q50/q95 | OPIS range (FAR .1 -> .01) "
          "| held-out genuine <= m+ % | held-out impostor >= m- % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = {c: [] for c in args.configs}
    for sp in (range(args.splits) if args.only_splits is None else args.only_splits):
        is_train = split(y, C, sp)
        for c in args.configs:
            r = run(args, x, y, is_train, c, sp)
            rows[c].append(r)
            f3 = lambda v: "/".join(f"{a:.2f}" for a in v)  # noqa: E731
            print(f"| {sp} | {c} | {r['r1']:.1f} | {r['mapr']:.1f} | {r['eer']:.1f} | {r['opis']:.4f} | {r['eps']:.4f} "
                  f"| {r['sel_p']:.1f} | {r['sel_n']:.2f} | {f3(r['gen_q'])} | {f3(r['imp_q'])} "
                  f"| {r['cal'][0]:.2f} -> {r['cal'][1]:.2f} | {r['gen_below']:.1f} | {r['imp_above']:.2f} |", flush=True)
    print("\nmean ± std over splits:\n")
    print("| config | R@1 % | MAP@R % | EER % | OPIS | eps-OPIS |")
    print("|---|---|---|---|---|---|")
    for c, rs in rows.items():
        def ms(key, fmt):
            v = [r[key] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{statistics.mean(v):{fmt}}±{sd:{fmt}}"
        print(f"| {c} | {ms('r1', '.1f')} | {ms('mapr', '.1f')} | {ms('eer', '.1f')} | {ms('opis', '.4f')} "
              f"| {ms('eps', '.4f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
