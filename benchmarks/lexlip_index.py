"""LexLIP-style sparse retrieval: losskit's inverted index vs a dense matmul and faiss flat.

    PYTHONPATH=src python benchmarks/lexlip_index.py --threads 1      # 1M documents
    PYTHONPATH=src python benchmarks/lexlip_index.py --threads 0      # torch's default thread count
    PYTHONPATH=src python benchmarks/lexlip_index.py --docs 200000 --threads 1 0

Synthetic data (no trained model here): ``--docs`` lexicon vectors over a ``--vocab`` (30522,
BERT's) vocabulary with ``--doc-terms`` term draws each (duplicates merged), and ``--queries``
queries with ``--query-terms``; term ids drawn from a Zipf-Mandelbrot law ``p(rank) ~ 1 / (rank +
100)`` (a FLOPS-regularised lexicon has no dominant terms); weights ``log(1 + 5 u)``.  The dense
contenders hold CLIP-style ``--dim`` (512) float32 embeddings of the same documents (what LexLIP is
compared against in its paper, Table 6), random unit vectors:

* ``inverted index``: ``InvertedIndex.search(queries, k=10)`` (float32 weights, int32 doc ids,
  float64 sums), one query after another: each reads only its terms' posting lists;
* ``inverted index (int, quantize=100)``: integer impact weights (exact integer scores);
* ``dense matmul, batch``: ``Q @ D^T`` for all queries in one product, then top-10 (per query =
  total / Q: the batch amortises the read of the 2 GB of embeddings);
* ``dense matmul, one query``: ``q @ D^T`` and top-10 for ``--single`` queries one at a time (latency);
* ``faiss flat``: ``IndexFlatIP.search`` of the first ``--faiss-queries`` queries in one call, k = 10.

Reported: per-query time (median of ``--repeats`` rounds; each round runs every contender once),
index bytes, and ratios against the batched dense matmul measured in the same run.  Before timing,
the index's scores are checked against document-major dot products computed from the generated
``(doc, term, weight)`` triples without the index: every document's score and the top-10 for
``--check`` queries (float: rtol 1e-12 against float64; int: equal).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def make_sparse(n, vocab, terms, rng):
    """Document-major ``(doc int64, term int64, weight float32)`` with ``terms`` draws per row."""
    cdf = np.cumsum(1.0 / (np.arange(vocab) + 100.0))
    cdf /= cdf[-1]
    t = np.minimum(np.searchsorted(cdf, rng.random(n * terms, dtype=np.float32), side="right"), vocab - 1)
    t = t.astype(np.int32).reshape(n, terms)
    t.sort(axis=1)
    keep = np.ones(t.shape, dtype=bool)
    keep[:, 1:] = t[:, 1:] != t[:, :-1]
    doc = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], t.shape)[keep]
    term = t[keep].astype(np.int64)
    w = np.log1p(5 * rng.random(term.shape[0], dtype=np.float32)).astype(np.float32)
    return torch.from_numpy(doc), torch.from_numpy(term), torch.from_numpy(w)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--doc-terms", type=int, default=64)
    ap.add_argument("--query-terms", type=int, default=16)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--single", type=int, default=5, help="queries timed one at a time by the dense matmul")
    ap.add_argument("--faiss-queries", type=int, default=20)
    ap.add_argument("--check", type=int, default=5, help="queries whose every document score and top-10 are checked")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="0: torch's default")
    args = ap.parse_args(argv)
    from losskit.retrieval import InvertedIndex

    default_threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    doc, term, w = make_sparse(args.docs, args.vocab, args.doc_terms, rng)
    idx = InvertedIndex.from_coo(doc, term, w, args.docs, args.vocab)
    idx_q = InvertedIndex.from_coo(doc, term, w, args.docs, args.vocab, quantize=100)
    build_s = time.perf_counter() - t0
    qd, qt, qw = make_sparse(args.queries, args.vocab, args.query_terms, rng)
    queries = torch.zeros(args.queries, args.vocab)
    queries[qd, qt] = qw
    # exactness: document-major dot products from the triples, without the index
    wi = idx_q.quantized(w)
    for q in range(min(args.check, args.queries)):
        qv = queries[q].double()
        want = torch.zeros(args.docs, dtype=torch.float64).index_add_(0, doc, w.double() * qv[term])
        qiv = idx_q.quantized(queries[q])
        want_i = torch.zeros(args.docs, dtype=torch.long).index_add_(0, doc, wi * qiv[term])
        assert torch.allclose(idx.score(queries[q]), want, rtol=1e-12, atol=0), "index != dense dot product"
        assert torch.equal(idx_q.score(queries[q]), want_i), "integer index != integer dense dot product"
        s, i = idx.search(queries[q:q + 1], 10)
        assert torch.allclose(s[0], torch.topk(want, 10).values, rtol=1e-12, atol=0), "top-10 differs"
        assert torch.allclose(want[i[0]], s[0], rtol=1e-12, atol=0), "top-10 ids do not have their scores"
        s, i = idx_q.search(queries[q:q + 1], 10)
        assert torch.equal(s[0], torch.topk(want_i, 10).values) and torch.equal(want_i[i[0]], s[0]), \
            "integer top-10 differs"
        del want, want_i
    del wi
    postings = sum(int((idx.ptr[t + 1] - idx.ptr[t]).sum()) for t in [queries[q].nonzero()[:, 0] for q in range(args.queries)])
    g = torch.Generator().manual_seed(1)
    dense = torch.nn.functional.normalize(torch.randn(args.docs, args.dim, generator=g), dim=1)
    dq = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=g), dim=1)
    try:
        import faiss

        fi = faiss.IndexFlatIP(args.dim)
        fi.add(dense.numpy())
    except ImportError:
        fi = None
    print(f"\n{args.docs} documents, vocab {args.vocab}, {idx.docs.numel() / args.docs:.1f} terms per document, "
          f"{(queries != 0).sum().item() / args.queries:.1f} per query ({postings / args.queries:.0f} postings read "
          f"per query); dense dim {args.dim}; build of both indexes {build_s:.1f} s; scores checked "
          f"(every document and the top-10 of {args.check} queries; float: rtol 1e-12 vs "
          "float64 dense; int: equal)")
    dense_b = dense.numel() * 4
    sizes = {"inverted index": idx.nbytes, "inverted index (int, quantize=100)": idx_q.nbytes,
             "dense matmul, batch": dense_b, "dense matmul, one query": dense_b, "faiss flat": dense_b}
    nq_f = min(args.faiss_queries, args.queries)
    for th in args.threads:
        torch.set_num_threads(th or default_threads)
        if fi is not None:
            faiss.omp_set_num_threads(th or default_threads)

        def run_dense():
            torch.topk(dq @ dense.t(), 10, dim=1)

        def run_single():
            for i in range(args.single):
                torch.topk(dq[i] @ dense.t(), 10)

        contenders = {  # (step, queries it answers)
            "inverted index": (lambda: idx.search(queries, 10), args.queries),
            "inverted index (int, quantize=100)": (lambda: idx_q.search(queries, 10), args.queries),
            "dense matmul, batch": (run_dense, args.queries),
            "dense matmul, one query": (run_single, args.single)}
        if fi is not None:
            contenders["faiss flat"] = (lambda: fi.search(dq[:nq_f].numpy(), 10), nq_f)
        times = {n: [] for n in contenders}
        for f, _ in contenders.values():
            f()  # warm-up
        for _ in range(args.repeats):
            for n, (f, nq) in contenders.items():
                t = time.perf_counter()
                f()
                times[n].append((time.perf_counter() - t) / nq)
        base_t = statistics.median(times["dense matmul, batch"])
        print(f"\nthreads={torch.get_num_threads()} (median of {args.repeats}; per query)\n")
        print("| contender | ms / query | speed-up vs dense batch | index MiB | smaller than dense |")
        print("|---|---|---|---|---|")
        for n in contenders:
            t = statistics.median(times[n])
            print(f"| {n} | {1000 * t:.2f} | {base_t / t:.2f} | {sizes[n] / 2**20:.0f} | {dense_b / sizes[n]:.2f} |")


if __name__ == "__main__":
    main()
