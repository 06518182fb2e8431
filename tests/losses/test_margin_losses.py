"""Margin losses against naive loops written from the papers' equations,
against pytorch-metric-learning, gradcheck, registry and bad input."""

import math

import pytest
import torch

import losskit


C, D = 9, 5


# ---------------------------------------------------------------- naive refs
def _cos_matrix(x, W):
    out = [[0.0] * W.shape[0] for _ in range(x.shape[0])]
    for i in range(x.shape[0]):
        xi = x[i].tolist()
        nx = math.sqrt(sum(v * v for v in xi))
        for j in range(W.shape[0]):
            wj = W[j].tolist()
            nw = math.sqrt(sum(v * v for v in wj))
            out[i][j] = sum(a * b for a, b in zip(xi, wj)) / (nx * nw)
    return out


def _ce(logits_row, target, extra=()):
    z = list(logits_row) + list(extra)
    mx = max(z)
    return mx + math.log(sum(math.exp(v - mx) for v in z)) - logits_row[target]


def arc_psi(c, m):
    theta = math.acos(max(-1.0, min(1.0, c)))
    if theta + m > math.pi:                      # insightface / paper code: cos t - m sin m
        return c - m * math.sin(m)
    return math.cos(theta + m)


def naive_margin_loss(x, W, y, psi_fn, s):
    """-log(e^{s psi(cos_y)} / (e^{s psi(cos_y)} + sum_{j != y} e^{s cos_j})); label -1 -> 0."""
    cos = _cos_matrix(x, W)
    out = []
    for i in range(len(cos)):
        if int(y[i]) < 0:
            out.append(0.0)
            continue
        row = [s * c for c in cos[i]]
        row[int(y[i])] = s * psi_fn(cos[i][int(y[i])], i)
        out.append(_ce(row, int(y[i])))
    return torch.tensor(out, dtype=torch.float64)


def _target_cos(x, W, y):
    return torch.nn.functional.normalize(x, dim=1).mul(torch.nn.functional.normalize(W[y.clamp_min(0)], dim=1)).sum(1)


