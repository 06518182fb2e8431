"""Margin heads at scale: forward+backward time and peak memory.

Contenders (ArcFace, s = 64, m = 0.5, D = 512):

* ``floor``   -- the matmul floor: the three matrix products of a linear layer
  of that shape (``x @ W.T`` and its backward), measured in the same run;
* ``dense``   -- losskit ``head="dense"`` (builds B x C);
* ``chunked`` -- losskit ``head="chunked"`` (online log-sum-exp over class
  chunks, recomputation in backward);
* ``fused``   -- losskit ``head="fused"`` (row blocks spanning all classes,
  gradients computed during forward: 3 GEMMs);
* ``sampled`` -- losskit ``head="sampled"`` (Partial FC, ``--sample-rate``);
* ``pml``     -- pytorch-metric-learning's ``ArcFaceLoss``.

Method.  Every (B, C, contender) runs in its own child process, so peaks do
not mix.  Two memory measures, both against the memory floor
``W + grad W + embeddings`` (fp32):

* **RSS peak** = ``ru_maxrss`` (the process's resident high-water mark over
  the warm-up and timed steps) minus the resident size measured after
  imports and before any tensor is allocated.  It counts weights, gradients,
  embeddings, every temporary, and also what is not the contender's tensors:
  the code pages of the kernels a step touches for the first time (the
  ``file`` column: growth of ``RssFile``), MKL's GEMM workspace and glibc
  heap retention.
* **tensor peak** = bytes of the tensors alive before the step (weights,
  embeddings; the floor's upstream gradient) plus the peak of the running
  sum of torch's CPU allocation events during one more step, recorded by
  ``torch.profiler`` after the timed steps (the CPU analogue of
  ``torch.cuda.max_memory_allocated``; allocator caching, library
  workspaces and code pages excluded).  Time =
median over ``--reps`` forward+backward steps after ``--warmup`` steps, with
gradients reset to None before each step (as ``zero_grad(set_to_none=True)``),
so each step allocates its gradients like a training step.  Configurations
whose estimated memory exceeds ``--max-gib`` are skipped and listed.

The allocator matters on CPU (see shared/anchors.md): run once as is and
once with ``MALLOC_MMAP_THRESHOLD_=4294967296
MALLOC_TRIM_THRESHOLD_=68719476736`` (``--glibc-keep`` sets them for the
children); the table states which.

    python benchmarks/margin_heads.py --batch 1024 --classes 100000
    python benchmarks/margin_heads.py --glibc-keep --classes 100000
    python benchmarks/margin_heads.py --full          # the whole grid (slow)
    python benchmarks/margin_heads.py --threads 1 0 --same-process   # ratios under the same contention

Every configuration runs at one torch thread and at torch's default thread
count (``--threads``, default ``1 0``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

GIB = 2 ** 30
CONTENDERS = ("floor", "dense", "chunked", "fused", "sampled", "pml")
KEEP_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_file_bytes() -> int:
    """Resident file-backed pages (shared-library code touched so far)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    return 0


def estimate_bytes(contender: str, B: int, C: int, D: int, rate: float) -> int:
    """Rough working-set estimate used only to skip configurations."""
    w = C * D * 4
    bc = B * C * 4
    if contender == "floor":
        return 2 * w + 2 * bc
    if contender == "chunked":
        return 2 * w + B * 8192 * 8
    if contender == "fused":
        return 3 * w + 2 * max(2 ** 22, D // 4 * C) * 4
    if contender == "sampled":
        return 3 * w + 2 * int(rate * w) + int(6 * rate * bc)
    if contender == "dense":
        return 2 * w + 6 * bc
    if contender == "pml":
        return 2 * w + 5 * bc
    raise ValueError(contender)


def _make_step(torch, contender: str, B: int, C: int, D: int, args):
    """``(step, params, extra_live)`` for one contender (fresh tensors)."""
    torch.manual_seed(0)
    x = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, C, (B,))
    params = [x]
    extra_live = []
    if contender == "floor":
        W = torch.randn(C, D, requires_grad=True) * 1.0
        W = W.detach().requires_grad_(True)
        g = torch.randn(B, C)
        params.append(W)
        extra_live = [g]

        def step():
            (x @ W.t()).backward(g)
    elif contender == "pml":
        import pytorch_metric_learning.losses as pml
        m = pml.ArcFaceLoss(C, D, margin=28.6, scale=64)
        params.append(m.W)

        def step():
            m(x, y).backward()
    else:
        import losskit
        m = losskit.get("arcface", num_classes=C, embedding_dim=D, scale=64.0, margin=0.5, head=contender,
                        chunk_size=args.chunk or None, sample_rate=args.sample_rate)
        params.append(m.weight)

        def step():
            m(x, y).backward()
    return step, params, extra_live


