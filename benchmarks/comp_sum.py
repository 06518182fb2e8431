"""Comp-sum and sample weighting: forward+backward time as ratios against a
baseline measured in the same process, round-robin (each repetition runs
every contender once, in turn, so machine load hits all of them alike).

Three comparisons (issue 11, item 6):

1. ``logits``: ``comp_sum_loss`` (tau 0, 1.5, 2) on ``[B, C]`` logits
   (default 8192 x 1000) against ``torch.nn.functional.cross_entropy``;
   target: within 1.3x.
2. ``head``: ``MarginHead(head='fused', tau=1.5)`` with ArcFace's margin at
   B 1024, C 100k, D 512 against arcface's fused head (tau 1); target: within 1.2x.
3. ``weighting``: one training step of an MLP classifier (Adam; a small one,
   ~2 ms a step, and a larger one) with cross-entropy, against the same step
   with the loss reweighted by ``linupper``/``quadratic``/``extremes`` (burn-in 0) or GLOW;
   target: under 5% more.  ``weighting-cnn``: the same on the bench's CNN at
   28x28 (B 128, 100 classes), a step size where the target is meaningful.

    python benchmarks/comp_sum.py                       # all three, --threads 1 0
    python benchmarks/comp_sum.py --only logits --reps 20
    python benchmarks/comp_sum.py --quick               # small sizes (a smoke run)

Prints one markdown table per comparison: the median and the minimum
milliseconds per contender and their ratios to the baseline row (on a shared,
loaded machine the minimum is the less contended measure).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _round_robin(steps: dict, reps: int, warmup: int) -> dict[str, tuple[float, float, list[float]]]:
    for _ in range(warmup):
        for f in steps.values():
            f()
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, f in steps.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: (statistics.median(v) * 1e3, min(v) * 1e3, v) for k, v in times.items()}


def _table(title: str, ms: dict, base: str, threads: int) -> None:
    """Median and minimum per contender, their ratios to ``base``, and the median over repetitions of
    the ratio within one repetition (the contenders of a repetition run back to back, so slow drifts of
    the machine's load cancel in it)."""
    print(f"\n{title} (torch threads: {threads})\n")
    print(f"| contender | median ms | ratio of medians to {base} | min ms | ratio of minima | "
          "median of per-repetition ratios |")
    print("|---|---|---|---|---|---|")
    b = ms[base]
    for k, (med, mn, v) in ms.items():
        paired = statistics.median(x / y for x, y in zip(v, b[2]))
        print(f"| {k} | {med:.2f} | {med / b[0]:.3f}x | {mn:.2f} | {mn / b[1]:.3f}x | {paired:.3f}x |")


def bench_logits(B: int, C: int, reps: int, warmup: int) -> dict[str, float]:
    from losskit.functional.comp_sum import comp_sum_loss

    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, C, generator=g).requires_grad_(True)
    y = torch.randint(0, C, (B,), generator=g)

    def make(fn):
        def step():
            z.grad = None
            fn().backward()
        return step

    steps = {"F.cross_entropy": make(lambda: torch.nn.functional.cross_entropy(z, y)),
             "F.cross_entropy none, .mean()": make(lambda: torch.nn.functional.cross_entropy(z, y, reduction="none")
                                                   .mean())}
    for tau in (0.0, 1.0, 1.5, 2.0):
        steps[f"comp-sum tau={tau:g}"] = make(lambda tau=tau: comp_sum_loss(z, y, tau))
    return _round_robin(steps, reps, warmup)


def bench_head(B: int, C: int, D: int, reps: int, warmup: int) -> dict[str, float]:
    from losskit.heads import ArcMargin, MarginHead

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g).requires_grad_(True)
    y = torch.randint(0, C, (B,), generator=g)
    heads = {"arcface fused (tau=1)": MarginHead(C, D, ArcMargin(64.0, 0.5), head="fused")}
    for tau in (1.5, 2.0):
        h = MarginHead(C, D, ArcMargin(64.0, 0.5), head="fused", tau=tau)
        h.weight = heads["arcface fused (tau=1)"].weight
        heads[f"comp-sum fused tau={tau:g}"] = h

    def make(h):
        def step():
            x.grad = None
            h.weight.grad = None
            h(x, y).backward()
        return step

    return _round_robin({k: make(h) for k, h in heads.items()}, reps, warmup)