def _setup(B=6, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    if ignore:
        y[1] = -1
    return x, y


def _module(name, head="dense", **kw):
    m = losskit.get(name, num_classes=C, embedding_dim=D, reduction="none", head=head, **kw).double()
    torch.nn.init.normal_(m.weight, generator=torch.Generator().manual_seed(1))
    return m


# ------------------------------------------------------------------- values
@pytest.mark.parametrize("head", ["dense", "chunked"])
def test_arcface_cosface_normface_match_naive(head):
    x, y = _setup()
    for name, kw, psi in [
        ("arcface", {"margin": 0.5}, lambda c, i: arc_psi(c, 0.5)),
        ("arcface", {"margin": 1.2, "scale": 8.0}, lambda c, i: arc_psi(c, 1.2)),
        ("cosface", {"margin": 0.35}, lambda c, i: c - 0.35),
        ("normalized-softmax", {"scale": 10.0}, lambda c, i: c),
        ("combined-margin", {"m1": 1.0, "m2": 0.3, "m3": 0.2}, lambda c, i: arc_psi(c, 0.3) - 0.2),
        ("combined-margin", {"m1": 1.2, "m2": 0.2, "m3": 0.1},
         lambda c, i: math.cos(1.2 * math.acos(c) + 0.2) - 0.1 if 1.2 * math.acos(c) + 0.2 <= math.pi
         else c - (math.cos((math.pi - 0.2) / 1.2) + 1) - 0.1),
    ]:
        m = _module(name, head=head, chunk_size=4, **kw)
        s = kw.get("scale", 64.0)
        ref = naive_margin_loss(x, m.weight.detach(), y, psi, s)
        torch.testing.assert_close(m(x, y), ref, msg=f"{name} {kw}")


def test_arcface_theta_plus_m_beyond_pi_uses_fallback():
    # a sample pointing away from its centre: theta close to pi
    W = torch.eye(C, D, dtype=torch.float64) + 0.1
    m = _module("arcface", margin=0.5)
    m.weight.data.copy_(W)
    x = -W[:1].clone()                               # cos_y = -1 with class 0
    y = torch.tensor([0])
    psi = lambda c, i: c - 0.5 * math.sin(0.5)       # noqa: E731
    torch.testing.assert_close(m(x, y), naive_margin_loss(x, W, y, psi, 64.0))


def test_elastic_matches_naive_with_drawn_margins_and_sigma0_reduces():
    x, y = _setup(B=8)
    for name, base, mean in [("elastic-arcface", "arcface", 0.5), ("elastic-cosface", "cosface", 0.35)]:
        for plus in (False, True):
            m = _module(name, plus=plus)
            torch.manual_seed(5)
            out = m(x, y)
            torch.manual_seed(5)                      # the same draws, from the policy's phase 1
            drawn = m.policy.prepare(_target_cos(x, m.weight.detach(), y), y >= 0).margin
            assert drawn.shape == (8,) and drawn[1] == 0
            mi = {i: float(drawn[i]) for i in range(8)}
            if base == "arcface":
                psi = lambda c, i: arc_psi(c, mi[i])  # noqa: E731
            else:
                psi = lambda c, i: c - mi[i]  # noqa: E731
            torch.testing.assert_close(out, naive_margin_loss(x, m.weight.detach(), y, psi, 64.0))
            # sigma = 0 is exactly the fixed-margin loss
            m0 = _module(name, std=0.0, plus=plus)
            b = _module(base, margin=mean)
            torch.testing.assert_close(m0(x, y), b(x, y), rtol=0, atol=0)


def test_elastic_plus_gives_larger_margins_to_smaller_cosines():
    x, y = _setup(B=32, ignore=False)
    for name in ("elastic-arcface", "elastic-cosface"):
        m = _module(name, plus=True, std=0.1)
        cos_y = _target_cos(x, m.weight.detach(), y)
        marg = m.policy.prepare(cos_y, y >= 0).margin
        order = torch.argsort(cos_y)
        assert bool((marg[order][1:] <= marg[order][:-1]).all())
        assert marg.std() > 0.01


def test_unpg_matches_naive():
    x, y = _setup(B=7)
    for base, whisker in [("arcface", 1.5), ("cosface", 0.2)]:
        m = _module("unpg", base=base, whisker=whisker, margin=0.4)
        xn = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in x.tolist()]
        sims = sorted(sum(a * b for a, b in zip(xn[i], xn[j]))
                      for i in range(7) for j in range(i + 1, 7)
                      if y[i] != y[j] and y[i] >= 0 and y[j] >= 0)
        L = len(sims)
        q1, q3 = sims[int(math.floor(0.25 * L))], sims[int(math.floor(0.75 * L))]
        iqr = q3 - q1
        kept = [v for v in sims if q1 - whisker * iqr <= v <= q3 + whisker * iqr]
        assert len(kept) < L or whisker > 1       # the narrow whisker really filters
        cos = _cos_matrix(x, m.weight.detach())
        ref = []
        for i in range(7):
            if y[i] < 0:
                ref.append(0.0)
                continue
            row = [64 * c for c in cos[i]]
            c = cos[i][int(y[i])]
            row[int(y[i])] = 64 * (arc_psi(c, 0.4) if base == "arcface" else c - 0.4)
            ref.append(_ce(row, int(y[i]), [64 * v for v in kept]))
        torch.testing.assert_close(m(x, y), torch.tensor(ref, dtype=torch.float64))


