"""AST against MTT and a random real subset on 8x8 digits; memory against unrolled steps.

    PYTHONPATH=src python benchmarks/ast_digits.py [--seeds 3] [--iterations 200] [--plots docs/img]

For ipc in {1, 10}: accuracy on held-out digits of a fresh ConvNet trained on
(a) a random real subset of ipc images per class, (b) MTT's synthetic set
(plain experts, random real init, no AST addition), (c) AST's (smooth
experts, all additions).  A fresh network is trained on a synthetic set the
way the distillation's inner loop trains (learnt step; AST with momentum 0.9,
MTT without); the real subset with plain SGD at the experts' 0.5; seed s
draws the real subset, the distillation's randomness and the evaluation
network's initialisation.  Then the bytes autograd saves for one matching
iteration against ``syn_steps`` (the method's known cost: the unrolled
graph).  One thread.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from losskit.recipes.distillation import ParamLayout, evaluate_synthetic, run_ast, run_mtt, train_expert


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10))


def load():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1300], perm[1300:]
    mean, std = x[tr].mean(), x[tr].std()  # standardised with the training statistics
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


def saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--expert-epochs-total", type=int, default=12)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--syn-steps", type=int, default=10)
    ap.add_argument("--lr-img", type=float, default=3.0)
    ap.add_argument("--lr-lr", type=float, default=1e-5)
    ap.add_argument("--plots", default=None)
    ap.add_argument("--init-only", action="store_true",
                    help="only score AST's representative initialisation without any matching (an ablation)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    x, y, xt, yt = load()
    ek = dict(epochs=a.expert_epochs_total, lr=0.5, batch_size=128)
    t0 = time.perf_counter()
    smooth = [train_expert(convnet(100 + s), x, y, seed=s, **ek) for s in range(a.experts)]
    t_smooth = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = [train_expert(convnet(100 + s), x, y, seed=s, clipping=False, gradient_penalty=0.0, **ek)
             for s in range(a.experts)]
    t_plain = time.perf_counter() - t0
    final = convnet()
    lay = ParamLayout.of(final)
    torch.nn.utils.vector_to_parameters(smooth[0][-1], final.parameters())
    with torch.no_grad():
        acc_s = float((final(xt).argmax(1) == yt).float().mean())
    print(f"# digits 8x8: 1300 train / {len(yt)} test; ConvNet {lay.numel} parameters; {a.experts} experts x "
          f"{a.expert_epochs_total} epochs (SGD lr 0.5, batch 128): smooth {t_smooth:.1f} s (final test acc "
          f"{acc_s:.3f}), plain {t_plain:.1f} s")
    # the inner step: the experts' 0.5 for MTT's plain SGD; 0.05 = 0.5 (1 - 0.9) under AST's momentum 0.9
    common = dict(iterations=a.iterations, syn_steps=a.syn_steps, expert_epochs=2, max_start_epoch=8,
                  lr_img=a.lr_img, lr_lr=a.lr_lr)
    if a.init_only:
        from losskit.recipes.distillation import representative_init

        print("| ipc | representative init only: test accuracy per seed (AST's evaluation: lr 0.05, momentum 0.9) |")
        print("|---|---|")
        for ipc in (1, 10):
            accs = []
            for seed in range(a.seeds):
                idx = representative_init(final, x, y, ipc, 10, seed=seed)
                accs.append(evaluate_synthetic(lambda: convnet(1000 + seed), x[idx], y[idx], xt, yt, lr=0.05,
                                               momentum=0.9, seed=seed))
            print(f"| {ipc} | {', '.join(f'{v:.3f}' for v in accs)} (mean {statistics.mean(accs):.3f}) |")
        return
    results: dict[tuple[int, str], list[float]] = {}
    secs: dict[tuple[int, str], list[float]] = {}
    shown = {}
    for ipc in (1, 10):
        for seed in range(a.seeds):
            g = torch.Generator().manual_seed(seed)
            idx = torch.cat([(y == c).nonzero().flatten()[torch.randperm(int((y == c).sum()), generator=g)[:ipc]]
                             for c in range(10)])
            acc = evaluate_synthetic(lambda: convnet(1000 + seed), x[idx], y[idx], xt, yt, lr=0.5, momentum=0.0,
                                     seed=seed)
            results.setdefault((ipc, "random real"), []).append(acc)
            secs.setdefault((ipc, "random real"), []).append(0.0)
            for name, fn, trajs, kw, mom in (
                    ("mtt", run_mtt, plain, dict(lr_init=0.5), 0.0),
                    ("ast", run_ast, smooth, dict(lr_init=0.05, init_model=final), 0.9)):
                t1 = time.perf_counter()
                try:
                    res = fn(convnet(), trajs, x, y, ipc=ipc, seed=seed, **kw, **common)
                except FloatingPointError as e:  # reported, not hidden: the run counts as diverged
                    print(f"# ipc {ipc} seed {seed} {name}: {e}", flush=True)
                    results.setdefault((ipc, name), []).append(float("nan"))
                    secs.setdefault((ipc, name), []).append(time.perf_counter() - t1)
                    continue
                results.setdefault((ipc, name), []).append(
                    evaluate_synthetic(lambda: convnet(1000 + seed), res.images, res.labels, xt, yt, lr=res.lr,
                                       momentum=mom, seed=seed))
                secs.setdefault((ipc, name), []).append(res.seconds)
                if (ipc, name) not in shown:
                    shown[(ipc, name)] = res.images
                print(f"# ipc {ipc} seed {seed}: {name} {results[(ipc, name)][-1]:.3f} (learnt lr {res.lr:.4f}); "
                      f"random real {acc:.3f}", flush=True)
    print()
    print("| ipc | method | test accuracy (mean ± sd over seeds) | per seed | distillation s |")
    print("|---|---|---|---|---|")
    for (ipc, name), accs in results.items():
        ok = [v for v in accs if v == v]
        sd = statistics.stdev(ok) if len(ok) > 1 else 0.0
        mean = f"{statistics.mean(ok):.3f} ± {sd:.3f}" if ok else "diverged"
        if len(ok) < len(accs):
            mean += f" ({len(accs) - len(ok)} of {len(accs)} diverged)"
        print(f"| {ipc} | {name} | {mean} | {', '.join('diverged' if v != v else f'{v:.3f}' for v in accs)} | "
              f"{statistics.mean(secs[(ipc, name)]):.1f} |")

    print()
    print("| syn_steps | saved for backward (MiB) | ratio to 5 steps | s / iteration |")
    print("|---|---|---|---|")
    base = None
    for steps in (5, 10, 20, 40):
        kw = dict(common, iterations=1, syn_steps=steps, lr_init=0.05)

        def one():
            run_ast(convnet(), smooth, x, y, ipc=10, seed=0, init_model=final, **kw)

        t1 = time.perf_counter()
        b = saved_bytes(one)
        dt = time.perf_counter() - t1
        base = base or b
        print(f"| {steps} | {b / 2**20:.2f} | {b / base:.2f} | {dt:.2f} |")

    if a.plots:
        import os

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(a.plots, exist_ok=True)
        for ipc in (1, 10):
            fig, axes = plt.subplots(2 if ipc == 1 else ipc, 10 if ipc == 1 else 20,
                                     figsize=(10, 2.4) if ipc == 1 else (14, 7.5))
            axes = axes.reshape(-1, axes.shape[-1])
            for col, name in enumerate(("mtt", "ast")):
                if (ipc, name) not in shown:  # every seed diverged
                    continue
                imgs = shown[(ipc, name)]
                for k in range(imgs.shape[0]):
                    c, j = divmod(k, ipc)
                    ax = axes[col, c] if ipc == 1 else axes[j, c + 10 * col]
                    ax.imshow(imgs[k, 0].numpy(), cmap="gray")
            for ax in axes.flat:
                ax.set_xticks([])
                ax.set_yticks([])
            fig.suptitle(f"synthetic digits, {ipc} per class: MTT (left/top) and AST (right/bottom), seed 0")
            fig.tight_layout()
            fig.savefig(os.path.join(a.plots, f"ast_digits_ipc{ipc}.png"), dpi=80)
            plt.close(fig)
        print(f"# plots in {a.plots}")


if __name__ == "__main__":
    main()