def _timed(step, params) -> float:
    for p in params:
        p.grad = None
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def child(args) -> None:
    import torch

    threads = args.threads[0]
    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    import losskit  # noqa: F401  (import cost before the baseline)
    if args.contender == "pml":
        import pytorch_metric_learning.losses  # noqa: F401
    from losskit.bench.measure import measure_step_memory

    if args.same_process:
        # every contender in this one process, round-robin: the ratios to the floor see the same
        # contention (times only; memory needs a process per contender)
        steps = {c: _make_step(torch, c, args.B, args.C, args.dim, args) for c in args.contender.split(",")}
        times = {c: [] for c in steps}
        for i in range(args.warmup + args.reps):
            for c, (step, params, _) in steps.items():
                dt = _timed(step, params)
                if i >= args.warmup:
                    times[c].append(dt)
        print(json.dumps({"times": times, "threads": torch.get_num_threads()}))
        return
    base, base_file = _rss_bytes(), _rss_file_bytes()
    step, params, extra_live = _make_step(torch, args.contender, args.B, args.C, args.dim, args)
    times = []
    for i in range(args.warmup + args.reps):
        dt = _timed(step, params)
        if i >= args.warmup:
            times.append(dt)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    file_growth = _rss_file_bytes() - base_file
    # one more step under the profiler, after the RSS high-water mark was read
    for p in params:
        p.grad = None
    live = sum(t.numel() * t.element_size() for t in params + extra_live)
    tensor_mb, _ = measure_step_memory(step, live)
    print(json.dumps({"times": times, "peak": peak - base, "file": file_growth, "tensor_peak": tensor_mb * 2 ** 20,
                      "threads": torch.get_num_threads()}))


def run_child(B, C, contender, args, threads: int, same_process: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--contender", contender, "--B", str(B),
           "--C", str(C), "--dim", str(args.dim), "--reps", str(args.reps), "--warmup", str(args.warmup),
           "--chunk", str(args.chunk), "--sample-rate", str(args.sample_rate), "--threads", str(threads)]
    if same_process:
        cmd.append("--same-process")
    env = dict(os.environ)
    if args.glibc_keep:
        env.update(KEEP_ENV)
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:120]}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall"] = time.time() - t0
    return res


