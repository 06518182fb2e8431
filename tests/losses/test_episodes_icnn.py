import math

import pytest
import torch

import losskit
from losskit.functional.episodes import icnn_loss, icnn_score


def naive_icnn(x, y, k=4, omega=False, anchors=None, cand=None):
    """The ICNN score, one anchor at a time, from the definitions in docs/pair.md
    (the authors' ``modified_score``: the nearest other-class row among the
    ``cand`` nearest rows, ``k + 1`` by default, ``'batch'`` for all of them;
    none there: the anchor's same-class terms are 0)."""
    B = x.shape[0]
    y = [int(v) for v in y]
    d = [[math.sqrt(sum((float(x[i, t]) - float(x[j, t])) ** 2 for t in range(x.shape[1])))
          for j in range(B)] for i in range(B)]
    anchors = range(B) if anchors is None else anchors
    valid = [i for i in anchors
             if any(y[j] == y[i] for j in range(B) if j != i) and any(y[j] != y[i] for j in range(B))]
    if not valid:
        return float("nan")
    k = min(k, B - 2)
    n_cand = B - 1 if cand == "batch" else min(B - 1, k + 1 if cand is None else cand)
    order = {i: sorted((j for j in range(B) if j != i), key=lambda j: d[i][j]) for i in valid}
    nbrs = {i: order[i][:k] for i in valid}
    same_nd, other_d = {}, {}
    for i in valid:
        others = [d[i][j] for j in order[i][:n_cand] if y[j] != y[i]]
        nn_other = min(others) if others else math.inf
        d_k = d[i][nbrs[i][-1]]
        same_nd[i] = [0.0 if nn_other == math.inf else d[i][j] / max(nn_other, d_k)
                      for j in nbrs[i] if y[j] == y[i]]
        other_d[i] = [d[i][j] for j in nbrs[i] if y[j] != y[i]]
    with_same = [i for i in valid if same_nd[i]]
    lam_s = 1.0 - (sum(sum(v) / len(v) for v in (same_nd[i] for i in with_same)) / len(with_same)
                   if with_same else 0.0)
    with_other = [i for i in valid if other_d[i]]
    if with_other:
        d_max = max(max(other_d[i]) for i in with_other)
        other_nd = {i: [v / d_max for v in other_d[i]] for i in with_other}
        lam_d = sum(sum(v) / len(v) for v in other_nd.values()) / len(with_other)
    else:
        other_nd, lam_d = {}, 1.0
    gamma = sum(len(same_nd[i]) / k for i in valid) / len(valid)
    lam = (lam_s + lam_d) / 2

    def popvar(vals):
        if not vals:
            return 0.0
        mu = sum(vals) / len(vals)
        return sum((v - mu) ** 2 for v in vals) / len(vals)

    if not omega:
        return (lam + gamma) / 2
    om = 1 - popvar([v for i in valid for v in same_nd[i]]) - popvar([v for vs in other_nd.values() for v in vs])
    return (lam + gamma + om) / 3


