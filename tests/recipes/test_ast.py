"""AST / MTT against naive references written from the paper's equations."""

import math

import pytest
import torch
from torch import nn

import losskit
from losskit.recipes.distillation import (ParamLayout, balanced_inner_weight, clipping_coefficient,
                                          flatten_params, input_gradient_penalty, kmeans, perturb_weights,
                                          representative_init, run_ast, run_mtt, train_expert)


class Tiny(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, c)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def data(n=30, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(c).repeat_interleave(n // c)
    x = torch.randn(n, 1, 4, 4, generator=g) + y[:, None, None, None].float()
    return x, y


def test_clipping_coefficient_and_balanced_weight():
    assert [clipping_coefficient(e) for e in (0, 1, 9, 10, 30)] == pytest.approx([0.5, 0.55, 0.95, 1.0, 1.0])
    M = 20
    for s in range(M + 1):
        ref = math.log(s - 10 + 8) / math.log(5) if s >= 10 else 1 / (math.log(10 - s + 8) / math.log(5))
        assert balanced_inner_weight(s, M) == pytest.approx(ref)
    assert balanced_inner_weight(7, 15) == pytest.approx(math.log(8, 5))  # M//2 = 7: the multiplying branch
    with pytest.raises(ValueError, match="start_epoch"):
        balanced_inner_weight(21, 20)


def test_gradient_penalty_matches_a_per_pixel_loop():
    torch.manual_seed(0)
    m = Tiny().double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    got = input_gradient_penalty(m, x)
    terms = []
    for b in range(2):
        xb = x[b:b + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(m(xb).sum(), xb)
        for h in range(4):
            for w in range(4):
                norm = math.sqrt(sum(float(g[0, ch, h, w]) ** 2 for ch in range(1)))
                terms.append((norm - 1) ** 2)
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-10)
    w = m.fc.weight.detach().clone().requires_grad_(True)
    assert float(_gp_with(m, x, w)) == pytest.approx(float(got))
    assert torch.autograd.gradcheck(lambda wt: _gp_with(m, x, wt), (w,))
    bf = input_gradient_penalty(Tiny().bfloat16(), x.bfloat16())
    assert torch.isfinite(bf)


def _gp_with(m, x, wt):
    x = x.detach().requires_grad_(True)
    out = torch.func.functional_call(m, {"fc.weight": wt}, (x,))
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return ((g.norm(dim=1) - 1) ** 2).mean()


def test_expert_trajectory_and_smooth_training():
    x, y = data()
    torch.manual_seed(0)
    m = Tiny()
    traj = train_expert(m, x, y, epochs=3, lr=0.1, batch_size=10)
    assert len(traj) == 4 and torch.equal(traj[-1], flatten_params(m))
    assert not torch.equal(traj[0], traj[1])
    torch.manual_seed(0)
    plain = train_expert(Tiny(), x, y, epochs=3, lr=0.1, batch_size=10, clipping=False, gradient_penalty=0)
    assert not torch.allclose(plain[1], traj[1])  # the clipping factor 0.5 and the penalty change the first epoch


def test_perturbation_touches_conv_weights_only_with_unit_frobenius_direction():
    torch.manual_seed(0)
    m = Tiny()
    lay = ParamLayout.of(m)
    flat = flatten_params(m)
    new = perturb_weights(flat, lay, alpha=0.5, generator=torch.Generator().manual_seed(1))
    a, b = lay.unflatten(flat), lay.unflatten(new)
    for k in a:
        if a[k].dim() == 4:
            rel = (b[k] - a[k]) / a[k]
            assert float(rel.norm()) == pytest.approx(0.5, rel=1e-5)
        else:
            assert torch.equal(a[k], b[k])


def test_kmeans_and_representative_init_also_below_ten_images_per_class():
    g = torch.Generator().manual_seed(0)
    pts = torch.cat([torch.randn(20, 2, generator=g) * 0.1 + c for c in (torch.tensor([0., 0.]),
                                                                         torch.tensor([5., 5.]))])
    cen, assign = kmeans(pts, 2)
    assert len(set(assign[:20].tolist())) == 1 and len(set(assign[20:].tolist())) == 1
    assert assign[0] != assign[20]
    x, y = data(n=36)
    torch.manual_seed(0)
    expert = Tiny()
    for ipc in (1, 3, 12):
        idx = representative_init(expert, x, y, ipc, 3)
        assert idx.numel() == 3 * ipc and idx.unique().numel() == 3 * ipc
        assert torch.equal(y[idx], torch.arange(3).repeat_interleave(ipc))
    with pytest.raises(ValueError, match="ipc: expected at most 12 images per class"):
        representative_init(expert, x, y, 13, 3)


def naive_matching_loss(model, traj, images, labels, lr, steps, E, M, momentum, balanced, adaptive):
    """One iteration from start epoch 0 (M=1), written out step by step."""
    lay = ParamLayout.of(model)
    start, target = traj[0], traj[E]
    w = 1.0
    if balanced:
        half = M // 2
        w = math.log(0 - half + 8, 5) if 0 >= half else 1 / math.log(half - 0 + 8, 5)
    theta = start.clone().requires_grad_(True)
    vel = None
    loss_mid = 0.0
    for t in range(steps):
        out = torch.func.functional_call(model, lay.unflatten(theta), (images,))
        ce = w * nn.functional.cross_entropy(out, labels)
        (g,) = torch.autograd.grad(ce, theta, create_graph=True)
        vel = g if vel is None else momentum * vel + g
        theta = theta - lr * vel
        for i in range(1, E):
            if adaptive and t + 1 == (steps // E) * i:
                d = ((theta - traj[i]) ** 2).sum() / ((start - traj[i]) ** 2).sum()
                loss_mid = loss_mid + (i / E) * d
    return ((theta - target) ** 2).sum() / ((start - target) ** 2).sum() + loss_mid


@pytest.mark.parametrize("ast", [True, False])
def test_one_iteration_matches_the_naive_unrolled_loss_and_gradient(ast):
    x, y = data()
    torch.manual_seed(0)
    m = Tiny().double()
    x = x.double()
    traj = train_expert(m, x, y, epochs=3, lr=0.1, batch_size=10)
    torch.manual_seed(1)
    student = Tiny().double()
    common = dict(ipc=2, iterations=1, syn_steps=4, expert_epochs=2, max_start_epoch=1, lr_img=10.0, lr_lr=0.0,
                  lr_init=0.05, seed=3)
    if ast:
        res = run_ast(student, [traj], x, y, momentum=0.9, balanced_loss=True, intermediate="adaptive",
                      weight_perturb=0.0, init="real", **common)
    else:
        res = run_mtt(student, [traj], x, y, **common)
    # the same initial images: the seeded random real initialisation
    gen = torch.Generator().manual_seed(3)
    init = torch.cat([(y == c).nonzero().flatten()[torch.randperm(10, generator=gen)[:2]] for c in range(3)])
    img0 = x[init].clone().requires_grad_(True)
    labels = torch.arange(3).repeat_interleave(2)
    ref = naive_matching_loss(student, traj, img0, labels, 0.05, 4, 2, 1, 0.9 if ast else 0.0, ast, ast)
    assert res.losses[0] == pytest.approx(float(ref), rel=1e-9)
    (gi,) = torch.autograd.grad(ref, img0)
    assert torch.allclose((img0.detach() - res.images) / 10.0, gi, rtol=1e-6, atol=1e-10)


def test_distillation_lowers_the_matching_loss_and_learns_the_step():
    x, y = data(n=60)
    torch.manual_seed(0)
    trajs = [train_expert(Tiny(), x, y, epochs=5, lr=0.1, batch_size=20, seed=s) for s in range(2)]
    torch.manual_seed(0)
    expert = Tiny()
    res = run_ast(Tiny(), trajs, x, y, ipc=2, iterations=40, syn_steps=5, expert_epochs=2, max_start_epoch=3,
                  lr_img=1.0, lr_lr=1e-4, init="representative", init_model=expert)
    first, last = sum(res.losses[:8]) / 8, sum(res.losses[-8:]) / 8
    assert last < first and res.lr != 0.01 and res.images.shape == (6, 1, 4, 4)


def test_registered_and_bad_input():
    assert {"ast", "mtt"} <= set(losskit.names(kind="recipe", family="unlearning"))
    x, y = data()
    traj = [train_expert(Tiny(), x, y, epochs=2, lr=0.1)]
    with pytest.raises(ValueError, match="ipc: expected at most 10 images per class"):
        run_mtt(Tiny(), traj, x, y, ipc=11, iterations=1, max_start_epoch=1, expert_epochs=1)
    with pytest.raises(ValueError, match="at least max_start_epoch \\+ expert_epochs \\+ 1 = 13"):
        run_mtt(Tiny(), traj, x, y, ipc=1, iterations=1)
    with pytest.raises(ValueError, match="init='representative' needs init_model"):
        run_ast(Tiny(), traj, x, y, ipc=1, iterations=1, max_start_epoch=1, expert_epochs=1)
    with pytest.raises(ValueError, match="intermediate"):
        run_ast(Tiny(), traj, x, y, ipc=1, iterations=1, max_start_epoch=1, expert_epochs=1, intermediate="x")
