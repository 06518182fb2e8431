"""Chunked exact kNN (losskit.metrics.knn) vs the naive full N x N similarity matrix.

Each (method, N) runs in a fresh child process (same run, same machine) so its
peak resident memory can be read from ru_maxrss; "extra MB" is that peak minus
the resident size just before the search (data already in memory).  CPU only,
float32, cosine, leave-one-out, k = 8, D = 128, torch threads = --threads (default: 1 and torch's default).
Allocator: PyTorch's default CPU allocator (no env overrides).

    PYTHONPATH=src python benchmarks/knn_eval.py                 # N = 20,000 (a few seconds)
    PYTHONPATH=src python benchmarks/knn_eval.py --sizes 20000 50000 --naive-max 20000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(method, n, d, k, chunk, threads, out):
    import torch

    from losskit.metrics import knn

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    c = max(n // 20, 2)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 0.6 * torch.randn(c, d, generator=g)[y]
    before = _rss_mb()
    t = time.perf_counter()
    if method == "naive":
        xn = torch.nn.functional.normalize(x, dim=1)
        s = xn @ xn.T
        s.fill_diagonal_(float("-inf"))
        _, idx = s.topk(k, dim=1)
    else:
        _, idx = knn(x, k=k, chunk_size=chunk, backend=method)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r1 = float((y[idx[:, 0]] == y).float().mean())
    out.put((method, n, dt, max(peak - before, 0.0), r1, idx[:, 0].clone().numpy().tobytes()))


def run(method, n, args, threads):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(method, n, args.dim, args.k, args.chunk, threads, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000])
    ap.add_argument("--naive-max", type=int, default=20000, help="largest N for the full-matrix baseline")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                    help="torch thread counts; 0 = torch's default (default: 1 and the default)")
    args = ap.parse_args()
    try:
        import faiss  # noqa: F401
        methods = ["torch", "faiss"]
    except ImportError:
        methods = ["torch"]
    rows = []
    for threads, n in ((t, n) for t in args.threads for n in args.sizes):
        base = run("naive", n, args, threads) if n <= args.naive_max else None
        if base:
            rows.append(base + ("1.00x", threads))
        for m in methods:
            r = run(m, n, args, threads)
            same = "" if base is None else (" (top-1 == naive)" if r[5] == base[5] else " (top-1 DIFFERS from naive)")
            ratio = f"{r[2] / base[2]:.2f}x" if base else "n/a"
            rows.append(r[:5] + (b"", ratio + same, threads))
        if base is None:
            rows.append(("naive", n, float("nan"), n * n * 4 / 2**20, float("nan"),
                         b"", f"not run: the N x N float32 matrix alone is {n * n * 4 / 2**30:.1f} GiB", threads))
    print(f"\nkNN leave-one-out, cosine, k={args.k}, D={args.dim}, chunk={args.chunk}, "
          f"CPU float32 (threads 0 = torch's default)\n")
    print("| threads | N | method | time (s) | peak extra RSS (MB) | Recall@1 | time vs naive |")
    print("|---|---|---|---|---|---|---|")
    for m, n, t, mb, r1, *_rest in rows:
        note, th = _rest[-2], _rest[-1]
        print(f"| {th or 'default'} | {n:,} | {m} | {t:.2f} | {mb:,.0f} | {r1:.4f} | {note} |")


if __name__ == "__main__":
    main()
