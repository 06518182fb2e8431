"""An inverted index over sparse lexicon vectors (LexLIP, Luo et al., ICCV 2023,
arXiv 2302.02908: lexicon vectors served by an inverted index).

Documents are rows of a ``[N, V]`` matrix of non-negative lexicon weights
(mostly zeros).  The index stores, for every vocabulary term ``v``, the
posting list of the documents whose weight on ``v`` is non-zero and those
weights (term-major CSC: ``ptr [V + 1]``, ``docs [nnz]``, ``weights [nnz]``).
A query's score for document ``d`` is ``sum_v q_v w_dv`` over the query's
non-zero terms only, accumulated document by document from the postings.

**Cost.**  A query reads only the posting lists of its own non-zero terms
(``P`` postings in all): the products ``q_v w_dv`` are formed for those ``P``
postings, summed per document in one pass (``numpy.bincount``), and the top
``k`` are chosen among the touched documents (``argpartition`` over the ``P``
posting scores, then the few candidates deduplicated), so no pass over the
``N`` documents' scores is made except the accumulator's (lazily zeroed)
allocation.  A document no query term touches scores 0; it is returned only
when fewer than ``k`` touched documents have a score >= 0 (then the full
score vector is ranked, as the dense product would be).

**Exactness.**  With ``quantize=S`` (the impact-score practice of sparse
retrieval engines) weights are stored as integers ``round(S * w)`` and the
scores are *exactly* the dense integer dot products ``Q_int @ D_int^T``
(integer sums are exact whatever the order; they are accumulated in float64
only while every partial sum is provably below ``2^53``, else in int64).
Without ``quantize`` the float32 weights are multiplied and summed in
float64 (each product of two float32 is exact in float64); the result equals
the float64 dense dot product up to the order of the additions (relative
error below ``nnz * 2^-53``, tested at 1e-12).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["InvertedIndex"]

#: integer sums below this are exact in float64
_EXACT_INT_IN_FLOAT64 = 2 ** 53


def _check_matrix(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [N, V] (dense or sparse), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected shape [N, V], got {list(x.shape)}")
    return x


def _as_sparse_rows(x: Tensor, name: str) -> Tensor:
    x = _check_matrix(x, name)
    if x.is_sparse or x.layout == torch.sparse_csr:
        x = x.to_dense() if x.layout == torch.sparse_csr else x.coalesce().to_dense()
    if not x.is_floating_point():
        x = x.float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite weights, got NaN or inf")
    return x


def _query_rows(x: Tensor, name: str):
    """``(crow [Q + 1], cols [nnz], vals [nnz])`` of a dense, COO or CSR ``[Q, V]`` matrix (numpy),
    without densifying a sparse one."""
    x = _check_matrix(x, name)
    if x.layout == torch.sparse_coo:
        x = x.coalesce().to_sparse_csr()
    if x.layout == torch.sparse_csr:
        crow, cols, vals = x.crow_indices(), x.col_indices(), x.values()
    else:
        r, cols = x.nonzero(as_tuple=True)
        vals = x[r, cols]
        crow = torch.zeros(x.shape[0] + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(torch.bincount(r, minlength=x.shape[0]), 0)
    vals = vals.double() if vals.is_floating_point() else vals.to(torch.float64)
    if vals.numel() and not bool(torch.isfinite(vals).all()):
        raise ValueError(f"{name}: expected finite weights, got NaN or inf")
    keep = vals != 0
    if not bool(keep.all()):  # explicit zeros of a sparse input are not terms of the query
        r = torch.repeat_interleave(torch.arange(x.shape[0]), crow[1:] - crow[:-1])[keep]
        cols, vals = cols[keep], vals[keep]
        crow = torch.zeros(x.shape[0] + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(torch.bincount(r, minlength=x.shape[0]), 0)
    return crow.numpy(), cols.long().numpy(), vals.numpy()


def _stable_argsort_ids(x: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative integer ids in O(n): numpy's radix sort on 16-bit keys,
    two passes (low, then high 16 bits) for ids >= 2^16."""
    if x.size == 0:
        return np.zeros(0, dtype=np.int64)
    hi = int(x.max())
    if hi < 1 << 16:
        return np.argsort(x.astype(np.uint16), kind="stable")
    if hi >= 1 << 32:
        return np.argsort(x, kind="stable")
    order = np.argsort((x & 0xFFFF).astype(np.uint16), kind="stable")
    return order[np.argsort((x[order] >> 16).astype(np.uint16), kind="stable")]


