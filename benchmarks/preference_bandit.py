"""Preference optimisation on a synthetic contextual bandit, from scratch, on CPU.

A log-linear softmax policy ``pi(a | x) = softmax_a(x^T W u_a)`` over K
actions with fixed, shared action embeddings ``u_a`` (dimension m < K, like a
token-embedding table, so the gradients of different actions overlap) is
trained from scratch on preference pairs whose labels follow Bradley-Terry on
a hidden reward ``r*(x, a) = x^T W* u_a`` of the same class, with a fraction
``noise`` of the labels flipped.  Methods (all beta = 0.1, same optimiser, steps and data):

* ``dpo``, ``ipo`` (unnormalised: one-token "completions"), ``beta-dpo``
  (alpha 0.6, keep 80%), ``madpo`` (margins from a linear Bradley-Terry reward
  model fitted on the same noisy pairs), ``robust`` (epsilon = the true noise
  rate, an oracle setting), and ``dpo+norm``: DPO's per-pair coefficient with
  the pairwise-normalised gradient (gradient-entanglement mitigation).

Reported: the true expected reward of the trained policy on held-out contexts
(mean +- std over seeds), and gradient-entanglement statistics of the DPO and
``dpo+norm`` policies on held-out pairs, plus how the chosen/rejected
log-probabilities moved on the training pairs.

    PYTHONPATH=src python benchmarks/preference_bandit.py            # full table
    PYTHONPATH=src python benchmarks/preference_bandit.py --quick    # smoke run

Measured run times and results: docs/preference.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import losskit
from losskit.metrics.entanglement import gradient_entanglement, pairwise_normalized_loss, per_pair_grad_norms

METHODS = ["dpo", "ipo", "beta-dpo", "madpo", "robust", "dpo+norm"]


def make_problem(seed: int, n_train: int, n_test: int, d: int, k: int, m: int, noise: float, bt_scale: float):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(k, m, generator=g) / m ** 0.5  # shared action embeddings
    theta = (torch.randn(d, m, generator=g) @ U.T).T  # [K, d]: r*(x, a) = x^T W* u_a
    xs = torch.randn(n_train, d, generator=g)
    a = torch.randint(0, k, (n_train,), generator=g)
    b = (a + torch.randint(1, k, (n_train,), generator=g)) % k  # a different action
    r = (xs @ theta.T)  # [N, K]
    ra, rb = r.gather(1, a[:, None]).squeeze(1), r.gather(1, b[:, None]).squeeze(1)
    a_wins = torch.rand(n_train, generator=g) < torch.sigmoid(bt_scale * (ra - rb))
    flip = torch.rand(n_train, generator=g) < noise
    a_wins = a_wins ^ flip
    w = torch.where(a_wins, a, b)
    l = torch.where(a_wins, b, a)
    x_test = torch.randn(n_test, d, generator=g)
    return U, theta, xs, w, l, x_test


def fit_reward_model(xs, w, l, U, steps=300):
    """Bradley-Terry reward model of the same class, r_phi(x, a) = x^T Phi u_a, on the (noisy) pairs."""
    phi = torch.zeros(xs.shape[1], U.shape[1], requires_grad=True)
    opt = torch.optim.Adam([phi], lr=0.05)
    for _ in range(steps):
        r = xs @ phi @ U.T
        m = r.gather(1, w[:, None]).squeeze(1) - r.gather(1, l[:, None]).squeeze(1)
        loss = -torch.nn.functional.logsigmoid(m).mean() + 1e-3 * phi.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        r = xs @ phi @ U.T
        return r.gather(1, w[:, None]).squeeze(1) - r.gather(1, l[:, None]).squeeze(1)


def logits(W, U, x):
    return x @ W @ U.T


def logp(W, U, x, a):
    return torch.log_softmax(logits(W, U, x), -1).gather(1, a[:, None]).squeeze(1)


def closed_form_norms(W, U, x, w, l):
    # d log pi(a|x) / dW = x (u_a - E_p u)^T  =>  ||g_a|| = ||x|| ||u_a - E_p u||
    with torch.no_grad():
        p = torch.softmax(logits(W, U, x), -1)
        ubar = p @ U
        xn = x.norm(dim=1)
        return (U[w] - ubar).norm(dim=1) * xn, (U[l] - ubar).norm(dim=1) * xn


def train(method, U, xs, w, l, reward_margin, W0, *, beta, noise, epochs, batch, lr, seed):
    W = W0.clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=lr)
    with torch.no_grad():
        ref_w, ref_l = logp(W0, U, xs, w), logp(W0, U, xs, l)
    if method == "robust":
        loss_fn = losskit.get("robust", beta=beta, epsilon=min(noise, 0.45))
    elif method == "dpo+norm":
        loss_fn = None
    else:
        loss_fn = losskit.get(method, beta=beta)
    g = torch.Generator().manual_seed(seed)
    n = xs.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            idx = perm[i:i + batch]
            x, yw, yl = xs[idx], w[idx], l[idx]
            pc, pr = logp(W, U, x, yw), logp(W, U, x, yl)
            if method == "dpo+norm":
                loss = pairwise_normalized_loss(pc, pr, None, ref_w[idx], ref_l[idx], beta=beta,
                                                grad_norms=closed_form_norms(W, U, x, yw, yl))
            elif method == "madpo":
                loss = loss_fn(pc, pr, ref_w[idx], ref_l[idx], reward_margin=reward_margin[idx])
            elif method == "beta-dpo":
                loss = loss_fn(pc, pr, ref_w[idx], ref_l[idx], generator=g)
            else:
                loss = loss_fn(pc, pr, ref_w[idx], ref_l[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return W.detach()


def true_value(W, U, theta, x):
    with torch.no_grad():
        return float((torch.softmax(logits(W, U, x), -1) * (x @ theta.T)).sum(1).mean())


def entanglement(W, U, x, w, l):
    Wp = W.clone().requires_grad_(True)
    st = gradient_entanglement(logp(Wp, U, x, w), logp(Wp, U, x, l), [Wp])
    return st.summary()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.noise, args.epochs, args.n_train = 2, [0.2], 5, 400
    torch.set_num_threads(args.threads)
    d, k, m_emb, beta, batch, lr, bt_scale = 8, 16, 4, 0.1, 64, 0.05, 1.0
    t0 = time.perf_counter()
    results = {(m, nz): [] for m in METHODS for nz in args.noise}
    ref_vals, opt_vals = {nz: [] for nz in args.noise}, {nz: [] for nz in args.noise}
    ent = {(m, nz): [] for m in ("dpo", "dpo+norm") for nz in args.noise}
    moves = {(m, nz): [] for m in ("dpo", "dpo+norm") for nz in args.noise}
    checked_norms = False
    for nz in args.noise:
        for s in range(args.seeds):
            U, theta, xs, w, l, x_test = make_problem(s, args.n_train, 2000, d, k, m_emb, nz, bt_scale)
            W0 = 0.1 * torch.randn(d, m_emb, generator=torch.Generator().manual_seed(100 + s))  # the reference
            rm = fit_reward_model(xs, w, l, U)
            ref_vals[nz].append(true_value(W0, U, theta, x_test))
            opt_vals[nz].append(float((x_test @ theta.T).max(1).values.mean()))
            if not checked_norms:  # the closed-form norms equal the library's autograd norms
                Wp = W0.clone().requires_grad_(True)
                a, b = per_pair_grad_norms(logp(Wp, U, xs[:16], w[:16]), logp(Wp, U, xs[:16], l[:16]), [Wp])
                c, e = closed_form_norms(W0, U, xs[:16], w[:16], l[:16])
                torch.testing.assert_close((a, b), (c, e), rtol=1e-5, atol=1e-6)
                checked_norms = True
            for m in METHODS:
                W = train(m, U, xs, w, l, rm, W0, beta=beta, noise=nz, epochs=args.epochs, batch=batch, lr=lr,
                          seed=s)
                results[(m, nz)].append(true_value(W, U, theta, x_test))
                if m in ("dpo", "dpo+norm"):
                    ent[(m, nz)].append(entanglement(W, U, xs[:200], w[:200], l[:200]))
                    with torch.no_grad():
                        dw = logp(W, U, xs, w) - logp(W0, U, xs, w)
                        dl = logp(W, U, xs, l) - logp(W0, U, xs, l)
                    moves[(m, nz)].append((float(dw.mean()), float(dl.mean()), float((dw > 0).double().mean())))
    elapsed = time.perf_counter() - t0

    def ms(v):
        t = torch.tensor(v, dtype=torch.float64)
        return f"{float(t.mean()):.3f} ± {float(t.std()) if len(v) > 1 else 0.0:.3f}"

    print(f"# Preference bandit (d={d}, K={k}, action embeddings m={m_emb}, {args.n_train} pairs, {args.epochs} epochs, batch {batch}, Adam lr {lr}, "
          f"beta {beta}, {args.seeds} seeds; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{platform.machine()}; {elapsed:.0f} s)\n")
    print("True expected reward on held-out contexts (mean ± std over seeds; higher is better)\n")
    print("| method | " + " | ".join(f"noise {nz:.1f}" for nz in args.noise) + " |")
    print("|---|" + "---|" * len(args.noise))
    print("| reference policy | " + " | ".join(ms(ref_vals[nz]) for nz in args.noise) + " |")
    for m in METHODS:
        print(f"| {m} | " + " | ".join(ms(results[(m, nz)]) for nz in args.noise) + " |")
    print("| oracle (argmax r*) | " + " | ".join(ms(opt_vals[nz]) for nz in args.noise) + " |")
    print("\nPaired difference to DPO on the same problem and seed (mean ± std over seeds; > 0: better than DPO)\n")
    print("| method | " + " | ".join(f"noise {nz:.1f}" for nz in args.noise) + " |")
    print("|---|" + "---|" * len(args.noise))
    for m in METHODS:
        if m == "dpo":
            continue
        cells = []
        for nz in args.noise:
            diff = [a - b for a, b in zip(results[(m, nz)], results[("dpo", nz)])]
            wins = sum(x > 0 for x in diff)
            cells.append(f"{ms(diff)} ({wins}/{len(diff)} seeds > 0)")
        print(f"| {m} | " + " | ".join(cells) + " |")
    print("\nGradient entanglement after training (200 training pairs; ratio = <g_w,g_l>/min(|g_w|^2,|g_l|^2)) "
          "and log-prob movement from the reference over all training pairs\n")
    print("| objective | noise | cosine | ratio median | frac ratio>1 | frac chosen rises (1 step) | "
          "mean Δlog pi(y_w) | mean Δlog pi(y_l) | frac Δlog pi(y_w)>0 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in ("dpo", "dpo+norm"):
        for nz in args.noise:
            e = ent[(m, nz)]
            mv = moves[(m, nz)]

            def avg(key):
                return sum(x[key] for x in e) / len(e)

            print(f"| {m} | {nz:.1f} | {avg('cosine_mean'):.3f} | {avg('ratio_median'):.3f} | "
                  f"{avg('frac_ratio_gt_1'):.3f} | {avg('frac_chosen_rises'):.3f} | "
                  f"{sum(x[0] for x in mv) / len(mv):.2f} | {sum(x[1] for x in mv) / len(mv):.2f} | "
                  f"{sum(x[2] for x in mv) / len(mv):.3f} |")


if __name__ == "__main__":
    main()
