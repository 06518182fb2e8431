import math

import pytest
import torch

import losskit
from losskit.functional.episodes import gpam_loss, gpam_predict


def naive_split(y):
    y = [int(v) for v in y]
    n, seen, out = {}, {}, []
    for v in y:
        n[v] = n.get(v, 0) + 1
    for v in y:
        r = seen.get(v, 0)
        seen[v] = r + 1
        out.append(v >= 0 and r < (n[v] + 1) // 2)
    return out


def naive_gaussians(xs, ys, shrinkage, min_var):
    D = len(xs[0])
    all_mean = [sum(x[t] for x in xs) / len(xs) for t in range(D)]
    target = [sum((x[t] - all_mean[t]) ** 2 for x in xs) / len(xs) for t in range(D)]
    out = {}
    for c in sorted(set(ys)):
        mem = [x for x, v in zip(xs, ys) if v == c]
        mu = [sum(m[t] for m in mem) / len(mem) for t in range(D)]
        s2 = [sum((m[t] - mu[t]) ** 2 for m in mem) / len(mem) for t in range(D)]
        out[c] = (mu, [(1 - shrinkage) * s2[t] + shrinkage * target[t] + min_var for t in range(D)])
    return out


def naive_dist_range(q, mu, var, radius):
    D = len(q)
    logdet = sum(math.log(v) for v in var)
    maha = sum((q[t] - mu[t]) ** 2 / var[t] for t in range(D))
    return (maha + logdet) / D, logdet / D + radius


def naive_gpam(x, y, support, margin=0.5, radius=1.0, shrinkage=0.5, min_var=1e-4):
    rows = [[float(v) for v in r] for r in x]
    y = [int(v) for v in y]
    xs = [rows[i] for i in range(len(y)) if support[i]]
    ys = [y[i] for i in range(len(y)) if support[i]]
    g = naive_gaussians(xs, ys, shrinkage, min_var) if xs else {}
    out = []  # one loss per batch row, support rows 0
    for i in range(len(y)):
        if support[i]:
            out.append(0.0)
            continue
        total = 0.0
        for c, (mu, var) in g.items():
            d, r = naive_dist_range(rows[i], mu, var, radius)
            if c == y[i]:
                total += max(0.0, d - r + margin)
            else:
                total += max(0.0, r + margin - d)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def batch(P=3, K=4, D=4, seed=0, n_nota=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.arange(P).repeat(K), torch.full((n_nota,), -1)])
    y = y[torch.randperm(len(y), generator=g)]
    centers = torch.randn(P, D, generator=g, dtype=dtype) * 2
    x = torch.randn(len(y), D, generator=g, dtype=dtype)
    x[y >= 0] += centers[y[y >= 0]]
    return x, y


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_loop_with_nota(seed):
    x, y = batch(seed=seed)
    ref = naive_gpam(x, y, naive_split(y))
    m = losskit.get("gpam", reduction="none")
    out = m(x, y)
    assert out.shape == (len(y),)
    torch.testing.assert_close(out, ref)
    q = ~torch.tensor(naive_split(y))
    assert (y[q] == -1).sum() == 2 and (out > 0).any() and (out[~q] == 0).all()
    # 'mean' divides by the number of query rows, 'sum' sums
    torch.testing.assert_close(gpam_loss(x, y), ref.sum() / q.sum())
    torch.testing.assert_close(gpam_loss(x, y, reduction="sum"), ref.sum())


def test_hyperparameters_and_support_mask_match_naive():
    x, y = batch(seed=2, n_nota=0)
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(3):
        mask[(y == c).nonzero()[:1]] = True  # one shot: covariance is the shrinkage target only
    kw = dict(margin=0.2, radius=1.5, shrinkage=1.0, min_var=1e-3)
    ref = naive_gpam(x, y, mask.tolist(), **kw)
    torch.testing.assert_close(gpam_loss(x, y, reduction="none", support_mask=mask, **kw), ref)
    w = torch.rand(len(y), dtype=torch.float64)
    torch.testing.assert_close(gpam_loss(x, y, sample_weight=w, support_mask=mask, **kw), (ref * w).sum() / (~mask).sum())


def test_nota_rows_use_only_the_push_term():
    x, y = batch(seed=3, n_nota=0)
    support = torch.tensor(naive_split(y))
    nota = torch.randn(1, 4, dtype=torch.float64)
    xs, ys = torch.cat([x, nota]), torch.cat([y, torch.tensor([-1])])
    out = gpam_loss(xs, ys, reduction="none")
    g = naive_gaussians([[float(v) for v in r] for r in x[support]], y[support].tolist(), 0.5, 1e-4)
    push = sum(max(0.0, r + 0.5 - d) for d, r in
               (naive_dist_range([float(v) for v in nota[0]], mu, var, 1.0) for mu, var in g.values()))
    torch.testing.assert_close(out[-1].item(), push)


