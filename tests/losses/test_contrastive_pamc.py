"""PamC against loops over the paper's equations (Kulatilleke et al. 2022), the
propagated graph against dense matrix powers, the meta-node approximation against the dense
N x N loss where it is exact, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import losskit
from losskit.functional.contrastive import (dense_block_contrastive, knn_adjacency, meta_nodes, pamc_contrastive,
                                            pamc_objective, propagated_adjacency, soft_assignment,
                                            target_distribution)


def _graph(n=10, d=4, k=2, order=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return z, propagated_adjacency(knn_adjacency(z, k), order).to(torch.float64)


def _cos(x, y):
    return sum(a * b for a, b in zip(x, y)) / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))


def test_knn_adjacency_and_propagation_follow_the_definitions():
    z, _ = _graph()
    a = knn_adjacency(z, 2).to_dense()
    zn = F.normalize(z, dim=1)
    s = zn @ zn.t()
    s.fill_diagonal_(-math.inf)
    want = torch.zeros(10, 10)
    nb = s.topk(2, dim=1).indices
    for i in range(10):
        for j in nb[i].tolist():
            want[i, j] = want[j, i] = 1.0
    assert torch.equal(a, want)
    ahat = (a + torch.eye(10)) / (a + torch.eye(10)).sum(1, keepdim=True)
    cum = sum(torch.linalg.matrix_power(ahat, r) for r in range(1, 4))
    torch.testing.assert_close(propagated_adjacency(knn_adjacency(z, 2), 3).to_dense(), cum)
    torch.testing.assert_close(propagated_adjacency(knn_adjacency(z, 2), 3, cumulative=False).to_dense(),
                               torch.linalg.matrix_power(ahat, 3))


def test_soft_assignment_and_target_follow_dec():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)
    mu = torch.randn(2, 3, generator=g, dtype=torch.float64)
    q = soft_assignment(z, mu)
    for i in range(5):
        raw = [1 / (1 + float(((z[i] - mu[k]) ** 2).sum())) for k in range(2)]
        for k in range(2):
            assert math.isclose(float(q[i, k]), raw[k] / sum(raw), rel_tol=1e-12)
    p = target_distribution(q)
    f = q.sum(0)
    for i in range(5):
        raw = [float(q[i, k]) ** 2 / float(f[k]) for k in range(2)]
        for k in range(2):
            assert math.isclose(float(p[i, k]), raw[k] / sum(raw), rel_tol=1e-12)


@pytest.mark.parametrize("official", [False, True])
def test_pamc_contrast_matches_the_loop_reference(official):
    z, adj = _graph()
    g = torch.Generator().manual_seed(2)
    q = torch.softmax(torch.randn(10, 4, generator=g, dtype=torch.float64) * 3, dim=1)
    q[:, 3] = 0.0  # cluster 3 is empty: left out of the meta-node term
    got = pamc_contrastive(z, adj, q, 0.5, official=official)
    A = adj.to_dense().tolist()
    Z = z.tolist()
    hard = q.argmax(1).tolist()
    cent = {k: [sum(Z[i][d] for i in range(10) if hard[i] == k) for d in range(4)] for k in set(hard)}
    eps = 1e-10 if official else 0.0
    ks = sorted(cent)
    neg = 0.0
    for k in ks:
        tot = 0.0
        for m in ks:
            c = 0.0 if (official and k == m) else _cos(cent[k], cent[m])
            tot += math.exp(0.5 * c)
        neg += math.log(tot + eps)
    neg /= len(ks)
    for i in range(10):
        pos = sum(A[i][j] * math.exp(0.5 * (0.0 if (official and i == j) else _cos(Z[i], Z[j]))) for j in range(10))
        assert math.isclose(float(got[i]), -math.log(pos + eps) + neg, rel_tol=1e-10), i
    # the dense version, also against loops
    dense = dense_block_contrastive(z, adj, 0.5, official=official)
    for i in range(10):
        cs = [0.0 if (official and i == j) else _cos(Z[i], Z[j]) for j in range(10)]
        pos = sum(A[i][j] * math.exp(0.5 * cs[j]) for j in range(10))
        tot = sum(math.exp(0.5 * c) for c in cs)
        assert math.isclose(float(dense[i]), -math.log(pos + eps) + math.log(tot + eps), rel_tol=1e-10)


def test_meta_nodes_equal_the_dense_loss_when_every_node_is_its_own_cluster():
    """With K = N and node i in cluster i, c_k = z_k and the meta-node negatives are the dense
    negatives: the mean losses agree (the approximation is exact there)."""
    z, adj = _graph()
    q = torch.eye(10, dtype=torch.float64) * 0.9 + 0.01
    torch.testing.assert_close(pamc_contrastive(z, adj, q).mean(), dense_block_contrastive(z, adj).mean())
    c, live = meta_nodes(z, q)
    torch.testing.assert_close(c, z)
    assert bool(live.all())


def test_objective_gradcheck_with_the_target_given_and_reductions():
    z, adj = _graph(n=7, d=3, k=2, order=2)
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(3, 3, generator=g, dtype=torch.float64)
    p = target_distribution(soft_assignment(z, mu))
    for dense in (False, True):
        assert torch.autograd.gradcheck(
            lambda z, mu: pamc_objective(z, adj, mu, target=p, dense=dense, reduction="none"),
            (z.clone().requires_grad_(), mu.clone().requires_grad_()))
    none = pamc_objective(z, adj, mu, reduction="none")
    torch.testing.assert_close(pamc_objective(z, adj, mu), none.mean())
    # beta KL(P || Q) with KL from torch, batchmean, plus alpha times the mean contrast
    q = soft_assignment(z, mu)
    kl = F.kl_div(q.log(), target_distribution(q), reduction="batchmean")
    want = 2.0 * kl + 2.0 * pamc_contrastive(z, adj, q).mean()
    torch.testing.assert_close(pamc_objective(z, adj, mu), want)


def test_permuting_nodes_and_graph_together_permutes_the_rows():
    z, adj = _graph(n=9)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    inv = torch.argsort(perm)
    idx = adj.indices()
    adj_p = torch.sparse_coo_tensor(inv[idx], adj.values(), adj.shape).coalesce()
    loss = losskit.get("pamc", num_clusters=3, embedding_dim=4, reduction="none").double()
    torch.testing.assert_close(loss(z[perm], adj_p), loss(z, adj)[perm])


def test_bad_input_is_a_clear_error():
    z, adj = _graph()
    with pytest.raises(ValueError, match="adjacency: the graph has no edges"):
        propagated_adjacency(torch.zeros(4, 4).to_sparse())
    with pytest.raises(ValueError, match="adjacency: the graph is empty"):
        propagated_adjacency(torch.zeros(0, 0).to_sparse())
    with pytest.raises(ValueError, match="k: expected an integer in"):
        knn_adjacency(z, 10)
    with pytest.raises(ValueError, match="x: a kNN graph needs at least 2 nodes"):
        knn_adjacency(z[:1], 1)
    with pytest.raises(ValueError, match=r"adjacency: expected a \[10, 10\]"):
        pamc_objective(z, adj.to_dense()[:5], torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="order"):
        propagated_adjacency(adj, 0)
    raw = knn_adjacency(z, 2).to(torch.float64)  # no self-loops: a node could have a zero positive sum
    isolated = torch.sparse_coo_tensor(raw.indices()[:, raw.indices()[0] != 0], torch.ones(int((raw.indices()[0] != 0).sum()), dtype=torch.float64), (10, 10))
    with pytest.raises(ValueError, match="adjacency: node 0 has no positive weight"):
        pamc_objective(z, isolated, torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-negative"):
        pamc_objective(z, -adj, torch.zeros(2, 4, dtype=torch.float64))
    loss = losskit.get("pamc", num_clusters=3, embedding_dim=4)
    with pytest.raises(ValueError, match="embedding_dim"):
        loss(torch.randn(10, 5), adj)
    with pytest.raises(ValueError, match="tau"):
        losskit.get("pamc", num_clusters=3, embedding_dim=4, tau=0.0)