@dataclass
class InvertedIndex:
    """Posting lists of a document matrix; build with :meth:`build` (or :meth:`from_coo`)."""

    ptr: Tensor        # [V + 1] int64: term v's postings are [ptr[v], ptr[v + 1])
    docs: Tensor       # [nnz] int32 document ids, ascending within a term
    weights: Tensor    # [nnz] float32, or int32 with quantize
    num_docs: int
    quantize: float | None = None
    _max_weight: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self):
        w = self.weights
        self._max_weight = float(w.abs().max()) if w.numel() else 0.0

    @property
    def vocab_size(self) -> int:
        return self.ptr.shape[0] - 1

    @property
    def nbytes(self) -> int:
        """Bytes of the index's arrays (the postings and the term pointer)."""
        return sum(t.numel() * t.element_size() for t in (self.ptr, self.docs, self.weights))

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, documents: Tensor, quantize: float | None = None) -> "InvertedIndex":
        """From a ``[N, V]`` matrix of non-negative weights (dense, COO or CSR)."""
        d = _as_sparse_rows(documents, "documents")
        if d.numel() and bool((d < 0).any()):
            raise ValueError("documents: expected non-negative lexicon weights (log(1 + ReLU(.))), got a negative one")
        n, v = d.shape
        doc, term = d.nonzero(as_tuple=True)
        return cls.from_coo(doc, term, d[doc, term], n, v, quantize)

    @classmethod
    def from_coo(cls, doc: Tensor, term: Tensor, weight: Tensor, num_docs: int, vocab_size: int,
                 quantize: float | None = None) -> "InvertedIndex":
        """From ``(doc, term, weight)`` triples (no duplicate pairs; zeros are dropped).  Sorting
        is two stable O(nnz) radix passes (one when the triples come ordered by document)."""
        if quantize is not None and not (float(quantize) > 0):
            raise ValueError(f"quantize: expected a scale > 0 (weights are stored as round(scale * w)), got {quantize}")
        keep = weight != 0
        if not bool(keep.all()):
            doc, term, weight = doc[keep], term[keep], weight[keep]
        doc_np = doc.numpy() if doc.dtype in (torch.int32, torch.int64) else doc.long().numpy()
        term_np = term.numpy() if term.dtype in (torch.int32, torch.int64) else term.long().numpy()
        if term_np.size and (int(term_np.min()) < 0 or int(term_np.max()) >= vocab_size):
            raise ValueError(f"term: expected ids in [0, {vocab_size - 1}], got {int(term_np.min())}..{int(term_np.max())}")
        if doc_np.size and (int(doc_np.min()) < 0 or int(doc_np.max()) >= num_docs):
            raise ValueError(f"doc: expected ids in [0, {num_docs - 1}], got {int(doc_np.min())}..{int(doc_np.max())}")
        if doc_np.size > 1 and not bool((doc_np[1:] >= doc_np[:-1]).all()):
            first = _stable_argsort_ids(doc_np)
            doc_np, term_np, weight = doc_np[first], term_np[first], weight[torch.from_numpy(first)]
        order = _stable_argsort_ids(term_np)  # by term; documents stay ascending within a term
        counts = np.bincount(term_np, minlength=vocab_size)
        ptr = torch.zeros(vocab_size + 1, dtype=torch.long)
        ptr[1:] = torch.from_numpy(np.cumsum(counts))
        docs = torch.from_numpy(doc_np[order].astype(np.int32))
        w = weight[torch.from_numpy(order)]
        if quantize is not None:
            w = torch.round(w.double() * float(quantize))
            if w.numel() and float(w.abs().max()) > torch.iinfo(torch.int32).max:
                raise ValueError(f"quantize: round({quantize:g} * w) exceeds int32 for a weight of "
                                 f"{float(weight.abs().max()):g}; expected a smaller scale")
            w = w.to(torch.int32)
        else:
            w = w.float()
        return cls(ptr, docs, w, int(num_docs), None if quantize is None else float(quantize))

    # ------------------------------------------------------------------ queries
    def quantized(self, x: Tensor) -> Tensor:
        """``round(quantize * x)`` as int64 (the integers the index scores with)."""
        return torch.round(x.double() * self.quantize).long()

    def _arrays(self):
        return self.ptr.numpy(), self.docs.numpy(), self.weights.numpy()

    def _accumulate(self, terms: np.ndarray, qw: np.ndarray):
        """``(docs [P], scores [N])``: the postings of ``terms`` (in term order) and the
        per-document sums of ``q_v w_dv`` over them (float64, or int64 with ``quantize``)."""
        ptr, pdocs, pw = self._arrays()
        starts, ends = ptr[terms], ptr[terms + 1]
        d = np.concatenate([pdocs[a:b] for a, b in zip(starts, ends)]) if terms.size else np.zeros(0, np.int32)
        if self.quantize is not None:
            qi = np.rint(qw * self.quantize).astype(np.int64)
            c = np.concatenate([pw[a:b].astype(np.int64) * q for a, b, q in zip(starts, ends, qi)]) \
                if terms.size else np.zeros(0, np.int64)
            if float(np.abs(qi).sum()) * self._max_weight < _EXACT_INT_IN_FLOAT64:
                acc = np.bincount(d, weights=c, minlength=self.num_docs).astype(np.int64)
            else:  # partial sums could leave float64's exact integers: int64 accumulation
                acc = np.zeros(self.num_docs, dtype=np.int64)
                np.add.at(acc, d, c)
            return d, acc
        c = np.concatenate([pw[a:b] * q for a, b, q in zip(starts, ends, qw)]) if terms.size else np.zeros(0)
        return d, np.bincount(d, weights=c, minlength=self.num_docs)

    def _single_query(self, query: Tensor):
        if not isinstance(query, Tensor) or query.dim() != 1 or query.shape[0] != self.vocab_size:
            got = list(query.shape) if isinstance(query, Tensor) else type(query).__name__
            raise ValueError(f"query: expected shape [{self.vocab_size}] (one weight per term), got {got}")
        crow, cols, vals = _query_rows(query[None], "query")
        return cols, vals

    def score(self, query: Tensor) -> Tensor:
        """Scores of every document for one query ``[V]``: ``[N]``, int64 with ``quantize``, else float64."""
        return torch.from_numpy(self._accumulate(*self._single_query(query))[1])

    def _top(self, terms: np.ndarray, qw: np.ndarray, k: int):
        d, acc = self._accumulate(terms, qw)
        if d.size:
            s = acc[d]                                     # each posting's document score
            m = max(1, terms.size)                         # a document has at most m postings here
            kk = k * m                                     # so the k best documents are among the kk best postings
            part = np.argpartition(-s, kk - 1)[:kk] if s.size > kk else np.arange(s.size)
            cand, first = np.unique(d[part], return_index=True)
            cs = s[part][first]
            order = np.argsort(-cs, kind="stable")[:k]
            if order.size == k and cs[order[-1]] >= 0:     # untouched documents (score 0) cannot beat these
                return cs[order], cand[order].astype(np.int64)
        t = torch.topk(torch.from_numpy(acc), k)           # fewer than k touched documents with score >= 0
        return t.values.numpy(), t.indices.numpy()

    def search(self, queries: Tensor, k: int = 10) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores [Q, k], ids [Q, k])`` for each row of ``queries [Q, V]`` (dense, COO or
        CSR), scores descending (int64 with ``quantize``, else float64); ties in any order."""
        _check_matrix(queries, "queries")
        if queries.shape[1] != self.vocab_size:
            raise ValueError(f"queries: expected shape [Q, {self.vocab_size}] (one weight per term), "
                             f"got {list(queries.shape)}")
        k = min(int(k), self.num_docs)
        if k < 1:
            raise ValueError(f"k: expected an integer >= 1 (and an index with documents), got {k}")
        crow, cols, vals = _query_rows(queries, "queries")
        nq = crow.shape[0] - 1
        dt = np.int64 if self.quantize is not None else np.float64
        scores, ids = np.empty((nq, k), dtype=dt), np.empty((nq, k), dtype=np.int64)
        for i in range(nq):
            a, b = crow[i], crow[i + 1]
            scores[i], ids[i] = self._top(cols[a:b], vals[a:b], k)
        return torch.from_numpy(scores), torch.from_numpy(ids)
