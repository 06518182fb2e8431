"""LexLIP-style sparse retrieval: losskit's inverted index vs a dense matmul and faiss flat.

    PYTHONPATH=src python benchmarks/lexlip_index.py                    # 1M documents, --threads 1 0
    PYTHONPATH=src python benchmarks/lexlip_index.py --docs 200000 --threads 1

Synthetic data (no trained model here): ``--docs`` lexicon vectors over a ``--vocab`` (30522,
BERT's) vocabulary with ``--doc-terms`` non-zero weights each, and ``--queries`` queries with
``--query-terms``; term ids drawn from a Zipf-Mandelbrot law ``p(rank) ~ 1 / (rank + 100)`` (a
FLOPS-regularised lexicon has no dominant terms); weights ``log(1 + 5 u)``.  The dense contenders
hold CLIP-style ``--dim`` (512) float32 embeddings of the same documents (what LexLIP is compared
against in its paper, Table 6), random unit vectors:

* ``inverted index``: ``losskit.retrieval.InvertedIndex`` (float32 weights, int32 doc ids), one query
  at a time, full scores then top-10;
* ``inverted index (int, quantize=100)``: integer impact weights (exact scores);
* ``dense matmul``: ``Q @ D^T`` for all queries in one product, then top-10 (per-query time = total / Q);
* ``faiss flat``: ``IndexFlatIP.search`` of all queries, k = 10 (per query = total / Q).

Reported: per-query latency (median of ``--repeats``), index bytes, and ratios against the dense
matmul measured in the same run.  The exactness of the index's scores is checked on the first
queries against a dense float64 product of the sparse vectors restricted to the candidate docs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def make_sparse(n, vocab, terms, g):
    p = 1.0 / (torch.arange(vocab, dtype=torch.float64) + 100.0)
    term = torch.multinomial(p, n * terms, replacement=True, generator=g)
    doc = torch.arange(n).repeat_interleave(terms)
    key = torch.unique(doc * vocab + term)  # sorted, duplicates dropped
    doc, term = key // vocab, key % vocab
    w = torch.log1p(5 * torch.rand(key.shape[0], generator=g))
    return doc, term, w


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--doc-terms", type=int, default=64)
    ap.add_argument("--query-terms", type=int, default=16)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0])
    args = ap.parse_args(argv)
    from losskit.retrieval import InvertedIndex

    default_threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    doc, term, w = make_sparse(args.docs, args.vocab, args.doc_terms, g)
    idx = InvertedIndex.from_coo(doc, term, w, args.docs, args.vocab)
    idx_q = InvertedIndex.from_coo(doc, term, w, args.docs, args.vocab, quantize=100)
    qd, qt, qw = make_sparse(args.queries, args.vocab, args.query_terms, g)
    queries = torch.zeros(args.queries, args.vocab)
    queries[qd, qt] = qw
    build_s = time.perf_counter() - t0
    # exactness on three queries: the index's scores vs float64 dense products over the documents
    dense_rows = torch.sparse_coo_tensor(torch.stack([doc, term]), w.double(), (args.docs, args.vocab))
    for q in range(3):
        want = torch.sparse.mm(dense_rows, queries[q].double()[:, None]).squeeze(1)
        got = idx.score(queries[q])
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), "inverted index != dense dot product"
        wi = torch.sparse_coo_tensor(torch.stack([doc, term]), idx_q.quantized(w), (args.docs, args.vocab))
        want_i = torch.sparse.mm(wi, idx_q.quantized(queries[q])[:, None]).squeeze(1)
        assert torch.equal(idx_q.score(queries[q]), want_i), "integer index != integer dense dot product"
    del dense_rows, wi
    dense = torch.nn.functional.normalize(torch.randn(args.docs, args.dim, generator=g), dim=1)
    dq = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=g), dim=1)
    try:
        import faiss

        fi = faiss.IndexFlatIP(args.dim)
        fi.add(dense.numpy())
    except ImportError:
        fi = None
    print(f"\n{args.docs} documents, vocab {args.vocab}, {idx.docs.numel() / args.docs:.1f} terms per document, "
          f"{args.query_terms} per query; dense dim {args.dim}; build {build_s:.1f} s; scores checked "
          "(float: rtol 1e-12 vs float64 dense; int: equal)")
    sizes = {"inverted index": idx.nbytes, "inverted index (int, quantize=100)": idx_q.nbytes,
             "dense matmul": dense.numel() * 4, "faiss flat": dense.numel() * 4 if fi is not None else None}
    for th in args.threads:
        torch.set_num_threads(th or default_threads)
        if fi is not None:
            faiss.omp_set_num_threads(th or default_threads)

        def run_inv(ix=idx):
            for q in queries:
                torch.topk(ix.score(q), 10)

        def run_dense():
            torch.topk(dq @ dense.t(), 10, dim=1)

        def run_faiss():
            fi.search(dq.numpy(), 10)

        contenders = {"inverted index": run_inv, "inverted index (int, quantize=100)": lambda: run_inv(idx_q),
                      "dense matmul": run_dense}
        if fi is not None:
            contenders["faiss flat"] = run_faiss
        times = {n: [] for n in contenders}
        for n, f in contenders.items():
            f()  # warm-up
        for _ in range(args.repeats):
            for n, f in contenders.items():
                t = time.perf_counter()
                f()
                times[n].append((time.perf_counter() - t) / args.queries)
        base_t = statistics.median(times["dense matmul"])
        print(f"\nthreads={torch.get_num_threads()} (median of {args.repeats}; per query)\n")
        print("| contender | ms / query | speed-up vs dense | index MiB | smaller than dense |")
        print("|---|---|---|---|---|")
        for n in contenders:
            t = statistics.median(times[n])
            mib = sizes[n] / 2**20
            print(f"| {n} | {1000 * t:.2f} | {base_t / t:.2f} | {mib:.0f} | {sizes['dense matmul'] / sizes[n]:.2f} |")


if __name__ == "__main__":
    main()