def _mlp(D: int, hidden: int, C: int):
    def build():
        return torch.nn.Sequential(torch.nn.Linear(D, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                   torch.nn.ReLU(), torch.nn.Linear(hidden, C))
    return build


def _cnn(C: int, dim: int = 128):
    """The bench's CNN embedder (3 conv-BN-ReLU-pool blocks, 32-64-64 channels) and a linear layer."""
    def build():
        from losskit.bench.model import build_model

        return torch.nn.Sequential(build_model("cnn", (1, 28, 28), dim, 0), torch.nn.Linear(dim, C))
    return build


def bench_weighting(reps: int, warmup: int, B: int = 256, shape: tuple = (64,), C: int = 10,
                    build=None) -> dict[str, float]:
    """One Adam step (forward, loss, backward, step, the weighter's step) per contender; each
    contender trains its own copy of the same network on the same batch."""
    import losskit

    build = build or _mlp(shape[0], 256, C)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, *shape, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    ids = torch.arange(B)

    def make(loss_fn, use_ids: bool):
        torch.manual_seed(0)
        net = build()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)

        def step():
            out = loss_fn(net(x), y, sample_ids=ids) if use_ids else loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
            if hasattr(loss_fn, "step"):
                loss_fn.step()
        return step

    glow = losskit.get("reweighted", weighter="glow")
    glow.weighter.epoch = 1   # past GLOW's warm-up epoch, so the weights are computed
    steps = {"cross-entropy": make(losskit.get("cross-entropy"), False)}
    for w in ("linupper", "quadratic", "extremes"):
        steps[f"reweighted {w}"] = make(losskit.get("reweighted", weighter=w, burn_in=0), True)
    steps["reweighted glow"] = make(glow, True)
    return _round_robin(steps, reps, warmup)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="torch threads (0 = torch's default)")
    ap.add_argument("--only", choices=("logits", "head", "weighting", "weighting-cnn"), nargs="+",
                    default=["logits", "head", "weighting", "weighting-cnn"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes")
    args = ap.parse_args(argv)
    default_threads = torch.get_num_threads()
    for th in args.threads:
        torch.set_num_threads(th if th else default_threads)
        n = torch.get_num_threads()
        if "logits" in args.only:
            B, C = (512, 100) if args.quick else (8192, 1000)
            _table(f"comp-sum on [{B}, {C}] logits, forward+backward", bench_logits(B, C, args.reps, args.warmup),
                   "F.cross_entropy", n)
        if "head" in args.only:
            B, C, D = (64, 2000, 32) if args.quick else (1024, 100_000, 512)
            _table(f"fused head B={B} C={C} D={D}, ArcFace margin, forward+backward",
                   bench_head(B, C, D, args.reps, args.warmup), "arcface fused (tau=1)", n)
        if "weighting" in args.only:
            _table("one Adam step of a small MLP classifier (B=256, 64-256-256-10)",
                   bench_weighting(args.reps * 5, args.warmup), "cross-entropy", n)
            if not args.quick:
                _table("one Adam step of a larger MLP classifier (B=1024, 784-1024-1024-100)",
                       bench_weighting(args.reps * 2, args.warmup, B=1024, shape=(784,), C=100,
                                       build=_mlp(784, 1024, 100)), "cross-entropy", n)
        if "weighting-cnn" in args.only:
            B = 16 if args.quick else 128
            _table(f"one Adam step of the bench's CNN classifier (B={B}, 1x28x28, 32-64-64 conv, 100 classes)",
                   bench_weighting(args.reps, args.warmup, B=B, shape=(1, 28, 28), C=100, build=_cnn(100)),
                   "cross-entropy", n)


if __name__ == "__main__":
    main()