def test_predict_returns_class_or_nota():
    g = torch.Generator().manual_seed(4)
    centers = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    support = centers.repeat_interleave(5, 0) + 0.5 * torch.randn(15, 3, generator=g)
    sl = torch.arange(3).repeat_interleave(5) + 7  # arbitrary class ids
    queries = torch.cat([centers + 0.1, torch.tensor([[50.0, 50.0, 50.0]])])
    m = losskit.get("gpam")
    assert m.predict(queries, support, sl).tolist() == [7, 8, 9, -1]
    # against the naive rule on random queries
    qs = torch.randn(20, 3, generator=g) * 6
    gs = naive_gaussians(support.double().tolist(), sl.tolist(), 0.5, 1e-4)
    exp = []
    for q in qs.double().tolist():
        dr = {c: naive_dist_range(q, mu, var, 1.0) for c, (mu, var) in gs.items()}
        best = min(dr, key=lambda c: dr[c][0])
        exp.append(best if dr[best][0] <= dr[best][1] else -1)
    assert gpam_predict(qs.double(), support.double(), sl).tolist() == exp
    assert -1 in exp and any(e >= 0 for e in exp)


def test_gradcheck_float64():
    x, y = batch(P=3, K=3, D=3, seed=5, n_nota=1)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: gpam_loss(e, y, margin=2.0), (x,))


def test_edge_cases_zero_with_graph():
    cases = [
        (torch.randn(4, 3, requires_grad=True), torch.full((4,), -1)),  # only NOTA rows: no prototype
        (torch.randn(4, 3, requires_grad=True), torch.arange(4)),  # one sample per class: no query
        (torch.randn(0, 3, requires_grad=True), torch.zeros(0, dtype=torch.long)),  # empty
    ]
    for x, y in cases:
        out = losskit.get("gpam")(x, y)
        assert out.item() == 0.0
        out.backward()
        assert x.grad is not None and torch.all(x.grad == 0)
    # a single class still has the pull term
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)
    torch.testing.assert_close(gpam_loss(x, y, reduction="none"), naive_gpam(x, y, naive_split(y)))


def test_huge_scale_and_bf16():
    x, y = batch(seed=6, dtype=torch.float32)
    # Gaussian distances are scale-free up to the variance floor: scaling by 1e4 changes only log terms that cancel
    a = gpam_loss(x, y, min_var=1e-12, reduction="none")
    b = gpam_loss(x * 1e4, y, min_var=1e-12 * 1e8, reduction="none")
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    xb = x.bfloat16().requires_grad_(True)
    out = losskit.get("gpam")(xb, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float())
    out.backward()
    assert torch.isfinite(xb.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(losskit.get("gpam")(x, y).float())


def test_bad_input_errors():
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, -1])
    with pytest.raises(ValueError, match=r"labels: expected -1 \(none of the above\) or a class id >= 0, got -2"):
        gpam_loss(x, torch.tensor([0, 0, 1, -2]))
    with pytest.raises(ValueError, match="support_mask: rows labelled -1"):
        gpam_loss(x, y, support_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"embeddings: expected finite values, got -inf at index \(0, 1\)"):
        gpam_loss(x.index_put((torch.tensor(0), torch.tensor(1)), torch.tensor(-float("inf"))), y)
    with pytest.raises(ValueError, match=r"support: expected finite values, got nan"):
        gpam_predict(torch.randn(2, 3), torch.full((4, 3), float("nan")), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"queries: expected shape \[Q, 3\]"):
        gpam_predict(torch.randn(2, 5), x, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="support_labels: expected class ids >= 0"):
        gpam_predict(torch.randn(2, 3), x, y)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(shrinkage=2), ValueError, r"shrinkage: expected a value in \[0.0, 1.0\], got 2.0"),
    (dict(shrinkage=-0.1), ValueError, r"shrinkage: expected a value in \[0.0, 1.0\], got -0.1"),
    (dict(min_var=0.0), ValueError, r"min_var: expected a value > 0.0, got 0.0"),
    (dict(radius=0.0), ValueError, r"radius: expected a value > 0.0, got 0.0"),
    (dict(radius=float("nan")), ValueError, r"radius: expected a finite number > 0.0, got nan"),
    (dict(margin=-0.5), ValueError, r"margin: expected a value >= 0.0, got -0.5"),
    (dict(margin=float("inf")), ValueError, r"margin: expected a finite number >= 0.0, got inf"),
])
def test_hyperparameters_checked_at_construction_and_by_the_function(kw, err, msg):
    with pytest.raises(err, match=msg):
        losskit.get("gpam", **kw)
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, -1])
    with pytest.raises(err, match=msg):
        gpam_loss(x, y, **kw)
    if "margin" not in kw:
        with pytest.raises(err, match=msg):
            gpam_predict(x, x, torch.tensor([0, 0, 1, 1]), **kw)


def test_registry_entry():
    s = losskit.spec("gpam")
    assert (s.family, s.task, s.paper.arxiv) == ("pair", "embedding", "2410.20320")
    assert losskit.get("gpam", radius=2.0).hparams == {"margin": 0.5, "radius": 2.0, "shrinkage": 0.5,
                                                       "min_var": 1e-4, "reduction": "mean"}