def _one_config(B: int, C: int, threads: int, args, alloc: str) -> list[dict]:
    """One child process per contender (time and memory) for ``(B, C)`` at ``threads``."""
    floor_mem = (2 * C * args.dim + B * args.dim) * 4
    floor_t = None
    row, out = {}, []
    for c in args.contenders:
        est = estimate_bytes(c, B, C, args.dim, args.sample_rate)
        if est > args.max_gib * GIB:
            res = {"skipped": f"estimated {est / GIB:.1f} GiB > {args.max_gib} GiB"}
        else:
            res = run_child(B, C, c, args, threads)
        row[c] = res
        out.append({"B": B, "C": C, "contender": c, **res, "floor_mem": floor_mem, "alloc": alloc})
        th = res.get("threads", threads or "default")
        if "times" in res:
            t = statistics.median(res["times"])
            if c == "floor":
                floor_t = t
            ratio_t = f"{t / floor_t:.2f}" if floor_t else "-"
            print(f"| {th} | {B} | {C} | {c} | {t:.2f} | {ratio_t} | {res['peak'] / GIB:.3f} | "
                  f"{res['peak'] / floor_mem:.2f} | {res['file'] / 2 ** 20:.0f} | "
                  f"{res['tensor_peak'] / GIB:.3f} | {res['tensor_peak'] / floor_mem:.2f} | |", flush=True)
        else:
            note = res.get("skipped") or res.get("error")
            print(f"| {th} | {B} | {C} | {c} | - | - | - | - | - | - | - | {note} |", flush=True)
    pm = row.get("pml", {})
    for name in ("chunked", "fused"):
        ch = row.get(name, {})
        if "times" in ch and "times" in pm:
            tc, tp = statistics.median(ch["times"]), statistics.median(pm["times"])
            print(f"| {ch['threads']} | {B} | {C} | pml / {name} | {tp / tc:.2f}x time | | "
                  f"{pm['peak'] / ch['peak']:.2f}x RSS | | | "
                  f"{pm['tensor_peak'] / ch['tensor_peak']:.2f}x tensor | | |", flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1024])
    ap.add_argument("--classes", type=int, nargs="+", default=[100000])
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    ap.add_argument("--full", action="store_true", help="B in {256, 1024} x C in {10k, 100k, 500k, 1M}")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=0, help="chunk_size for the chunked head (0: the head's auto)")
    ap.add_argument("--sample-rate", type=float, default=0.1)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                    help="torch thread counts, one table row set each (0: torch's default; default: 1 and 0)")
    ap.add_argument("--same-process", action="store_true",
                    help="also time every contender round-robin in one process per (B, C, threads): ratios "
                         "to the floor under the same contention (times only)")
    ap.add_argument("--max-gib", type=float, default=8.0, help="skip configurations estimated above this")
    ap.add_argument("--glibc-keep", action="store_true", help="children run with glibc keeping freed memory")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", help="also write the raw results here")
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--B", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--C", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return
    if args.full:
        args.batch, args.classes = [256, 1024], [10000, 100000, 500000, 1000000]
    alloc = "glibc keeps freed memory (MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736)" \
        if args.glibc_keep else "default glibc"
    threads_txt = ", ".join("torch default" if t == 0 else str(t) for t in args.threads)
    print(f"# margin heads, forward+backward, ArcFace s=64 m=0.5, D={args.dim}, fp32, CPU; allocator: {alloc}; "
          f"threads: {threads_txt}; warmup {args.warmup}, reps {args.reps} (median); "
          f"chunk {args.chunk or 'auto'}; sample_rate {args.sample_rate}")
    print()
    print("| threads | B | C | contender | time (s) | x floor time | RSS peak (GiB) | x memory floor | file (MiB) "
          "| tensor peak (GiB) | x memory floor | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    load0 = f"{os.getloadavg()[0]:.1f}"
    for threads in args.threads:
        for B in args.batch:
            for C in args.classes:
                results += _one_config(B, C, threads, args, alloc)
    if args.same_process:
        print("\nSame process, round-robin (every contender sees the same contention; times only):\n")
        print("| threads | B | C | contender | time (s) | x floor time |")
        print("|---|---|---|---|---|---|")
        for threads in args.threads:
            for B in args.batch:
                for C in args.classes:
                    names = [c for c in args.contenders
                             if estimate_bytes(c, B, C, args.dim, args.sample_rate) <= args.max_gib * GIB]
                    res = run_child(B, C, ",".join(names), args, threads, same_process=True)
                    if "times" not in res:
                        print(f"| {threads or 'default'} | {B} | {C} | - | - | {res.get('error')} |")
                        continue
                    med = {c: statistics.median(v) for c, v in res["times"].items()}
                    for c, t in med.items():
                        ratio = f"{t / med['floor']:.2f}" if "floor" in med else "-"
                        print(f"| {res['threads']} | {B} | {C} | {c} | {t:.2f} | {ratio} |", flush=True)
                        results.append({"B": B, "C": C, "contender": c, "threads": res["threads"],
                                        "times": res["times"][c], "same_process": True})
    print(f"\n(memory floor = W + grad W + embeddings in fp32; 1 GiB = 2^30 bytes; "
          f"{os.cpu_count()} CPU cores, shared with other work; load average at start {load0}, "
          f"at end {os.getloadavg()[0]:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
