"""Contrastive, triplet (hard, semi-hard, all) and TCM forward+backward:
losskit vs pytorch-metric-learning vs the floor of the similarity products.

    PYTHONPATH=src python benchmarks/pair_losses.py                  # one thread and torch's default
    PYTHONPATH=src python benchmarks/pair_losses.py --sizes 1024 4096 16384 --threads 1 0

Contenders (same inputs: B x D normal embeddings; labels: ``B / per_class``
classes of ``per_class`` rows each, shuffled):

* ``floor``: ``S = X X^T`` and its backward with a precomputed ``B x B``
  gradient -- the three ``B x B x D`` matrix products any exact pair loss
  needs (run once per size and thread count, shared by every loss);
* ``losskit``: ``losskit.get(...)`` at its defaults (``contrastive``;
  ``triplet`` with ``mining`` hard / semi-hard / all; ``tcm`` with
  ``base=None``, the regulariser alone).  Above 4M pairs (B > 2048 here)
  they walk row blocks (``losskit.kernels.pair_blocks``); below, the dense
  path;
* ``pml``: PML 2.9 ``ContrastiveLoss()``; ``TripletMarginLoss(0.2,
  LpDistance(power=2))`` with ``BatchHardMiner`` (hard), with
  ``TripletMarginMiner(0.2, 'semihard')`` (semi-hard: PML keeps every
  semi-hard triplet, losskit one per positive pair -- a different selection,
  listed for its cost) and without a miner (all);
  ``ThresholdConsistentMarginLoss()`` (TCM alone).  PML builds ``B x B``
  matrices and index lists of all pairs (all triplets for ``all``), so it
  is skipped above ``--pml-max`` (``--pml-all-max`` for all triplets and
  the semi-hard miner, which both list every triplet): the cells would not
  fit this machine's memory.

Every (threads, B, loss, contender) runs in a fresh subprocess started by
this script: after a small warm-up step (B = 128: one-time library set-up
not counted) the first full-size forward+backward measures memory -- the
peak resident set size (VmHWM, reset through /proc/self/clear_refs just
before the call) minus the resident size right before it, i.e. the extra
memory of one step with the inputs in place; then ``--repeats`` timed steps
give the median time.  ``--tensor-memory`` adds the peak of the bytes held
by tensors allocated during one more step, from torch.profiler's allocation
events (no allocator caching).  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

from _measure import measure_step

CONTENDERS = ("floor", "losskit", "pml")
LOSSES = ("contrastive", "triplet-hard", "triplet-semi-hard", "triplet-all", "tcm")


def _losskit(name: str, chunk):
    import losskit
    from losskit.functional.pair import contrastive_loss, tcm_regularizer, triplet_loss

    if chunk is None:  # the registered modules, as a user calls them
        if name == "contrastive":
            return losskit.get("contrastive")
        if name == "tcm":
            return losskit.get("tcm", base=None)
        return losskit.get("triplet", mining=name.split("-", 1)[1])
    if name == "contrastive":
        return lambda x, y: contrastive_loss(x, y, chunk_size=chunk)
    if name == "tcm":
        return lambda x, y: tcm_regularizer(x, y, chunk_size=chunk)
    return lambda x, y: triplet_loss(x, y, mining=name.split("-", 1)[1], chunk_size=chunk)


def _pml(name: str):
    from pytorch_metric_learning import distances, losses, miners

    if name == "contrastive":
        loss = losses.ContrastiveLoss()
        return lambda x, y: loss(x, y)
    if name == "tcm":
        loss = losses.ThresholdConsistentMarginLoss()
        return lambda x, y: loss(x, y)
    sq = distances.LpDistance(power=2)
    loss = losses.TripletMarginLoss(margin=0.2, distance=sq)
    if name == "triplet-all":
        return lambda x, y: loss(x, y)
    miner = (miners.BatchHardMiner(distance=sq) if name == "triplet-hard"
             else miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard", distance=sq))
    return lambda x, y: loss(x, y, miner(x, y))


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, D = args.batch, args.dim
    x = torch.randn(B, D)
    y = (torch.arange(B) // args.per_class)[torch.randperm(B)]
    if args.contender == "floor":
        G = torch.randn(B, B) / B

        def step(x=x, y=y):
            xx = x.clone().requires_grad_(True)
            (xx @ xx.T).backward(G[: len(x), : len(x)])
            return xx.grad
    else:
        loss = _losskit(args.loss, args.chunk) if args.contender == "losskit" else _pml(args.loss)

        def step(x=x, y=y):
            xx = x.clone().requires_grad_(True)
            loss(xx, y).backward()
            return xx.grad

    step(x[:128], y[:128])  # one-time library set-up outside the measurement
    print(json.dumps(measure_step(step, args.repeats, args.tensor_memory)))


def run_one(contender, loss, B, args, threads):
    if contender == "pml" and (B > args.pml_max or (loss in ("triplet-all", "triplet-semi-hard")
                                                   and B > args.pml_all_max)):
        return {"skip": True}
    cmd = [sys.executable, __file__, "--worker", contender] + (["--loss", loss] if loss else []) + ["--batch", str(B), "--dim",
           str(args.dim), "--per-class", str(args.per_class), "--threads", str(threads),
           "--repeats", str(args.repeats)]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    if args.tensor_memory and B <= args.tensor_memory_max:
        cmd += ["--tensor-memory"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        err = out.stderr.strip().splitlines()
        return {"error": err[-1] if err else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--per-class", type=int, default=4, help="rows per class (default 4: B/4 classes)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                   help="torch thread counts; 0 = torch's default (default: 1 and the default)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after the memory step (0: time that one)")
    p.add_argument("--chunk", type=int, default=None, help="losskit chunk_size (default: automatic)")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--pml-max", type=int, default=8192, help="largest B PML is run at")
    p.add_argument("--pml-all-max", type=int, default=1024,
                   help="largest B PML's all-triplets and semi-hard-miner cells are run at (both list every "
                        "triplet: 30 s and 1.1 GiB at B = 1024 on the build machine)")
    p.add_argument("--tensor-memory", action="store_true", help="also report torch.profiler's tensor peak")
    p.add_argument("--tensor-memory-max", type=int, default=4096, help="largest B with --tensor-memory")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--loss", choices=LOSSES, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        args.contender = args.worker
        worker(args)
        return 0
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    print(f"# Pair losses forward+backward, D={args.dim}, {args.per_class} rows per class")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load}; "
          f"torch {torch.__version__} (default threads {torch.get_num_threads()}), threads "
          f"{', '.join('default' if t == 0 else str(t) for t in args.threads)}, median of {args.repeats} "
          f"after one warm-up")
    print("memory: extra resident memory of one forward+backward (peak RSS - RSS before), inputs in place"
          + ("; tensor peak: torch.profiler allocation events" if args.tensor_memory else "") + "\n")
    tm = args.tensor_memory
    print("| threads | B | loss | floor time | losskit time | losskit / floor | PML time | PML / floor "
          "| floor extra mem | losskit extra mem | PML extra mem |"
          + (" floor tensor peak | losskit tensor peak | PML tensor peak |" if tm else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if tm else ""))
    for threads in args.threads:
        for B in args.sizes:
            floor = run_one("floor", None, B, args, threads) if "floor" in args.contenders else None
            for loss in args.losses:
                r = {"floor": floor}
                for c in args.contenders:
                    if c != "floor":
                        r[c] = run_one(c, loss, B, args, threads)

                def t(c):
                    v = r.get(c)
                    if v is None:
                        return "-"
                    if v.get("skip"):
                        return "not run"
                    return v["error"][:40] if "error" in v else f"{v['median_s']:.3f} s"

                def m(c, key="extra_mib"):
                    v = r.get(c)
                    if v is None or "error" in v or v.get("skip") or v.get(key) is None:
                        return "-"
                    return f"{v[key]:.0f} MiB"

                def ratio(c):
                    a, f = r.get(c), r.get("floor")
                    if not a or not f or "error" in a or "error" in f or a.get("skip"):
                        return "-"
                    return f"{a['median_s'] / f['median_s']:.2f}x"

                th = "default" if threads == 0 else threads
                print(f"| {th} | {B} | {loss} | {t('floor')} | {t('losskit')} | {ratio('losskit')} | {t('pml')} | "
                      f"{ratio('pml')} | {m('floor')} | {m('losskit')} | {m('pml')} |"
                      + (f" {m('floor', 'tensor_mib')} | {m('losskit', 'tensor_mib')} | {m('pml', 'tensor_mib')} |"
                         if tm else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