def test_cfcd_matches_paper_and_puts_median_probability_at_alpha():
    g = torch.Generator().manual_seed(3)
    B, Cc = 9, 40
    for alpha in (0.02, 0.3):
        m = losskit.get("cfcd", num_classes=Cc, embedding_dim=D, alpha=alpha, reduction="none").double()
        torch.nn.init.normal_(m.weight, generator=g)
        x = torch.randn(B, D, generator=g, dtype=torch.float64)
        y = torch.randint(0, Cc, (B,), generator=g)
        x[:5] = m.weight.detach()[y[:5]] + 0.5 * x[:5]  # most samples near their centre: positive margin
        out = m(x, y)
        cos = torch.tensor(_cos_matrix(x, m.weight.detach()), dtype=torch.float64)
        cy = cos[torch.arange(B), y]
        med = sorted(cy.tolist())[(B - 1) // 2]
        k = cy.tolist().index(med)
        s = max(32.0, math.log(9999999 * (1 - alpha) / alpha) / (1 - med))
        bbar = sum(math.exp(s * cos[k, j]) for j in range(Cc) if j != y[k])
        mar = max(0.0, med - math.log(bbar * alpha / (1 - alpha)) / s)
        assert m.last_scale == pytest.approx(s, rel=1e-9)
        assert m.last_margin == pytest.approx(mar, rel=1e-9, abs=1e-12)
        assert mar > 0
        ref = naive_margin_loss(x, m.weight.detach(), y, lambda c, i: c - mar, s)
        torch.testing.assert_close(out, ref)
        # the median sample's target probability is exactly alpha
        assert math.exp(-float(out.detach()[k])) == pytest.approx(alpha, rel=1e-9)
        # eval: m = 0
        m.eval()
        ref0 = naive_margin_loss(x, m.weight.detach(), y, lambda c, i: c, s)
        torch.testing.assert_close(m(x, y), ref0)
        assert m.last_margin == 0.0


def test_cfcd_mean_bbar_and_scale_floor():
    x, y = _setup(ignore=False)
    m = _module("cfcd", bbar="mean", alpha=0.4)
    m(x, y)
    assert m.last_scale >= 32.0
    mc = _module("cfcd", bbar="mean", alpha=0.4, head="chunked", chunk_size=2)
    torch.testing.assert_close(mc(x, y), m(x, y))


# -------------------------------------------------------------- reductions
def test_reductions_and_sample_weight():
    x, y = _setup()
    w = torch.rand(6, dtype=torch.float64)
    m = _module("arcface")
    per = m(x, y)
    assert per.shape == (6,) and per[1] == 0
    torch.testing.assert_close(m(x, y, reduction="sum", sample_weight=w), (per * w).sum())
    m.reduction = "mean"
    torch.testing.assert_close(m(x, y, sample_weight=w), (per * w).sum() / 6)
    torch.testing.assert_close(m(x, y), per.mean())


# --------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("name,kw", [("arcface", {"scale": 4.0}), ("cosface", {"scale": 4.0}),
                                     ("elastic-arcface", {"scale": 4.0, "plus": True}),
                                     ("cfcd", {"alpha": 0.3}), ("unpg", {"scale": 4.0}),
                                     ("normalized-softmax", {"scale": 3.0})])
@pytest.mark.parametrize("head", ["dense", "chunked"])
def test_gradcheck_float64(name, kw, head):
    x, y = _setup(B=5)
    m = _module(name, head=head, chunk_size=4, **kw)
    m.reduction = "mean"
    W = m.weight

    def f(xx, ww):
        with torch.no_grad():
            W.copy_(ww)
        torch.manual_seed(0)
        return torch.func.functional_call(m, {"weight": ww}, (xx, y))

    xg = x.clone().requires_grad_(True)
    wg = W.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (xg, wg), eps=1e-6, atol=1e-5, fast_mode=True)


def test_arcface_gradient_finite_at_cos_plus_minus_one():
    from losskit.functional.margins import arcface_target
    c = torch.tensor([1.0, -1.0, 0.3], dtype=torch.float64, requires_grad=True)
    arcface_target(c, 0.5).sum().backward()
    assert torch.isfinite(c.grad).all()
    # straight-through: forward value of ArcFace, gradient of plain cosine
    c2 = torch.tensor([0.3, 0.8], dtype=torch.float64, requires_grad=True)
    out = arcface_target(c2, 0.5, straight_through=True)
    torch.testing.assert_close(out, arcface_target(c2.detach(), 0.5))
    out.sum().backward()
    torch.testing.assert_close(c2.grad, torch.ones(2, dtype=torch.float64))


