"""PamC vs the dense N x N block-contrastive loss: graph clustering of the digits on a kNN graph
(the paper uses a kNN graph of USPS), then time and memory per training step at larger synthetic N.

    PYTHONPATH=src python experiments/pamc_digits.py                      # digits, 3 seeds; sizes 1797, 10k, 100k
    PYTHONPATH=src python experiments/pamc_digits.py --seeds 1 --sizes 1797

Digits (scikit-learn, 1797 x 64, standardised): a 5-NN cosine graph, A~ = sum of Ahat^r for r <= 4;
an autoencoder 64-256-64-10 pretrained 200 full-batch Adam steps (MSE), k-means (10 clusters) on
its codes initialises the centres; then 200 full-batch steps of beta KL(P||Q) + alpha L (alpha 2,
beta 2, tau 0.5; the paper's USPS values) on the encoder and the centres, Adam 1e-3, P recomputed
from Q every step (as the official code).  Scores of argmax Q at the last step (the official code
reports the best step scored against the labels; both are printed, scored every 10 steps;
train s excludes the scoring).  ACC with the Hungarian
matching (scipy), NMI and ARI from scikit-learn.

Cost: one training step (forward + backward of the loss on given embeddings, encoder excluded) at
N = each --sizes value, synthetic: 10 Gaussian clusters in 10-d, a graph of 5 random same-cluster
neighbours per node, A~ with R = 2 hops above 10k nodes (R = 4 keeps ~10^4 entries per row there);
median of 3 steps and the peak of bytes held by tensors during one step (torch.profiler).  The
dense loss is run only where its N x N matrices fit (N <= 10k here).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

from losskit.functional.contrastive import knn_adjacency, pamc_objective, propagated_adjacency, soft_assignment


def cluster_scores(y, pred):
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    k = max(y.max(), pred.max()) + 1
    m = np.zeros((k, k))
    for a, b in zip(pred, y):
        m[a, b] += 1
    r, c = linear_sum_assignment(-m)
    return m[r, c].sum() / len(y), normalized_mutual_info_score(y, pred), adjusted_rand_score(y, pred)


def digits_run(seed, dense, adj, x, y, steps=200):
    from sklearn.cluster import KMeans

    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    dec = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.mse_loss(dec(enc(x)), x).backward()
        opt.step()
    with torch.no_grad():
        z = enc(x)
    km = KMeans(10, n_init=20, random_state=seed).fit(z.numpy())
    centers = nn.Parameter(torch.tensor(km.cluster_centers_, dtype=torch.float32))
    opt = torch.optim.Adam([*enc.parameters(), centers], lr=1e-3)
    best, t0 = None, time.perf_counter()
    scored = 0.0
    for step in range(steps):
        z = enc(x)
        loss = pamc_objective(z, adj, centers, dense=dense)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 != 9:
            continue
        t1 = time.perf_counter()
        with torch.no_grad():
            s = cluster_scores(y, soft_assignment(enc(x), centers).argmax(1).numpy())
        best = s if best is None or s[0] > best[0] else best
        scored += time.perf_counter() - t1
    train_s = time.perf_counter() - t0 - scored
    return s, best, train_s


def synthetic(n, g):
    labels = torch.randint(0, 10, (n,), generator=g)
    means = torch.randn(10, 10, generator=g) * 3
    z = means[labels] + torch.randn(n, 10, generator=g)
    order = torch.argsort(labels)
    pos = torch.empty(n, dtype=torch.long)
    pos[order] = torch.arange(n)
    counts = torch.bincount(labels, minlength=10)
    starts = torch.cumsum(counts, 0) - counts
    rows, cols = [], []
    for _ in range(5):
        r = torch.arange(n)
        off = (torch.rand(n, generator=g) * counts[labels]).long()
        cols.append(order[starts[labels] + off])
        rows.append(r)
    r, c = torch.cat(rows), torch.cat(cols)
    keep = r != c
    ei = torch.cat([torch.stack([r[keep], c[keep]]), torch.stack([c[keep], r[keep]])], 1)
    a = torch.sparse_coo_tensor(ei, torch.ones(ei.shape[1]), (n, n)).coalesce()
    a = torch.sparse_coo_tensor(a.indices(), torch.ones_like(a.values()), (n, n)).coalesce()
    return z, a, means


def tensor_peak_mib(step):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    ev = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    run = peak = 0
    for e in ev:
        run += e.nbytes()
        peak = max(peak, run)
    return peak / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sizes", default="1797,10000,100000")
    ap.add_argument("--dense-max", type=int, default=10000)
    ap.add_argument("--hops", type=int, default=0, help="R of the synthetic graphs (0: 4 up to 10k nodes, 2 above)")
    ap.add_argument("--skip-digits", action="store_true", help="only the cost table")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor((d.data - d.data.mean(0)) / (d.data.std(0) + 1e-8), dtype=torch.float32)
    y = d.target
    adj = propagated_adjacency(knn_adjacency(x, 5), 4)
    if args.skip_digits:
        args.seeds = 0
    print(f"\ndigits: N 1797, 5-NN graph, R 4 (A~ has {adj._nnz()} entries), {args.seeds} seeds, 200 steps\n")
    print("| loss | ACC % (last) | NMI % | ARI % | ACC % (best step) | train s |")
    print("|---|---|---|---|---|---|")
    for dense in (False, True) if args.seeds else ():
        rs = [digits_run(s, dense, adj, x, y) for s in range(args.seeds)]

        def ms(vals, pct=True):
            f = 100 if pct else 1
            sd = statistics.stdev(vals) * f if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals) * f:.1f} +- {sd:.1f}"

        print(f"| {'dense N x N' if dense else 'PamC (meta-nodes)'} | {ms([r[0][0] for r in rs])} | "
              f"{ms([r[0][1] for r in rs])} | {ms([r[0][2] for r in rs])} | {ms([r[1][0] for r in rs])} | "
              f"{ms([r[2] for r in rs], False)} |")
    print("\none loss step (forward + backward on given embeddings), median of 3\n")
    print("| N | graph entries | PamC s | PamC MiB | dense s | dense MiB | dense / PamC time | dense / PamC memory |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for n in [int(v) for v in args.sizes.split(",") if v]:
        if n == 1797:
            z0, a, centers = x[:, :10].clone(), adj, torch.randn(10, 10, generator=g)
        else:
            z0, a0, centers = synthetic(n, g)
            a = propagated_adjacency(a0, args.hops or (4 if n <= 10000 else 2))
        res = {}
        for dense in (False, True):
            if dense and n > args.dense_max:
                res[dense] = None
                continue

            def step(dense=dense):
                z = z0.clone().requires_grad_(True)
                c = centers.clone().requires_grad_(True)
                pamc_objective(z, a, c, dense=dense).backward()

            step()
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t)
            res[dense] = (statistics.median(ts), tensor_peak_mib(step))
        p, q = res[False], res[True]
        dense_cells = f"{q[0]:.3f} | {q[1]:.0f} | {q[0] / p[0]:.1f} | {q[1] / p[1]:.1f}" if q else "- | - | - | -"
        print(f"| {n} | {a._nnz()} | {p[0]:.3f} | {p[1]:.0f} | {dense_cells} |")


if __name__ == "__main__":
    main()