def batch(P=4, K=4, D=5, seed=0, dtype=torch.float64, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(P).repeat(K)[torch.randperm(P * K, generator=g)]
    centers = torch.randn(P, D, generator=g, dtype=dtype) * spread
    return centers[y] + torch.randn(P * K, D, generator=g, dtype=dtype), y


@pytest.mark.parametrize("omega", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cand", [None, 2, "batch"])
def test_hard_score_matches_naive(omega, seed, cand):
    x, y = batch(seed=seed, spread=2.0)
    ref = naive_icnn(x, y, omega=omega, cand=cand)
    assert 0.0 <= ref <= 1.0
    nc = 10**6 if cand == "batch" else cand
    torch.testing.assert_close(icnn_score(x, y, k=4, omega=omega, nn_candidates=nc).item(), ref)
    m = losskit.get("icnn", omega=omega, nn_candidates=nc)
    torch.testing.assert_close(m.score(x, y).item(), ref)


def test_default_loss_is_the_authors_code():
    # -log((lambda + gamma) / 2), hard neighbours, nearest other class among the k + 1 nearest
    for seed in range(3):
        x, y = batch(seed=seed, spread=2.0)
        ref = naive_icnn(x, y)
        torch.testing.assert_close(icnn_loss(x, y).item(), -math.log(ref))
        torch.testing.assert_close(losskit.get("icnn")(x, y).item(), -math.log(ref))
        torch.testing.assert_close(icnn_loss(x, y, log=False).item(), 1.0 - ref)
    # the search scope matters: a batch where the nearest other-class row is not among the k + 1 nearest
    x = torch.tensor([[0.0], [0.1], [0.2], [0.3], [0.4], [0.5], [5.0], [5.1]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    near = icnn_score(x, y, k=2).item()
    whole = icnn_score(x, y, k=2, nn_candidates=10**6).item()
    torch.testing.assert_close(near, naive_icnn(x, y, k=2))
    torch.testing.assert_close(whole, naive_icnn(x, y, k=2, cand="batch"))
    assert near > whole  # none found among the 3 nearest counts as a perfect same-class term


def test_query_anchors_and_small_k_match_naive():
    x, y = batch(P=3, K=4, seed=3)
    from losskit.functional.episodes import split_support_query

    q = (~split_support_query(y)).nonzero().squeeze(1).tolist()
    torch.testing.assert_close(icnn_score(x, y, k=2, anchors="query").item(), naive_icnn(x, y, k=2, anchors=q))
    # k larger than the batch allows: k_eff = B - 2 (as in the authors' code)
    x3, y3 = x[:5], torch.tensor([0, 0, 1, 1, 2])
    torch.testing.assert_close(icnn_score(x3, y3, k=10).item(), naive_icnn(x3, y3, k=10))


def test_relaxation_converges_to_hard_score_and_mean_share_is_score():
    x, y = batch(seed=4)
    ref = naive_icnn(x, y, omega=True, cand="batch")
    soft = dict(omega=True, log=False, nn_candidates=10**6)  # the previous default, now options
    loss = icnn_loss(x, y, tau=1e-4, **soft)
    torch.testing.assert_close(loss.item(), 1.0 - ref, rtol=0, atol=1e-6)
    per = icnn_loss(x, y, tau=0.1, reduction="none", **soft)
    assert per.shape == (16,)
    torch.testing.assert_close(per.mean(), 1.0 - icnn_score(x, y, tau=0.1, omega=True, nn_candidates=10**6))
    # -log of the relaxed score with log=True
    torch.testing.assert_close(icnn_loss(x, y, tau=0.1, omega=True, nn_candidates=10**6),
                               -torch.log(icnn_score(x, y, tau=0.1, omega=True, nn_candidates=10**6)))
    # the relaxation differs from the hard score at finite tau (it is not the identity)
    assert abs(per.mean().item() - (1.0 - ref)) > 1e-4


def test_scale_invariant_and_better_separation_scores_higher():
    x, y = batch(seed=5, spread=0.5)
    torch.testing.assert_close(icnn_score(x * 1e4, y), icnn_score(x, y))
    far, _ = batch(seed=5, spread=8.0)
    assert icnn_score(far, y) > icnn_score(x, y)


def test_gradcheck_float64():
    x, y = batch(P=3, K=3, D=3, seed=6)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: icnn_loss(e, y, k=3, tau=0.2, omega=True), (x,))
    assert torch.autograd.gradcheck(lambda e: icnn_loss(e, y, k=3, tau=0.2, log=False, reduction="none"), (x,))
    assert torch.autograd.gradcheck(lambda e: icnn_loss(e, y, k=3), (x,))  # the default (hard neighbours)


def test_optimising_the_loss_raises_the_score():
    x, y = batch(P=4, K=4, D=4, seed=7, dtype=torch.float32, spread=0.3)
    x = x.clone().requires_grad_(True)
    before = icnn_score(x.detach(), y).item()
    opt = torch.optim.SGD([x], lr=2.0)
    for _ in range(20):
        opt.zero_grad()
        icnn_loss(x, y).backward()
        opt.step()
    assert icnn_score(x.detach(), y).item() > before + 0.1


def test_sample_weight_and_reductions():
    x, y = batch(seed=8)
    per = icnn_loss(x, y, reduction="none")
    w = torch.rand(16, dtype=torch.float64)
    torch.testing.assert_close(icnn_loss(x, y, sample_weight=w), (per * w).mean())
    torch.testing.assert_close(icnn_loss(x, y, reduction="sum", sample_weight=w), (per * w).sum())
    torch.testing.assert_close(icnn_loss(x, y, reduction="none", sample_weight=w), per * w)
    # anchors='query': [B] aligned with the rows, support rows 0; the mean divides by the query rows
    from losskit.functional.episodes import split_support_query

    q = ~split_support_query(y)
    perq = icnn_loss(x, y, anchors="query", reduction="none")
    assert perq.shape == (16,) and (perq[~q] == 0).all() and (perq[q] > 0).all()
    torch.testing.assert_close(icnn_loss(x, y, anchors="query", sample_weight=w), (perq * w).sum() / q.sum())
    torch.testing.assert_close(icnn_loss(x, y, anchors="query", reduction="sum", sample_weight=w), (perq * w).sum())
    # the query anchors' mean share is the query-anchor score
    torch.testing.assert_close(per[0], per.mean())  # -log(score): one batch value per valid anchor
    perq1 = icnn_loss(x, y, anchors="query", reduction="none", tau=0.05, log=False)
    torch.testing.assert_close(1.0 - perq1.sum() / q.sum(), icnn_score(x, y, tau=0.05, anchors="query"))


def test_no_valid_anchor_is_zero_with_graph():
    cases = [
        (torch.randn(6, 3, requires_grad=True), torch.zeros(6, dtype=torch.long)),  # one class
        (torch.randn(4, 3, requires_grad=True), torch.arange(4)),  # one sample per class
        (torch.randn(0, 3, requires_grad=True), torch.zeros(0, dtype=torch.long)),  # empty
    ]
    for x, y in cases:
        out = losskit.get("icnn")(x, y)
        assert out.item() == 0.0
        out.backward()
        assert x.grad is not None and torch.all(x.grad == 0)
        assert math.isnan(icnn_score(x.detach(), y).item())


def test_bf16_and_duplicate_points():
    x, y = batch(seed=9, dtype=torch.float32)
    xb = (x * 100).bfloat16().requires_grad_(True)
    out = losskit.get("icnn")(xb, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float())
    out.backward()
    assert torch.isfinite(xb.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(losskit.get("icnn")(x, y).float())
    dup = torch.zeros(6, 3, requires_grad=True)  # every distance zero
    out = icnn_loss(dup, torch.tensor([0, 0, 0, 1, 1, 1]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(dup.grad).all()


@pytest.mark.parametrize("kw, err, msg", [
    (dict(k=0), ValueError, r"k: expected an integer >= 1, got 0"),
    (dict(k=2.5), TypeError, r"k: expected an integer >= 1, got float 2.5"),
    (dict(tau=-0.1), ValueError, r"tau: expected a value >= 0.0, got -0.1"),
    (dict(tau=float("nan")), ValueError, r"tau: expected a finite number >= 0.0, got nan"),
    (dict(omega="yes"), TypeError, r"omega: expected True or False, got 'yes'"),
    (dict(nn_candidates=0), ValueError, r"nn_candidates: expected an integer >= 1, got 0"),
    (dict(anchors="support"), ValueError, r"anchors: expected one of \('all', 'query'\), got 'support'"),
])
def test_hyperparameters_checked_at_construction_and_by_the_function(kw, err, msg):
    with pytest.raises(err, match=msg):
        losskit.get("icnn", **kw)
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(err, match=msg):
        icnn_loss(x, y, **kw)
    with pytest.raises(err, match=msg):
        icnn_score(x, y, **kw)


def test_no_host_sync_with_value_checks_off(monkeypatch):
    # anchors='all' without a support mask is mask arithmetic only: no .item(), bool() or int() of a tensor
    x, y = batch(seed=10)
    x.requires_grad_(True)
    ref = icnn_loss(x, y)

    def sync(*a, **k):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    with losskit.tensor_checks(False):
        out = losskit.get("icnn")(x, y)
    monkeypatch.undo()
    torch.testing.assert_close(out, ref)
    with pytest.raises(AssertionError, match="host synchronisation"):  # the spy works: checks on do sync
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, sync)
        icnn_loss(x, y)


def test_bad_input_errors():
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"embeddings: expected finite values, got nan at index \(2, 0\)"):
        icnn_loss(x.index_put((torch.tensor(2), torch.tensor(0)), torch.tensor(float("nan"))), y)
    with pytest.raises(ValueError, match=r"labels: expected class ids >= 0, got -1"):
        icnn_loss(x, torch.tensor([0, 0, 1, -1]))
    with pytest.raises(TypeError, match="labels: expected an integer dtype"):
        icnn_loss(x, y.float())
    with pytest.raises(ValueError, match=r"support_mask: expected shape \[4\]"):
        icnn_loss(x, y, support_mask=torch.ones(5, dtype=torch.bool))


def test_registry_entry():
    s = losskit.spec("icnn")
    assert (s.family, s.task, s.paper.arxiv) == ("pair", "embedding", "2305.09062")
    assert s.hparams["k"] == 4
    assert losskit.get("icnn", k=3).hparams == {"k": 3, "tau": 0.0, "omega": False, "anchors": "all",
                                                "log": True, "nn_candidates": None, "reduction": "mean"}
