"""Symmetric InfoNCE (CLIP) forward+backward: losskit's chunked kernel vs a plain dense
implementation vs the floor, all in one process and one run.

    PYTHONPATH=src python benchmarks/info_nce.py                   # B 8192, D 512, --threads 1 0
    PYTHONPATH=src python benchmarks/info_nce.py --batch 4096 --threads 1

Contenders (same normalised ``a``, ``b`` ``[B, D]``, learnable logit scale):

* ``floor``: ``Z = a b^T`` and its backward with a precomputed ``B x B`` gradient -- the
  three ``B x B x D`` similarity products any exact implementation needs;
* ``dense``: ``logits = s a b^T``, ``(CE(logits, arange) + CE(logits^T, arange)) / 2``
  through autograd (open_clip's ClipLoss without gathering);
* ``losskit[chunk=C]``: ``losskit.functional.info_nce_loss(..., chunk_size=C)`` with its defaults
  (``normalize=True``: the one-``exp2`` fixed-reference path); ``auto`` is the default
  (``None``: C = 4M / B rows per block);
* ``losskit[online]`` (``--online``): the same call under ``losskit.tensor_checks(False)``, where the
  kernel may not read the scale on the host and takes the online-maximum path (as it does for a
  scale above 40 in float32).

Time: the median of ``--repeats`` steps after one warm-up step, timed in rounds (each round
runs every contender once, so that a change of machine load hits every contender alike).  Memory: the peak of the bytes
held by tensors allocated during one step (torch.profiler's allocation events; the inputs are
allocated before), i.e. the extra memory of a step.  Ratios are against ``floor`` measured in the
same run at the same thread count.  Prints a markdown table per thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _measure import tensor_peak_mib


def contenders(a, b, chunks, online=False):
    import losskit
    from losskit.functional.contrastive import info_nce_loss

    B = a.shape[0]
    G = torch.randn(B, B) / B

    def floor():
        x, y = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        (x @ y.t()).backward(G)

    def dense():
        x, y = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        t = torch.tensor(2.659, requires_grad=True)
        logits = t.exp() * (x @ y.t())
        lab = torch.arange(B)
        ((F.cross_entropy(logits, lab) + F.cross_entropy(logits.t(), lab)) / 2).backward()

    out = {"floor": floor, "dense": dense}
    for c in chunks:
        def ours(c=c):
            x, y = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
            t = torch.tensor(2.659, requires_grad=True)
            info_nce_loss(x, y, t.exp(), chunk_size=None if c == "auto" else int(c)).backward()
        out[f"losskit[chunk={c}]"] = ours
    if online:
        def ours_online():
            x, y = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
            t = torch.tensor(2.659, requires_grad=True)
            with losskit.tensor_checks(False):
                info_nce_loss(x, y, t.exp()).backward()
        out["losskit[online]"] = ours_online
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunks", default="auto,256,1024,2048")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="0: torch's default")
    p.add_argument("--online", action="store_true", help="also time the online-maximum path")
    args = p.parse_args(argv)
    default_threads = torch.get_num_threads()
    torch.manual_seed(0)
    a = F.normalize(torch.randn(args.batch, args.dim), dim=1)
    b = F.normalize(torch.randn(args.batch, args.dim), dim=1)
    chunks = [c for c in args.chunks.split(",") if c]
    for th in args.threads:
        torch.set_num_threads(th or default_threads)
        steps = contenders(a, b, chunks, args.online)
        mems, times = {}, {n: [] for n in steps}
        for name, step in steps.items():
            step()  # warm-up
            mems[name] = tensor_peak_mib(step)
        for _ in range(args.repeats):  # rounds over the contenders, so that a load change hits all alike
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        rows = [(n, statistics.median(times[n]), mems[n]) for n in steps]
        f_t, f_m = rows[0][1], rows[0][2]
        print(f"\nB={args.batch} D={args.dim} threads={torch.get_num_threads()} (median of {args.repeats})\n")
        print("| contender | time s | x floor | extra MiB | x floor memory |")
        print("|---|---|---|---|---|")
        for name, t, m in rows:
            print(f"| {name} | {t:.3f} | {t / f_t:.2f} | {m:.0f} | {m / f_m:.2f} |")


if __name__ == "__main__":
    main()
