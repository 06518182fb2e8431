"""An inverted index over sparse lexicon vectors (LexLIP, Luo et al., ICCV 2023,
arXiv 2302.02908: lexicon vectors served by an inverted index).

Documents are rows of a ``[N, V]`` matrix of non-negative lexicon weights
(mostly zeros).  The index stores, for every vocabulary term ``v``, the
posting list of the documents whose weight on ``v`` is non-zero and those
weights (term-major CSC: ``ptr [V + 1]``, ``docs [nnz]``, ``weights [nnz]``).
A query's score for document ``d`` is ``sum_v q_v w_dv`` over the query's
non-zero terms only, accumulated document by document from the postings.

**Exactness.**  With ``quantize=S`` (the impact-score practice of sparse
retrieval engines) weights are stored as integers ``round(S * w)`` and the
scores are accumulated in int64: they are *exactly* the dense integer dot
products ``Q_int @ D_int^T`` (integer addition is associative), whatever the
order.  Without ``quantize`` the float32 weights are multiplied and summed in
float64 (each product of two float32 is exact in float64); the result equals
the float64 dense dot product up to the order of the additions (relative
error below ``nnz * 2^-53``, tested at 1e-12).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["InvertedIndex"]


def _as_sparse_rows(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [N, V] (dense or sparse), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected shape [N, V], got {list(x.shape)}")
    if x.is_sparse or x.layout == torch.sparse_csr:
        x = x.to_dense() if x.layout == torch.sparse_csr else x.coalesce().to_dense()
    if not x.is_floating_point():
        x = x.float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite weights, got NaN or inf")
    return x


@dataclass
class InvertedIndex:
    """Posting lists of a document matrix; build with :meth:`build` (or :meth:`from_coo`)."""

    ptr: Tensor        # [V + 1] int64: term v's postings are [ptr[v], ptr[v + 1])
    docs: Tensor       # [nnz] int32 document ids, ascending within a term
    weights: Tensor    # [nnz] float32, or int32 with quantize
    num_docs: int
    quantize: float | None = None

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
        """From ``(doc, term, weight)`` triples (no duplicate pairs; zeros are dropped)."""
        if quantize is not None and not (float(quantize) > 0):
            raise ValueError(f"quantize: expected a scale > 0 (weights are stored as round(scale * w)), got {quantize}")
        keep = weight != 0
        doc, term, weight = doc[keep].long(), term[keep].long(), weight[keep]
        if doc.numel() and (int(term.min()) < 0 or int(term.max()) >= vocab_size):
            raise ValueError(f"term: expected ids in [0, {vocab_size - 1}], got {int(term.min())}..{int(term.max())}")
        order = torch.argsort(term * max(num_docs, 1) + doc)
        doc, term, weight = doc[order], term[order], weight[order]
        counts = torch.bincount(term, minlength=vocab_size)
        ptr = torch.zeros(vocab_size + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(counts, 0)
        if quantize is not None:
            w = torch.round(weight.double() * float(quantize)).to(torch.int32)
        else:
            w = weight.float()
        return cls(ptr, doc.to(torch.int32), w, int(num_docs), None if quantize is None else float(quantize))

    # ------------------------------------------------------------------ queries
    def _query_terms(self, query: Tensor) -> tuple[Tensor, Tensor]:
        if query.dim() != 1 or query.shape[0] != self.vocab_size:
            raise ValueError(f"query: expected shape [{self.vocab_size}] (one weight per term), got {list(query.shape)}")
        terms = query.nonzero(as_tuple=True)[0]
        return terms, query[terms]

    def quantized(self, x: Tensor) -> Tensor:
        """``round(quantize * x)`` as int64 (the integers the index scores with)."""
        return torch.round(x.double() * self.quantize).long()

    def score(self, query: Tensor) -> Tensor:
        """Scores of every document for one query ``[V]``: ``[N]``, int64 with ``quantize``, else float64."""
        terms, qw = self._query_terms(query)
        starts, ends = self.ptr[terms], self.ptr[terms + 1]
        lens = ends - starts
        total = int(lens.sum())
        # positions of every posting of the query's terms, without a Python loop over terms
        offs = torch.repeat_interleave(starts - torch.cumsum(lens, 0) + lens, lens) + torch.arange(total)
        docs = self.docs[offs].long()
        if self.quantize is not None:
            qi = torch.round(qw.double() * self.quantize).long()
            contrib = self.weights[offs].long() * torch.repeat_interleave(qi, lens)
            out = torch.zeros(self.num_docs, dtype=torch.long)
        else:
            contrib = self.weights[offs].double() * torch.repeat_interleave(qw.double(), lens)
            out = torch.zeros(self.num_docs, dtype=torch.float64)
        return out.index_add_(0, docs, contrib)

    def search(self, queries: Tensor, k: int = 10) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores [Q, k], ids [Q, k])`` for each row of ``queries [Q, V]``."""
        q = _as_sparse_rows(queries, "queries")
        k = min(int(k), self.num_docs)
        if k < 1:
            raise ValueError(f"k: expected an integer >= 1 (and an index with documents), got {k}")
        outs = [torch.topk(self.score(row), k) for row in q]
        return torch.stack([o.values for o in outs]), torch.stack([o.indices for o in outs])
