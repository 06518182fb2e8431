"""Deep-unfolded ISTA/IHT: supervised (MSE) against unsupervised (objective) training.

Setup (the issue's suggestion; the paper's own sizes were not in the text we
could read): N 256, M 128, A Gaussian with variance 1/M, x* Bernoulli-Gaussian
with p 0.1, SNR 30 dB, T 16 layers, lam 0.02; Adam lr 1e-2, 1000 batches of 64,
end to end; test on 500 fresh signals.  Mismatch: the same trained networks
tested at p 0.2 and at SNR 15 dB.

    PYTHONPATH=src python experiments/unfolded_sparse.py [--seeds 3] [--plot docs/img/unfolded.png]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from losskit.functional.sparse import nmse
from losskit.recipes.unfolded import SparseProblem, UnfoldedIHT, UnfoldedISTA, train_unfolded

LAYERS_SHOWN = (1, 2, 4, 8, 16)


def per_layer(model, y, x):
    with torch.no_grad():
        xs = model(y, trace=True)
        return ([float(10 * torch.log10(nmse(xt, x))) for xt in xs],
                [float(model.objective_value(xt, y).mean()) for xt in xs])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--lam", type=float, default=0.02)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res: dict = {}
    for seed in range(args.seeds):
        pb = SparseProblem(seed=seed)
        tests = {"matched": pb.with_conditions(seed=1000 + seed), "p 0.2": pb.with_conditions(p=0.2, seed=2000 + seed),
                 "15 dB": pb.with_conditions(snr_db=15.0, seed=3000 + seed)}
        data = {k: t.sample(500) for k, t in tests.items()}
        for cls in (UnfoldedISTA, UnfoldedIHT):
            algo = cls.__name__.replace("Unfolded", "")
            ref = cls(pb.a, lam=args.lam, layers=1000)
            y, x = data["matched"]
            n_ref, o_ref = per_layer(ref, y, x)
            res.setdefault((algo, "plain 1000 it"), []).append({"matched": (n_ref[-1], o_ref[-1])})
            for loss in ("plain", "supervised", "unsupervised"):
                torch.manual_seed(seed)
                m = cls(pb.a, lam=args.lam, layers=16)
                if loss != "plain":
                    train_unfolded(m, pb, loss=loss, iterations=args.iterations, batch_size=64, lr=1e-2)
                row = {}
                for k, (y, x) in data.items():
                    n, o = per_layer(m, y, x)
                    row[k] = (n[-1], o[-1])
                    if k == "matched":
                        row["curve"] = (n, o)
                res.setdefault((algo, loss), []).append(row)
    print(f"NMSE (dB) and objective after T = 16 layers, mean +- sd over {args.seeds} seeds")
    print("| algorithm | training | NMSE matched | objective matched | NMSE test p 0.2 | NMSE test 15 dB |")
    print("|---|---|---|---|---|---|")
    for (algo, loss), rows in res.items():
        def ms(key, i):
            v = [r[key][i] for r in rows if key in r]
            return f"{np.mean(v):.2f} +- {np.std(v):.2f}" if v else ""
        print(f"| {algo} | {loss} | {ms('matched', 0)} | {ms('matched', 1)} | {ms('p 0.2', 0)} | {ms('15 dB', 0)} |")
    for idx, (what, fmt) in enumerate((("NMSE (dB)", ".2f"), ("objective", ".3f"))):
        print(f"\nper-layer {what}, matched test, mean over seeds")
        print("| algorithm | training | " + " | ".join(f"layer {t}" for t in LAYERS_SHOWN) + " |")
        print("|---|---|" + "---|" * len(LAYERS_SHOWN))
        for (algo, loss), rows in res.items():
            if "curve" not in rows[0]:
                continue
            curves = np.mean([r["curve"][idx] for r in rows], 0)
            print(f"| {algo} | {loss} | " + " | ".join(f"{curves[t - 1]:{fmt}}" for t in LAYERS_SHOWN) + " |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for (algo, loss), rows in res.items():
            if "curve" not in rows[0]:
                continue
            for i, ax in enumerate(axes):
                ax.plot(range(1, 17), np.mean([r["curve"][i] for r in rows], 0), marker=".",
                        ls="-" if algo == "ISTA" else "--", label=f"{algo} {loss}")
        axes[0].set(xlabel="layer t", ylabel="NMSE (dB)", title="NMSE per layer (matched test)")
        axes[1].set(xlabel="layer t", ylabel="objective", title="objective per layer", yscale="log")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
