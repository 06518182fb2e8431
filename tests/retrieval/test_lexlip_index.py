"""LexLIP: lexicon weights, the FLOPS regulariser and the objective against loops over the
paper's equations; the inverted index's scores against the dense dot product (exactly, with
integer impact weights)."""

from __future__ import annotations

import math

import pytest
import torch

import losskit
from losskit.functional.contrastive import flops_regularizer, info_nce_loss, lexicon_weights, lexlip_loss
from losskit.retrieval import InvertedIndex, LexiconHead


def _sparse_docs(n=300, v=500, nnz=12, seed=0, zipf=True):
    g = torch.Generator().manual_seed(seed)
    d = torch.zeros(n, v)
    p = 1.0 / torch.arange(1, v + 1, dtype=torch.float64) if zipf else torch.ones(v, dtype=torch.float64)
    for i in range(n):
        terms = torch.multinomial(p, nnz, replacement=False, generator=g)
        d[i, terms] = torch.log1p(torch.rand(nnz, generator=g) * 5)
    return d


def test_lexicon_weights_follow_the_equation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    w = lexicon_weights(logits, mask)
    for i in range(3):
        for v in range(6):
            m = max(max(float(logits[i, t, v]), 0.0) for t in range(4) if mask[i, t])
            assert math.isclose(float(w[i, v]), math.log(1 + m), rel_tol=1e-12)
    assert bool((w >= 0).all())
    head = LexiconHead(8, 20)
    out = head(torch.randn(2, 5, 8))
    assert out.shape == (2, 20) and bool((out >= 0).all())
    with pytest.raises(ValueError, match="features"):
        head(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="attention_mask"):
        lexicon_weights(logits, mask[:, :2])


def test_flops_and_the_lexlip_objective_follow_the_equations():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(6, 10, generator=g, dtype=torch.float64)
    b = torch.rand(6, 10, generator=g, dtype=torch.float64)
    naive = sum((sum(abs(float(a[i, v])) for i in range(6)) / 6) ** 2 for v in range(10))
    assert math.isclose(float(flops_regularizer(a)), naive, rel_tol=1e-12)
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    want = info_nce_loss(a, b, 20.0) + 0.002 * (flops_regularizer(an) + flops_regularizer(bn))
    torch.testing.assert_close(lexlip_loss(a, b, 20.0), want)
    loss = losskit.get("lexlip").double()
    assert loss.temperature == 0.05 and loss.flops_weight == 0.002 and not loss.learnable
    torch.testing.assert_close(loss(a, b), want)
    torch.testing.assert_close(loss(a, b, torch.ones(6, dtype=torch.float64)), want)


def test_inverted_index_scores_are_exactly_the_dense_integer_dot_products():
    docs = _sparse_docs()
    queries = _sparse_docs(n=20, nnz=8, seed=5)
    idx = InvertedIndex.build(docs, quantize=100)
    dense = idx.quantized(queries) @ idx.quantized(docs).t()      # int64 matmul
    for q in range(20):
        got = idx.score(queries[q])
        assert got.dtype == torch.long
        assert torch.equal(got, dense[q]), f"query {q}: inverted-index scores differ from the dense dot product"
    scores, ids = idx.search(queries, k=5)
    top = torch.topk(dense, 5, dim=1)
    assert torch.equal(scores, top.values)
    # ids may differ only among tied scores
    for q in range(20):
        assert torch.equal(dense[q, ids[q]], top.values[q])


def test_inverted_index_float_scores_match_float64_dense():
    docs = _sparse_docs(seed=2)
    queries = _sparse_docs(n=10, nnz=8, seed=6)
    idx = InvertedIndex.build(docs)
    dense = queries.double() @ docs.double().t()
    for q in range(10):
        torch.testing.assert_close(idx.score(queries[q]), dense[q], rtol=1e-12, atol=1e-12)
    assert idx.nbytes == (idx.ptr.numel() * 8 + idx.docs.numel() * 4 + idx.weights.numel() * 4)
    assert idx.docs.numel() == int((docs != 0).sum())