# ------------------------------------------------------ pytorch-metric-learning
def test_agreement_with_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(0)
    B, Cc, Dd = 16, 30, 8
    x = torch.randn(B, Dd)
    y = torch.randint(0, Cc, (B,))
    for ours, theirs in [
        (losskit.get("arcface", num_classes=Cc, embedding_dim=Dd, scale=64.0, margin=0.5),
         pml.ArcFaceLoss(Cc, Dd, margin=math.degrees(0.5), scale=64)),   # PML: degrees, W is [D, C]
        (losskit.get("cosface", num_classes=Cc, embedding_dim=Dd, scale=30.0, margin=0.2),
         pml.CosFaceLoss(Cc, Dd, margin=0.2, scale=30)),
    ]:
        theirs.W.data.copy_(ours.weight.detach().t())
        x1 = x.clone().requires_grad_(True)
        x2 = x.clone().requires_grad_(True)
        l1, l2 = ours(x1, y), theirs(x2, y)
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
        l1.backward()
        l2.backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.weight.grad, theirs.W.grad.t(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ registry
def test_registry_entries():
    names = losskit.names(family="margin")
    for n in ("arcface", "cosface", "elastic-arcface", "elastic-cosface", "cfcd", "unpg", "normalized-softmax"):
        assert n in names
        sp = losskit.spec(n)
        assert sp.task == "embedding" and sp.paper is not None and sp.paper.arxiv
        assert "num_classes" in sp.required and "embedding_dim" in sp.required
    assert losskit.spec("arcface").hparams["margin"] == 0.5
    assert losskit.spec("arcface").hparams["scale"] == 64.0
    assert losskit.spec("cosface").hparams["margin"] == 0.35
    m = losskit.get("arcface", num_classes=10, embedding_dim=4, scale=64.0, margin=0.5)
    assert m.weight.shape == (10, 4)
    out = m(torch.randn(3, 4), torch.tensor([0, 1, 9]))
    assert out.dim() == 0 and torch.isfinite(out)


# ------------------------------------------------------------------ bad input
def test_bad_input_errors():
    m = losskit.get("arcface", num_classes=4, embedding_dim=3)
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        m(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels.*\\[-1, 3\\]"):
        m(torch.randn(2, 3), torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="labels.*-1, 3"):
        m(torch.randn(2, 3), torch.tensor([0, -2]))
    with pytest.raises(ValueError, match="labels: expected shape \\[2\\]"):
        m(torch.randn(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="labels: expected an integer"):
        m(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="embeddings: expected a floating"):
        m(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sample_weight"):
        m(torch.randn(2, 3), torch.tensor([0, 1]), sample_weight=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="embeddings: expected device"):
        m(torch.randn(2, 3, device="meta"), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        losskit.get("arcface", num_classes=4, embedding_dim=3, reduction="avg")
    with pytest.raises(ValueError, match="head"):
        losskit.get("arcface", num_classes=4, embedding_dim=3, head="fast")
    with pytest.raises(ValueError, match="margin"):
        losskit.get("arcface", num_classes=4, embedding_dim=3, margin=4.0)
    with pytest.raises(ValueError, match="scale"):
        losskit.get("cosface", num_classes=4, embedding_dim=3, scale=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        losskit.get("cfcd", num_classes=4, embedding_dim=3, alpha=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        losskit.get("arcface", num_classes=0, embedding_dim=3)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        losskit.get("arcface", num_classes=4, embedding_dim=3, head="sharded")
    with pytest.raises(ValueError, match="base"):
        losskit.get("unpg", num_classes=4, embedding_dim=3, base="sphereface")


# ------------------------------------------------------- validation (once)
BAD_HEADS = ["dense", "chunked", "fused", "sampled", "auto"]


@pytest.mark.parametrize("head", BAD_HEADS)
@pytest.mark.parametrize("name", ["arcface", "cfcd", "unpg", "elastic-arcface", "elastic-cosface"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_refused_on_every_head(name, head, bad):
    m = losskit.get(name, num_classes=C, embedding_dim=D, head=head)
    x = torch.randn(4, D, requires_grad=True)
    with torch.no_grad():
        x[2, 1] = bad
    with pytest.raises(ValueError, match=r"embeddings: expected finite values, got (nan|inf) at index \(2, 1\)"):
        m(x, torch.tensor([0, 1, 2, 3]))


def test_non_finite_embeddings_pass_unchecked_with_tensor_checks_off():
    m = losskit.get("arcface", num_classes=C, embedding_dim=D, head="dense")
    x = torch.randn(4, D)
    x[0, 0] = float("nan")
    with losskit.tensor_checks(False):
        assert torch.isnan(m(x, torch.tensor([0, 1, 2, 3])))


@pytest.mark.parametrize("name,kw,err,match", [
    ("combined-margin", {"m1": 0.0}, ValueError, r"m1: expected a value > 0.0, got 0.0"),
    ("combined-margin", {"m1": -1.0}, ValueError, r"m1: expected a value > 0.0, got -1.0"),
    ("combined-margin", {"m2": float("nan")}, ValueError, r"m2: expected a finite number in \[0.0, 3.14"),
    ("combined-margin", {"m3": float("inf")}, ValueError, r"m3: expected a finite number"),
    ("elastic-arcface", {"mean": float("nan")}, ValueError, r"mean: expected a finite number in \[0.0, 3.14"),
    ("elastic-arcface", {"mean": math.pi}, ValueError, r"mean: expected a value in \[0.0, 3.14\d*\), got 3.14"),
    ("elastic-cosface", {"mean": 4.0}, ValueError, r"mean: expected a value in \[0.0, 3.14"),
    ("elastic-cosface", {"std": -0.1}, ValueError, r"std: expected a value >= 0.0, got -0.1"),
    ("elastic-arcface", {"plus": 1}, TypeError, r"plus: expected True or False"),
    ("cfcd", {"min_scale": 0.0}, ValueError, r"min_scale: expected a value > 0.0, got 0.0"),
    ("cfcd", {"alpha": 1.0}, ValueError, r"alpha: expected a value in \(0.0, 1.0\), got 1.0"),
    ("cfcd", {"bbar": "max"}, ValueError, r"bbar: expected one of \('median', 'mean'\), got 'max'"),
    ("unpg", {"whisker": float("nan")}, ValueError, r"whisker: expected a finite number >= 0.0, got nan"),
    ("unpg", {"base": "sphereface"}, ValueError, r"base: expected one of \('arcface', 'cosface'\)"),
    ("arcface", {"margin": -0.1}, ValueError, r"margin: expected a value in \[0.0, 3.14"),
    ("arcface", {"scale": float("nan")}, ValueError, r"scale: expected a finite number > 0.0, got nan"),
    ("cosface", {"margin": float("inf")}, ValueError, r"margin: expected a finite number >= 0.0, got inf"),
    ("arcface", {"chunk_size": 0}, ValueError, r"chunk_size: expected an integer >= 1, got 0"),
    ("arcface", {"sample_rate": 0.0}, ValueError, r"sample_rate: expected a value in \(0.0, 1.0\], got 0.0"),
    ("arcface", {"head": "fast"}, ValueError, r"head: expected one of \('auto', 'dense'"),
    ("arcface", {"num_classes": 0}, ValueError, r"num_classes: expected an integer >= 1, got 0"),
    ("arcface", {"embedding_dim": 2.5}, TypeError, r"embedding_dim: expected an integer >= 1, got float 2.5"),
])
def test_hyperparameters_checked_at_construction(name, kw, err, match):
    args = {"num_classes": C, "embedding_dim": D, **kw}
    with pytest.raises(err, match=match):
        losskit.get(name, **args)


def test_combined_target_refuses_m1_zero():
    from losskit.functional.margins import combined_target
    with pytest.raises(ValueError, match="m1: expected a value > 0.0, got 0.0"):
        combined_target(torch.tensor([0.5]), m1=0.0)


def test_registered_margin_losses_read_hparams():
    m = losskit.get("elastic-cosface", num_classes=C, embedding_dim=D, plus=True, head="chunked")
    assert m.hparams["mean"] == 0.35 and m.hparams["std"] is None and m.hparams["head"] == "chunked"
    assert m.policy.std == 0.025 and m.policy.kind == "cos" and m.head == "chunked"
    u = losskit.get("unpg", num_classes=C, embedding_dim=D, base="cosface", whisker=0.5)
    assert u.policy.whisker == 0.5 and type(u.policy.base).__name__ == "CosMargin"
    for n in losskit.names(family="margin"):
        s = losskit.spec(n)
        obj = losskit.get(n, num_classes=C, embedding_dim=D)
        assert set(obj.hparams) == set(s.hparams) | set(s.required), n


# ------------------------------------------------ no state between two calls
def test_policies_keep_no_batch_state_between_calls():
    from losskit.heads.margin_spec import CFCDMargin, ElasticMargin
    x, y = _setup(B=8)
    for name, kw in [("elastic-arcface", {"plus": True}), ("elastic-cosface", {}), ("cfcd", {"alpha": 0.1}),
                     ("arcface", {}), ("unpg", {})]:
        m = _module(name, **kw)
        before = dict(vars(m.policy))
        m(x, y)
        after = {k: v for k, v in vars(m.policy).items() if k != "_last"}   # CFCD's read-only diagnostic
        assert after == {k: v for k, v in before.items() if k != "_last"}, name
    # interleaved batches: the target of batch A does not see batch B's draw
    pol = ElasticMargin("arc", 16.0, 0.5, 0.2)
    c = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    a, b = pol.prepare(c), pol.prepare(c)
    assert not torch.equal(a.margin, b.margin)
    from losskit.functional.margins import arcface_target
    torch.testing.assert_close(pol.target(c, a), arcface_target(c, a.margin))
    cf = CFCDMargin(alpha=0.1)
    ba = cf.prepare(c, nontarget_lse=lambda rows, s: torch.zeros(len(rows), dtype=torch.float64))
    cf.prepare(c * 0.5, nontarget_lse=lambda rows, s: torch.full((len(rows),), 5.0, dtype=torch.float64))
    torch.testing.assert_close(cf.target(c, ba), c - ba.margin)
    assert cf.last_margin != ba.margin


@pytest.mark.parametrize("head", ["dense", "chunked", "fused", "sampled", "auto"])
def test_one_reduction_on_every_head(head):
    """'none' is [B] aligned with the rows (0 on the ignored row); 'mean' divides by B, ignored rows included."""
    x, y = _setup()
    w = torch.rand(6, dtype=torch.float64)
    kw = {"sample_rate": 1.0} if head == "sampled" else {}
    m = _module("arcface", head=head, chunk_size=4, **kw)
    ref = _module("arcface", head="dense")(x, y)
    xx = x.clone().requires_grad_(True)
    per = m(xx, y, reduction="none")
    assert per.shape == (6,) and per[1] == 0
    torch.testing.assert_close(per, ref)
    torch.testing.assert_close(m(xx, y, reduction="mean", sample_weight=w), (ref * w).sum() / 6)
    torch.testing.assert_close(m(xx, y, reduction="sum", sample_weight=w), (ref * w).sum())
    torch.testing.assert_close(m(xx, y, reduction="none", sample_weight=w), ref * w)
