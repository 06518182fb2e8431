"""Naive Bayes vs logistic regression as linear evaluation, against the
number of training samples per class (Zheng et al., ICML 2023; issue 11,
item 7): where does logistic regression overtake naive Bayes?

Feature sets (each: a fixed per-class split into a fit pool and a test set;
``--repeats`` draws of ``shot`` rows per class from the pool, the same draw for
both classifiers):

* ``digits-pixels``: scikit-learn's 8x8 digits, the 64 raw pixels, 10 classes;
* ``digits-embedding``: the bench's MLP embedder (64-d) trained with
  cross-entropy for ``--epochs`` on digits 0-4, frozen, embedding digits 5-9
  (classes it never saw);
* ``omniglot-embedding`` (with ``--omniglot PATH``): the same MLP on 16x16
  Omniglot, trained on the loader's training alphabets, embedding the
  held-out alphabets' characters (20 drawings each: 10 fit, 10 test).

    python benchmarks/naive_bayes_crossover.py --omniglot ../shared/datasets/omniglot
"""

from __future__ import annotations

import argparse

import torch


def _train_embedder(split, epochs: int, seed: int = 0, dim: int = 64):
    from losskit.bench.model import build_model

    torch.manual_seed(seed)
    net = build_model("mlp", tuple(split.train_x.shape[1:]), dim, seed)
    head = torch.nn.Linear(dim, len(split.train_classes))
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=1e-3)
    n = split.train_y.shape[0]
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, 128):
            idx = order[i:i + 128]
            loss = torch.nn.functional.cross_entropy(head(net(split.train_x[idx])), split.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return net(split.test_x).double(), split.test_y


def _halves(x, y, fit_share: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    fit, test = [], []
    for c in torch.unique(y).tolist():
        rows = (y == c).nonzero().squeeze(1)
        rows = rows[torch.randperm(rows.shape[0], generator=g)]
        k = int(round(fit_share * rows.shape[0]))
        fit.append(rows[:k])
        test.append(rows[k:])
    f, t = torch.cat(fit), torch.cat(test)
    return x[f], y[f], x[t], y[t]


def _report(name: str, curve) -> None:
    from losskit.metrics.linear_probe import crossover

    print(f"\n{name}: test error % (mean ± std over {curve.errors['logistic'].shape[1]} draws)\n")
    print("| samples per class | naive Bayes | logistic regression | ahead |")
    print("|---|---|---|---|")
    for i, s in enumerate(curve.shots):
        nb, lr = curve.mean("naive-bayes")[i], curve.mean("logistic")[i]
        print(f"| {s} | {100 * nb:.1f} ± {100 * curve.std('naive-bayes')[i]:.1f} | "
              f"{100 * lr:.1f} ± {100 * curve.std('logistic')[i]:.1f} | {'NB' if nb < lr else 'LR'} |")
    c = crossover(curve)
    print(f"\ncrossover (LR ahead from here on): {c if c is not None else 'none within the range'}")


def main(argv=None) -> None:
    from losskit.data import load_digits, load_omniglot
    from losskit.metrics.linear_probe import sample_curve

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--omniglot", default=None, help="the Omniglot folder (zips); omitted: skip")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    d = load_digits(train_classes=range(10)[:9])   # all ten digits, as one pool (the 10th is the "test" class)
    x = torch.cat([d.train_x, d.test_x]).flatten(1).double()
    y = torch.cat([d.train_y, d.test_y + len(d.train_classes)])
    shots = [1, 2, 3, 5, 10, 20, 50, 80]
    _report("digits-pixels (64 raw pixels, 10 classes)",
            sample_curve(*_halves(x, y), shots=shots, repeats=args.repeats))

    emb, ey = _train_embedder(load_digits(), args.epochs)
    _report(f"digits-embedding (MLP trained {args.epochs} epochs on digits 0-4; digits 5-9)",
            sample_curve(*_halves(emb, ey), shots=shots, repeats=args.repeats))

    if args.omniglot:
        om = load_omniglot(args.omniglot, image_size=16)
        emb, ey = _train_embedder(om, args.epochs)
        _report(f"omniglot-embedding (MLP on 16x16, trained {args.epochs} epochs on {len(om.train_classes)} "
                f"characters; {len(om.test_classes)} held-out characters)",
                sample_curve(*_halves(emb, ey), shots=[1, 2, 3, 5, 10], repeats=args.repeats))


if __name__ == "__main__":
    main()