def test_inverted_index_bad_input():
    with pytest.raises(ValueError, match="documents: expected non-negative"):
        InvertedIndex.build(-torch.rand(3, 4))
    with pytest.raises(ValueError, match="documents: expected finite"):
        InvertedIndex.build(torch.tensor([[math.nan, 0.0]]))
    idx = InvertedIndex.build(torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"query: expected shape \[4\]"):
        idx.score(torch.rand(5))
    with pytest.raises(ValueError, match="quantize"):
        InvertedIndex.build(torch.rand(3, 4), quantize=0)
    # an empty query scores every document 0; a document without terms scores 0
    d = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    idx = InvertedIndex.build(d)
    assert torch.equal(idx.score(torch.zeros(2)), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(idx.score(torch.tensor([0.0, 2.0])), torch.tensor([2.0, 0.0], dtype=torch.float64))


def test_search_touches_postings_only_and_equals_the_dense_top_k():
    docs = _sparse_docs(n=400, seed=3)
    queries = _sparse_docs(n=15, nnz=6, seed=7)
    for quantize in (None, 100):
        idx = InvertedIndex.build(docs, quantize=quantize)
        if quantize is None:
            dense = queries.double() @ docs.double().t()
        else:
            dense = idx.quantized(queries) @ idx.quantized(docs).t()
        for k in (1, 5, 40):
            scores, ids = idx.search(queries, k=k)
            top = torch.topk(dense, k, dim=1).values
            if quantize is None:
                torch.testing.assert_close(scores, top, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(dense.gather(1, ids), top, rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(scores, top) and torch.equal(dense.gather(1, ids), top)
            assert bool(((ids[:, :, None] != ids[:, None, :]).sum((1, 2)) == k * (k - 1)).all())  # distinct ids
    # sparse query layouts give the same answer as dense rows
    idx = InvertedIndex.build(docs)
    want = idx.search(queries, k=5)
    for sq in (queries.to_sparse(), queries.to_sparse_csr()):
        got = idx.search(sq, k=5)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_search_ranks_untouched_documents_when_too_few_are_touched():
    d = torch.zeros(6, 5)
    d[1, 0], d[4, 0], d[2, 3] = 1.0, 2.0, 5.0
    idx = InvertedIndex.build(d)
    q = torch.zeros(2, 5)
    q[0, 0] = 1.0                      # touches documents 1 and 4 only
    q[1, 0], q[1, 3] = 1.0, -1.0       # document 2 scores -5: below every untouched document
    scores, ids = idx.search(q, k=4)
    dense = q.double() @ d.double().t()
    assert torch.equal(scores, torch.topk(dense, 4, dim=1).values)
    assert torch.equal(dense.gather(1, ids), scores)
    assert ids[0, :2].tolist() == [4, 1] and 2 not in ids[1].tolist()


def test_from_coo_sorts_unordered_triples_and_checks_ids():
    docs = _sparse_docs(n=70000 // 100, v=300, seed=4)
    ref = InvertedIndex.build(docs)
    doc, term = docs.nonzero(as_tuple=True)
    perm = torch.randperm(doc.numel(), generator=torch.Generator().manual_seed(0))
    got = InvertedIndex.from_coo(doc[perm], term[perm], docs[doc, term][perm], docs.shape[0], docs.shape[1])
    assert torch.equal(got.ptr, ref.ptr) and torch.equal(got.docs, ref.docs) and torch.equal(got.weights, ref.weights)
    with pytest.raises(ValueError, match=r"doc: expected ids in \[0, 1\]"):
        InvertedIndex.from_coo(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.ones(2), 2, 3)
    with pytest.raises(ValueError, match="quantize"):
        InvertedIndex.build(torch.rand(3, 4), quantize=1e12)   # impact weights would overflow int32


def test_integer_scores_stay_exact_beyond_float64_integers(monkeypatch):
    import losskit.retrieval.inverted_index as ii

    docs = _sparse_docs(seed=8)
    queries = _sparse_docs(n=5, nnz=8, seed=9)
    idx = InvertedIndex.build(docs, quantize=100)
    dense = idx.quantized(queries) @ idx.quantized(docs).t()
    monkeypatch.setattr(ii, "_EXACT_INT_IN_FLOAT64", 1)   # force the int64 accumulator
    for q in range(5):
        assert torch.equal(idx.score(queries[q]), dense[q])
