"""MVP on Si-Blurry (issue 12, item 2): the stream's rules, the closed-form
gradient-similarity score against per-sample autograd, AFS, the logit mask,
the official batch multiplier, and the recipe end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import losskit
from losskit.data.streams import si_blurry_stream
from losskit.functional.mvp import adaptive_feature_scale, gradient_similarity_scores, masked_logits, mvp_loss
from losskit.metrics.stream import AnytimeAccuracy, a_auc
from losskit.recipes.prompt_vit import MVPModel, TinyViT


def _labels(c=20, n=30):
    return torch.arange(c).repeat_interleave(n)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_si_blurry_stream_rules(seed):
    y = _labels()
    st = si_blurry_stream(y, 4, disjoint_ratio=0.5, blurry_ratio=0.2, seed=seed)
    order = st.order
    assert sorted(order.tolist()) == list(range(len(y)))          # a single pass over every sample
    dis = [c for t in st.disjoint_classes for c in t]
    blu = [c for t in st.blurry_classes for c in t]
    assert len(dis) == 10 and len(blu) == 10 and not set(dis) & set(blu)
    for t, idx in enumerate(st.tasks):
        cls = set(y[idx].tolist())
        assert set(st.disjoint_classes[t]) <= cls
        for c in cls:  # a disjoint class appears only in its own task
            if c in dis:
                assert c in st.disjoint_classes[t]
    assert st.blurred == int(10 * 30 * 0.2)
    # blurred samples: blurry-class samples streamed outside their class's task
    home = {c: t for t, cs in enumerate(st.blurry_classes) for c in cs}
    away = sum(int(home[c] != t) for t, idx in enumerate(st.tasks) for c in y[idx].tolist() if c in home)
    assert 0 < away <= st.blurred
    assert torch.equal(si_blurry_stream(y, 4, 0.5, 0.2, seed=seed).order, order)   # seeded
    assert len({len(t) for t in st.tasks}) > 1                     # tasks of random size


def test_stream_that_cannot_produce_the_task_count_is_refused():
    y = _labels(6, 5)
    with pytest.raises(ValueError, match="num_tasks.*at most the number of classes"):
        si_blurry_stream(y, 7)
    bad = None
    for s in range(200):
        try:
            si_blurry_stream(y, 5, seed=s)
        except ValueError as e:
            bad = str(e)
            break
    assert bad is not None and "cannot produce 5 tasks" in bad and "seed" in bad


def _head_case(b=7, d=5, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, d, generator=g, dtype=torch.float64)
    W = torch.randn(c, d, generator=g, dtype=torch.float64)
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    M = torch.randn(b, c, generator=g, dtype=torch.float64)
    seen = torch.tensor([True, True, True, False, True, False])
    y = torch.tensor([0, 1, 2, 4, 0, 1, 2])[:b]
    return f, W, bias, M, seen, y


def test_gradient_similarity_closed_form_equals_per_sample_autograd():
    """As the official _compute_grads: per-sample backward of CE_i on the head, row y_i; batch-mean backward."""
    f, W, bias, M, seen, y = _head_case()
    Wp = W.clone().requires_grad_(True)
    z = (F.linear(f, Wp, bias) * (2 * torch.sigmoid(M))).masked_fill(~seen, float("-inf"))
    ce = F.cross_entropy(z, y, reduction="none")
    g_i = torch.stack([torch.autograd.grad(ce[i], Wp, retain_graph=True)[0][y[i]] for i in range(len(y))])
    G = torch.autograd.grad(ce.mean(), Wp)[0][y]
    ref = torch.stack([1 - F.cosine_similarity(g_i[i], G[i], dim=0) for i in range(len(y))])
    torch.testing.assert_close(gradient_similarity_scores(f, W, bias, y, M, seen), ref)


def test_mvp_loss_rows_from_the_equations_and_the_official_batch_multiplier():
    f, W, bias, M, seen, y = _head_case()
    a, gm, mg = 0.5, 2.0, 0.5
    s = gradient_similarity_scores(f, W, bias, y, M, seen)
    f, W = f.clone().requires_grad_(True), W.clone().requires_grad_(True)
    rows = []
    for i in range(len(y)):
        scale = (1 - F.cosine_similarity(W[y[i]], f[i], dim=0) + mg).detach()  # the scale is detached
        zi = (W @ (f[i] / scale) + bias) * 2 * torch.sigmoid(M[i])
        zi = zi.masked_fill(~seen, float("-inf"))
        ce = -torch.log_softmax(zi, 0)[y[i]]
        rows.append((1 - a) * ce + a * s[i] ** gm * ce)
    ref = torch.stack(rows)
    g_ref = torch.autograd.grad(ref.sum(), (f, W))
    got = mvp_loss(f, y, W, bias, M, seen, a, gm, mg, reduction="none")
    torch.testing.assert_close(got, ref)
    for a_, b_ in zip(torch.autograd.grad(got.sum(), (f, W)), g_ref):  # s_i and the AFS scale are constants
        torch.testing.assert_close(a_, b_)
    f, W = f.detach(), W.detach()
    # official: loss = nll_loss(mean); (1 - a) * loss + a * s^g * loss; .mean()
    z = masked_logits(F.linear(f / adaptive_feature_scale(f, W, y, mg)[:, None], W, bias), M, seen)
    ce_mean = F.nll_loss(F.log_softmax(z, 1), y)
    official = ((1 - a) * ce_mean + a * (s ** gm) * ce_mean).mean()
    assert mvp_loss(f, y, W, bias, M, seen, gsf_mode="batch").item() == pytest.approx(official.item())
    assert mvp_loss(f, y, W, bias, M, seen).item() != pytest.approx(official.item())


def test_mask_multiplies_before_minus_inf_and_gradcheck():
    f, W, bias, M, seen, y = _head_case()
    z = masked_logits(F.linear(f, W, bias), M, seen)
    assert torch.isinf(z[:, ~seen]).all() and torch.isfinite(z[:, seen]).all()
    torch.testing.assert_close(z[:, seen], (F.linear(f, W, bias) * 2 * torch.sigmoid(M))[:, seen])
    inputs = (f.clone().requires_grad_(True), W.clone().requires_grad_(True), M.clone().requires_grad_(True))
    # the full derivative exists without the detached statistics (AFS scale, GSF score)
    assert torch.autograd.gradcheck(lambda a, b, c: mvp_loss(a, y, b, bias, c, seen, afs=False, gsf=False,
                                                            reduction="none"), inputs)


def test_bf16_mvp_loss_has_no_nan():
    f, W, bias, M, seen, y = _head_case()
    out = mvp_loss(f.bfloat16(), y, W.bfloat16(), bias.bfloat16(), M.bfloat16(), seen)
    assert torch.isfinite(out)


def test_mvp_model_key_choice_counts_and_frozen_backbone():
    torch.manual_seed(0)
    bb = TinyViT(image_size=8, patch_size=4, dim=16, depth=3, heads=2, num_classes=3)
    m = MVPModel(bb, 6, num_prompts=3)
    x = torch.rand(10, 1, 8, 8)
    m.train()
    f, mask, key_loss = m(x)
    assert f.shape == (10, 16) and mask.shape == (10, 6) and m.count.sum() == 10
    with torch.no_grad():
        q = bb.features(x)
        d = 1 - F.cosine_similarity(q[:, None], m.key[None], dim=-1)
        before = m.count.clone()
        _, mask2, _ = m(x)
        k = (d * (before + 1)).argmin(1)
    torch.testing.assert_close(mask2, m.mask[k])
    (f.sum() + key_loss).backward()
    assert all(p.grad is None for p in bb.parameters())
    assert m.e_prompts.grad is not None and m.key.grad is not None


def test_anytime_metrics():
    c = AnytimeAccuracy()
    for i, a in enumerate([0.2, 0.4, 0.6]):
        c.record(100 * (i + 1), a)
    c.end_task(0.5)
    assert c.a_auc == pytest.approx(0.4) and c.a_last == 0.5
    with pytest.raises(ValueError, match="at least one"):
        a_auc([])


@pytest.mark.parametrize("method", ["mvp", "er", "finetune"])
def test_online_recipe_runs(method):
    torch.manual_seed(0)
    y = torch.arange(8).repeat_interleave(12)
    proto = torch.rand(8, 1, 8, 8)
    x = proto[y] + 0.1 * torch.rand(len(y), 1, 8, 8)
    yt = torch.arange(8).repeat_interleave(3)
    xt = proto[yt] + 0.1 * torch.rand(len(yt), 1, 8, 8)
    st = si_blurry_stream(y, 3, seed=3)
    bb = TinyViT(image_size=8, patch_size=4, dim=16, depth=3, heads=2, num_classes=8)
    opt = torch.optim.Adam(bb.parameters(), lr=1e-2)  # a short pretraining, on other draws of the same classes
    xp = proto[y] + 0.1 * torch.rand(len(y), 1, 8, 8)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(bb(xp), y).backward()
        opt.step()
    res = losskit.get("mvp", method=method, eval_period=16, online_iter=2, memory_size=20, lr=1e-2)(
        bb, x, y, xt, yt, st)
    assert 0 <= res.a_auc <= 1 and 0 <= res.a_last <= 1 and len(res.curve.task_end) == 3
    assert res.extra["seen_classes"] == 8
    assert res.a_auc > 0.15  # above chance over the seen classes (1/8 once all are seen) on separable classes
    with pytest.raises(ValueError, match="eval_period"):
        losskit.get("mvp", method=method, eval_period=10_000, online_iter=1)(bb, x, y, xt, yt, st)
