"""Multi-Similarity forward+backward: losskit vs pytorch-metric-learning vs the floor.

    PYTHONPATH=src python benchmarks/multi_similarity.py              # one thread and torch's default
    PYTHONPATH=src python benchmarks/multi_similarity.py --threads 1

Contenders (same inputs: B x D normal embeddings, labels = a random
permutation of ``arange(B) % classes``; hparams alpha 2, beta 50, lambda 0.5,
epsilon 0.1, which PML uses too):

* ``floor``: ``S = X X^T`` and its backward with a precomputed ``B x B``
  gradient -- the three ``B x B x D`` matrix products any exact pair loss needs;
* ``losskit``: ``losskit.get("multi-similarity", lam=0.5)`` (mining included);
* ``pml``: PML 2.9 ``MultiSimilarityLoss(2, 50, 0.5)`` with ``MultiSimilarityMiner(0.1)``.

Every (allocator setting, B, contender) runs in a fresh subprocess started
by this script (one run): after a small warm-up step (B = 128, so that one-time library
set-up is not counted), the first full-size forward+backward measures peak
memory -- the peak resident set size (VmHWM, reset through /proc/self/clear_refs
just before the call) minus the resident size right before it, i.e. the
extra memory of one step with inputs already in place; then ``--repeats``
timed steps give the median time.  Allocator settings: glibc defaults, and
``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736``
(keep freed memory instead of mapping fresh pages for each temporary).
With ``--tensor-memory`` one more step runs under torch.profiler and the
peak of the bytes held by tensors allocated during it is reported too
(exact tensor memory, without allocator caching or fragmentation).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

from _measure import measure_step

KEEP_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
CONTENDERS = ("floor", "losskit", "pml")


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, D = args.batch, args.dim
    x = torch.randn(B, D)
    y = (torch.arange(B) % args.classes)[torch.randperm(B)]
    if args.contender == "floor":
        G = torch.randn(B, B) / B

        def step(x=x, y=y):
            xx = x.clone().requires_grad_(True)
            (xx @ xx.T).backward(G[: len(x), : len(x)])
            return xx.grad
    elif args.contender == "losskit":
        import losskit

        loss = losskit.get("multi-similarity", lam=0.5, chunk_size=args.chunk)

        def step(x=x, y=y):
            xx = x.clone().requires_grad_(True)
            loss(xx, y).backward()
            return xx.grad
    else:
        from pytorch_metric_learning import losses, miners

        loss = losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
        miner = miners.MultiSimilarityMiner(epsilon=0.1)

        def step(x=x, y=y):
            xx = x.clone().requires_grad_(True)
            loss(xx, y, miner(xx, y)).backward()
            return xx.grad

    step(x[:128], y[:128])  # one-time library set-up (thread pools, GEMM buffers) outside the measurement
    print(json.dumps(measure_step(step, args.repeats, args.tensor_memory)))


def run_one(contender, B, args, env_extra, threads):
    env = dict(os.environ)
    for k in KEEP_MEMORY:
        env.pop(k, None)
    env.update(env_extra)
    cmd = [sys.executable, __file__, "--worker", contender, "--batch", str(B), "--dim", str(args.dim),
           "--classes", str(args.classes), "--threads", str(threads), "--repeats", str(args.repeats)]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    if args.tensor_memory:
        cmd += ["--tensor-memory"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                   help="torch thread counts to run at; 0 = torch's default (default: 1 and the default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=None, help="losskit chunk_size (default: automatic)")
    p.add_argument("--allocator", choices=["default", "keep", "both"], default="both")
    p.add_argument("--tensor-memory", action="store_true",
                   help="also report the tensor peak of one step from torch.profiler allocation events")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        args.contender = args.worker
        worker(args)
        return 0
    import torch

    settings = {"default": {}, "keep": KEEP_MEMORY}
    chosen = ["default", "keep"] if args.allocator == "both" else [args.allocator]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    print(f"# Multi-Similarity forward+backward, D={args.dim}, {args.classes} classes")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load}; "
          f"torch {torch.__version__} (default threads {torch.get_num_threads()}), threads "
          f"{', '.join('default' if t == 0 else str(t) for t in args.threads)}, median of {args.repeats} after one warm-up")
    print("memory: extra resident memory of one forward+backward (peak RSS - RSS before), inputs in place\n")
    tcols = " floor tensor peak | losskit tensor peak | PML tensor peak |" if args.tensor_memory else ""
    print("| threads | allocator | B | floor time | losskit time | losskit / floor | PML time | PML / floor "
          "| floor extra mem | losskit extra mem | PML extra mem |" + tcols)
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.tensor_memory else ""))
    for threads, name, B in ((th, n, b) for th in args.threads for n in chosen for b in args.sizes):
        r = {c: run_one(c, B, args, settings[name], threads) for c in args.contenders}

        def t(c):
            v = r.get(c)
            return "-" if v is None else (v.get("error", "")[:40] if "error" in v else f"{v['median_s']:.3f} s")

        def m(c):
            v = r.get(c)
            return "-" if v is None or "error" in v else f"{v['extra_mib']:.0f} MiB"

        def tm(c):
            v = r.get(c)
            return "-" if v is None or "error" in v or v.get("tensor_mib") is None else f"{v['tensor_mib']:.0f} MiB"

        def ratio(c):
            a, f = r.get(c), r.get("floor")
            if not a or not f or "error" in a or "error" in f:
                return "-"
            return f"{a['median_s'] / f['median_s']:.2f}x"

        label = "glibc default" if name == "default" else "MALLOC_* keep"
        th = "default" if threads == 0 else threads
        print(f"| {th} | {label} | {B} | {t('floor')} | {t('losskit')} | {ratio('losskit')} | {t('pml')} | "
              f"{ratio('pml')} | {m('floor')} | {m('losskit')} | {m('pml')} |"
              + (f" {tm('floor')} | {tm('losskit')} | {tm('pml')} |" if args.tensor_memory else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
