"""The infinite-compute recipe at CPU size: a character-level MLP on the stdlib-docstring corpus.

    PYTHONPATH=src python benchmarks/infinite_compute_text.py [--sizes 5000 10000 20000 40000] [--plots docs/img]

1. For each training size N (characters): the *standard* recipe (weight decay
   fixed at 0.1, neighbour search over lr and epochs) and the *regularised*
   one (neighbour search over lr, weight decay and epochs); validation loss
   (nats/char) of the certified point; power-law fits L(N) = A/N^alpha + E
   with 95% bootstrap intervals: the asymptotes E.
2. At one size, ensembles of K = 1..K_max members (2x the epochs, 1/2 the
   weight decay of the regularised best; logits averaged); fit L(K): the
   ensemble asymptote.
3. Distillation of the K_max ensemble into an 8x smaller student, trained on
   0.9 teacher-sampled / 0.1 real windows, against the same student trained on
   real data alone; the share of the ensemble's gain it keeps.
One thread; every number is measured here.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import nn

from losskit.data.text import char_corpus
from losskit.recipes.infinite_compute import (ensemble_logits, fit_power_law, gain_kept, member_hparams,
                                              neighbour_search, run_ensemble_distillation, sample_autoregressive)

CTX = 8


class CharMLP(nn.Module):
    def __init__(self, vocab: int, hidden: int, emb: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(CTX * emb, hidden), nn.ReLU(), nn.Linear(hidden, vocab))

    def forward(self, x):
        return self.net(self.emb(x))


def windows(ids: torch.Tensor):
    w = ids.unfold(0, CTX + 1, 1)
    return w[:, :CTX].contiguous(), w[:, CTX].contiguous()


def train(model, x, y, *, lr, weight_decay, epochs, batch_size=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for s in range(0, x.shape[0], batch_size):
            b = perm[s:s + batch_size]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


def val_loss(logits_or_model, xv, yv):
    with torch.no_grad():
        z = logits_or_model(xv) if callable(logits_or_model) else logits_or_model
        return float(nn.functional.cross_entropy(z, yv))


def report_searches(a, table, grids, fits) -> None:
    print()
    print("| N (chars) | standard: val loss | standard: best (lr, wd, epochs) | regularised: val loss | "
          "regularised: best (lr, wd, epochs) | certified (std / reg) | runs (std / reg) |")
    print("|---|---|---|---|---|---|---|")
    for n in a.sizes:
        s, r = table[("standard", n)], table[("regularised", n)]
        fmt = lambda b: f"{b['lr']:g}, {b['weight_decay']:g}, {b['epochs']}"
        print(f"| {n} | {s.value:.4f} | {fmt(s.best)} | {r.value:.4f} | {fmt(r.best)} | "
              f"{s.certified} / {r.certified} | {s.num_evaluations} / {r.num_evaluations} |")
    print()
    print("| fit | A | alpha | E (asymptote) | 95% bootstrap interval of E | points |")
    print("|---|---|---|---|---|---|")
    for name in grids:
        ns = torch.tensor(a.sizes, dtype=torch.float64)
        ls = torch.tensor([table[(name, n)].value for n in a.sizes], dtype=torch.float64)
        f = fit_power_law(ns, ls, bootstrap=500)
        fits[name] = (ns, ls, f)
        print(f"| L(N), {name} | {f.A:.4g} | {f.alpha:.3f} | {f.E:.4f} | [{f.intervals['E'][0]:.4f}, "
              f"{f.intervals['E'][1]:.4f}] | {f.n_points} |")



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000, 40000])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ensemble-size", type=int, default=10000)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--val", type=int, default=20000)
    ap.add_argument("--plots", default=None)
    ap.add_argument("--synthetic-factor", type=int, default=2,
                    help="teacher-sampled windows per real training window")
    ap.add_argument("--member-rule", choices=["paper", "same"], default="paper",
                    help="members: 2x epochs and 1/2 weight decay of the best single (paper) or its own (same)")
    ap.add_argument("--best", default=None,
                    help="lr,weight_decay,epochs: skip the searches and fits; ensembles and distillation only")
    a = ap.parse_args()
    torch.set_num_threads(1)
    corpus = char_corpus()
    V = corpus.vocab_size
    xv, yv = windows(corpus.val[:a.val + CTX])
    teacher_params = sum(p.numel() for p in CharMLP(V, a.hidden).parameters())
    print(f"# corpus: stdlib docstrings on Python {corpus.python}, {len(corpus.train)} train / {len(corpus.val)} "
          f"val characters, vocabulary {V}; model: {CTX}-character window MLP, hidden {a.hidden} "
          f"({teacher_params} parameters); validation {xv.shape[0]} windows")
    grids = {
        "standard": {"lr": (1e-3, 3e-3, 1e-2), "weight_decay": (0.1,), "epochs": (1, 2, 4, 8, 16)},
        "regularised": {"lr": (1e-3, 3e-3, 1e-2), "weight_decay": (0.0, 0.1, 0.4, 1.6, 3.2, 6.4),
                        "epochs": (1, 2, 4, 8, 16)},
    }
    start = {"lr": 3e-3, "weight_decay": 0.1, "epochs": 4}
    table = {}
    best_at = {}
    fits = {}
    sizes = a.sizes
    if a.best is not None:
        lr_, wd_, ep_ = a.best.split(",")
        best_at[("regularised", a.ensemble_size)] = {"lr": float(lr_), "weight_decay": float(wd_), "epochs": int(ep_)}
        sizes = []
    for n in sizes:
        x, y = windows(corpus.train[:n + CTX])
        for name, grid in grids.items():
            def evaluate(hp, x=x, y=y):
                torch.manual_seed(0)
                return val_loss(train(CharMLP(V, a.hidden), x, y, **hp), xv, yv)

            r = neighbour_search(evaluate, grid, start, max_evaluations=40)
            table[(name, n)] = r
            best_at[(name, n)] = r.best
            print(f"# N={n} {name}: {r.best} -> {r.value:.4f} nats/char, certified {r.certified}, "
                  f"edge {r.at_edge}, {r.num_evaluations} runs, {r.seconds:.0f} s", flush=True)
    if sizes:
        report_searches(a, table, grids, fits)

    # ensembles at one size
    n = a.ensemble_size
    x, y = windows(corpus.train[:n + CTX])
    best = best_at.get(("regularised", n)) or table[("regularised", a.sizes[0])].best
    hp = member_hparams(best) if a.member_rule == "paper" else dict(best)
    t0 = time.perf_counter()
    members = []
    for k in range(a.members):
        torch.manual_seed(100 + k)
        members.append(train(CharMLP(V, a.hidden), x, y, seed=100 + k, **hp))
    t_members = time.perf_counter() - t0
    with torch.no_grad():
        member_logits = torch.stack([m(xv) for m in members])
    ks = list(range(1, a.members + 1))
    ens = [val_loss(ensemble_logits(member_logits[:k]), xv, yv) for k in ks]
    fk = fit_power_law(ks, ens, bootstrap=500)
    if ("regularised", n) in table:
        single = table[("regularised", n)].value
    else:  # the regularised best, retrained with the search's seed
        torch.manual_seed(0)
        single = val_loss(train(CharMLP(V, a.hidden), x, y, **best), xv, yv)
    print()
    rule = "2x epochs, 1/2 weight decay of" if a.member_rule == "paper" else "the hyperparameters of"
    print(f"# ensembles at N={n}: members {hp} ({rule} the regularised best), "
          f"{t_members:.0f} s for {a.members} members")
    print("| K members | ensemble val loss |")
    print("|---|---|")
    for k, v in zip(ks, ens):
        print(f"| {k} | {v:.4f} |")
    print(f"| fit L(K) = A/K^alpha + E | A {fk.A:.4g}, alpha {fk.alpha:.3f}, E {fk.E:.4f} "
          f"[{fk.intervals['E'][0]:.4f}, {fk.intervals['E'][1]:.4f}] |")

    # distillation into an 8x smaller student
    small = max(8, a.hidden // 8)
    student_params = sum(p.numel() for p in CharMLP(V, small).parameters())
    g = torch.Generator().manual_seed(0)
    prompts = x[torch.randint(x.shape[0], (256,), generator=g)]
    teacher = lambda w: ensemble_logits(members, w)
    t0 = time.perf_counter()
    seq = sample_autoregressive(teacher, prompts, max(1, (a.synthetic_factor * n) // 256), context=CTX,
                               generator=g)
    t_sample = time.perf_counter() - t0
    syn = seq.unfold(1, CTX + 1, 1).reshape(-1, CTX + 1)  # every target is a generated character
    xs, ys = syn[:, :CTX].contiguous(), syn[:, CTX].contiguous()
    student_hp = dict(lr=best["lr"], weight_decay=best["weight_decay"], epochs=best["epochs"])
    torch.manual_seed(7)
    plain_student = train(CharMLP(V, small), x, y, seed=7, **student_hp)
    l_plain = val_loss(plain_student, xv, yv)
    torch.manual_seed(7)
    st = CharMLP(V, small)
    log = run_ensemble_distillation(st, (x, y), (xs, ys), mix=0.9, epochs=best["epochs"], lr=best["lr"],
                                    weight_decay=best["weight_decay"], seed=7)
    l_dist = val_loss(st, xv, yv)
    l_ens = ens[-1]
    print()
    print(f"# distillation at N={n}: student hidden {small} ({student_params} parameters, "
          f"{teacher_params / student_params:.1f}x smaller); {xs.shape[0]} teacher-sampled windows "
          f"({t_sample:.0f} s to sample), mix 0.9, {log.steps} steps, {log.seconds:.0f} s")
    print("| model | val loss (nats/char) |")
    print("|---|---|")
    print(f"| regularised single (teacher size) | {single:.4f} |")
    print(f"| ensemble of {a.members} | {l_ens:.4f} |")
    print(f"| student, real data only | {l_plain:.4f} |")
    print(f"| student, distilled | {l_dist:.4f} |")
    if single > l_ens:
        kept = gain_kept(single, l_ens, l_dist)
        print(f"| share of the ensemble's gain kept by the distilled student | {kept:.2f} |")

    if a.plots and fits:
        import os

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(a.plots, exist_ok=True)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, (ns, ls, f) in fits.items():
            grid = torch.logspace(math.log10(ns.min()), math.log10(ns.max() * 8), 50, dtype=torch.float64)
            axes[0].scatter(ns, ls, label=f"{name} (measured)")
            axes[0].plot(grid, f.predict(grid), label=f"{name}: E={f.E:.3f}")
            axes[0].axhline(f.E, ls=":", lw=0.8)
        axes[0].set_xscale("log")
        axes[0].set_xlabel("training characters N")
        axes[0].set_ylabel("validation loss (nats/char)")
        axes[0].legend(fontsize=7)
        kg = torch.linspace(1, a.members * 4, 50, dtype=torch.float64)
        axes[1].scatter(ks, ens, label="ensemble (measured)")
        axes[1].plot(kg, fk.predict(kg), label=f"fit: E={fk.E:.3f}")
        axes[1].axhline(fk.E, ls=":", lw=0.8)
        axes[1].set_xlabel("members K")
        axes[1].legend(fontsize=7)
        fig.suptitle("power-law fits L = A / x^alpha + E (char MLP on stdlib docstrings)")
        fig.tight_layout()
        fig.savefig(os.path.join(a.plots, "infinite_compute_fits.png"), dpi=80)
        print(f"# plot in {a.plots}/infinite_compute_fits.png")
    print(f"# python {sys.version.split()[0]}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
