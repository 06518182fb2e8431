"""AST: dataset distillation by matching smooth, high-quality expert trajectories.

Shen et al., "Efficient Dataset Distillation through Alignment with Smooth
and High-Quality Expert Trajectories" (2023, arXiv:2310.10541); official code
shenjiyuan123/AST-Alignment-with-Smooth-Expert (a fork of MTT:
``buffer.py``/``utils.py`` for the experts, ``distill.py`` for the rest).
Built on trajectory matching, MTT: Cazenavette et al., "Dataset
Distillation by Matching Training Trajectories" (CVPR 2022, arXiv:2203.11932).

Trajectory matching learns ``ipc`` synthetic images per class.  Each
iteration draws an expert and a start epoch ``s < max_start_epoch``, starts a
student at the expert's parameters ``theta*_s``, takes ``syn_steps`` SGD steps
on the synthetic images (with a learnable step size ``alpha``) and minimises

    L = ||theta_N - theta*_{s+E}||^2 / ||theta*_s - theta*_{s+E}||^2

through the unrolled steps, in the images and ``alpha``.  AST's additions
(each a flag here; all off gives MTT):

* **smooth experts** (:func:`train_expert`): the "clipping loss" scales the
  cross-entropy by ``c_e = 0.5 + 0.05 e`` for epochs ``e < 10`` (then 1), and
  a gradient penalty ``gp * mean_{b,h,w} (||d(sum_j f_j(x))/dx||_2 - 1)^2``
  (norm over channels, ``gp = 2``) is added;
* **momentum** 0.9 in the student's inner SGD;
* **balanced inner loss**: for ``s >= M/2`` the inner CE is multiplied by
  ``log_5(s - M/2 + 8)``, otherwise divided by ``log_5(M/2 - s + 8)``
  (``M = max_start_epoch``, integer halves as in the code);
* **intermediate matching**: after student step ``(syn_steps // E) i`` the
  normalised distance to ``theta*_{s+i}``, ``i = 1..E-1``, weighted
  ``i / E`` (the code's ``adaptive_middle_loss``);
* **weight perturbation** of the starting point: each convolution weight
  ``W <- W + alpha_p (d / ||d||_F) * W``, ``d ~ N(0, I)``, elementwise, with
  ``alpha_p = 1``;
* **representative initialisation**: per class, k-means over the expert's
  logits of the class's real images; the real image nearest each centre.

Deviations from the official code, all documented in docs/unlearning.md:
the representative initialisation also works when ``ipc < 10`` (the official
code takes ``int(ipc / 10) = 0`` images per centre there and returns
nothing); it uses ``k = min(ipc, 10)`` centres and the ``ceil(ipc / k)``
nearest distinct images of each, with our own seeded k-means (k-means++
start, Lloyd steps) instead of scikit-learn's; no differentiable
augmentation (DSA) and no ZCA, which 8x8 digits do not need.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from losskit.core.checks import check_bool, check_choice, check_hparam, check_int, shape_str
from losskit.core.registry import Paper, register

__all__ = ["AST_PAPER", "MTT_PAPER", "clipping_coefficient", "input_gradient_penalty", "train_expert",
           "balanced_inner_weight", "perturb_weights", "kmeans", "representative_init", "DistilledSet", "run_ast",
           "run_mtt", "evaluate_synthetic", "flatten_params", "ParamLayout"]

AST_PAPER = Paper("Efficient Dataset Distillation through Alignment with Smooth and High-Quality Expert "
                  "Trajectories", 2023, "2310.10541")
MTT_PAPER = Paper("Dataset Distillation by Matching Training Trajectories", 2022, "2203.11932")


# ----------------------------------------------------------------------------- experts

def clipping_coefficient(epoch: int, warmup: int = 10) -> float:
    """AST's clipping loss factor ``c_e = 0.5 + 0.05 e`` for ``e < 10``, else 1."""
    epoch = check_int("epoch", epoch, low=0)
    return 0.5 + 0.05 * epoch if epoch < warmup else 1.0


def input_gradient_penalty(model: nn.Module, x: Tensor) -> Tensor:
    """``mean_{b,h,w} (||d(sum_j f_j(x)) / dx||_2 - 1)^2`` (norm over dim 1, the channels), differentiable."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return ((g.norm(p=2, dim=1) - 1.0) ** 2).mean()


@dataclass
class ParamLayout:
    """Names and shapes of a model's parameters, to go between a flat vector and ``functional_call``."""

    names: list[str]
    shapes: list[torch.Size]

    @classmethod
    def of(cls, model: nn.Module) -> "ParamLayout":
        named = [(k, p) for k, p in model.named_parameters()]
        return cls([k for k, _ in named], [p.shape for _, p in named])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for k, s in zip(self.names, self.shapes):
            n = math.prod(s)
            out[k] = flat[i:i + n].view(s)
            i += n
        if i != flat.numel():
            raise ValueError(f"flat parameters: expected {i} values for this model, got {flat.numel()}")
        return out

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def flatten_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def train_expert(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 20, lr: float = 0.01,
                 batch_size: int = 256, momentum: float = 0.0, weight_decay: float = 0.0, clipping: bool = True,
                 gradient_penalty: float = 2.0, seed: int = 0) -> list[Tensor]:
    """Train an expert in place; returns its trajectory, ``epochs + 1`` flat parameter vectors (start first).

    ``clipping`` and ``gradient_penalty > 0`` are AST's smooth expert; both off
    (``clipping=False, gradient_penalty=0``) is MTT's expert (SGD, lr 0.01).
    """
    epochs = check_int("epochs", epochs, low=1)
    lr = check_hparam("lr", lr, low=0.0, low_open=True)
    batch_size = check_int("batch_size", batch_size, low=1)
    gradient_penalty = check_hparam("gradient_penalty", gradient_penalty, low=0.0)
    clipping = check_bool("clipping", clipping)
    gen = torch.Generator().manual_seed(check_int("seed", seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    traj = [flatten_params(model)]
    model.train()
    for e in range(epochs):
        c = clipping_coefficient(e) if clipping else 1.0
        perm = torch.randperm(x.shape[0], generator=gen)
        for s in range(0, x.shape[0], batch_size):
            b = perm[s:s + batch_size]
            loss = c * nn.functional.cross_entropy(model(x[b]), y[b])
            if gradient_penalty > 0:
                loss = loss + gradient_penalty * input_gradient_penalty(model, x[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        traj.append(flatten_params(model))
    return traj


# ----------------------------------------------------------------------------- the additions

def balanced_inner_weight(start_epoch: int, max_start_epoch: int) -> float:
    """``log_5(s - M//2 + 8)`` when ``s >= M//2``, else ``1 / log_5(M//2 - s + 8)``."""
    max_start_epoch = check_int("max_start_epoch", max_start_epoch, low=1)
    start_epoch = check_int("start_epoch", start_epoch, low=0, high=max_start_epoch)
    half = max_start_epoch // 2
    if start_epoch >= half:
        return math.log(start_epoch - half + 8, 5)
    return 1.0 / math.log(half - start_epoch + 8, 5)


def perturb_weights(flat: Tensor, layout: ParamLayout, *, alpha: float = 1.0, ndims: Sequence[int] = (4,),
                    generator: torch.Generator | None = None) -> Tensor:
    """``W + alpha (d / ||d||_F) * W`` for every parameter whose number of dimensions is in ``ndims``
    (convolution weights by default, as in the code), ``d ~ N(0, I)``; other parameters unchanged."""
    alpha = check_hparam("alpha", alpha, low=0.0)
    parts = []
    for p in layout.unflatten(flat).values():
        if p.dim() in tuple(ndims):
            d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
            p = p + alpha * (d / d.norm()) * p
        parts.append(p.reshape(-1))
    return torch.cat(parts)


def kmeans(points: Tensor, k: int, *, iters: int = 50, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with a k-means++ start: ``(centres [k, D], assignment [n])``."""
    n = points.shape[0]
    k = check_int("k", k, low=1, high=n)
    g = torch.Generator().manual_seed(seed)
    pts = points.detach().to(torch.float64)
    centres = [pts[int(torch.randint(n, (1,), generator=g))]]
    for _ in range(1, k):
        d2 = torch.cdist(pts, torch.stack(centres)).min(1).values ** 2
        if float(d2.sum()) <= 0:
            nxt = int(torch.randint(n, (1,), generator=g))
        else:
            nxt = int(torch.multinomial(d2 / d2.sum(), 1, generator=g))
        centres.append(pts[nxt])
    c = torch.stack(centres)
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        assign = torch.cdist(pts, c).argmin(1)
        new = torch.stack([pts[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
        if torch.allclose(new, c):
            break
        c = new
    return c.to(points.dtype), assign


def representative_init(expert: nn.Module, x: Tensor, y: Tensor, ipc: int, num_classes: int, *,
                        seed: int = 0) -> Tensor:
    """Indices of ``ipc`` real images per class chosen by k-means over the expert's logits.

    ``k = min(ipc, 10)`` centres per class (the code's 10 "visual" centres at
    ``ipc >= 10``; ``ipc`` centres below, where the official code returns no
    image); each centre contributes its nearest ``ceil(ipc / k)`` distinct
    images, trimmed to ``ipc``.  Returns ``[num_classes * ipc]`` indices, class by class.
    """
    ipc = check_int("ipc", ipc, low=1)
    expert.eval()
    with torch.no_grad():
        logits = torch.cat([expert(x[i:i + 512]) for i in range(0, x.shape[0], 512)])
    chosen = []
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        if idx.numel() < ipc:
            raise ValueError(f"ipc: expected at most {idx.numel()} images per class (class {c} has "
                             f"{idx.numel()} real images), got {ipc}")
        z = logits[idx]
        k = min(ipc, 10)
        centres, _ = kmeans(z, k, seed=seed + c)
        per = math.ceil(ipc / k)
        taken: list[int] = []
        order = torch.cdist(centres.double(), z.double()).argsort(1)
        for j in range(k):
            got = 0
            for t in order[j].tolist():
                if t not in taken:
                    taken.append(t)
                    got += 1
                    if got == per:
                        break
        chosen.append(idx[torch.tensor(taken[:ipc])])
    return torch.cat(chosen)


# ----------------------------------------------------------------------------- distillation

@dataclass
class DistilledSet:
    images: Tensor
    labels: Tensor
    lr: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _check_trajectories(trajectories, layout: ParamLayout, need: int) -> list[list[Tensor]]:
    if not trajectories:
        raise ValueError("trajectories: expected at least one expert trajectory (train_expert)")
    out = []
    for i, t in enumerate(trajectories):
        if len(t) < need:
            raise ValueError(f"trajectories[{i}]: expected at least max_start_epoch + expert_epochs + 1 = {need} "
                             f"checkpoints, got {len(t)}")
        for p in t:
            if p.numel() != layout.numel:
                raise ValueError(f"trajectories[{i}]: a checkpoint has {p.numel()} values; the model has "
                                 f"{layout.numel} parameters")
        out.append(list(t))
    return out


def _init_images(init: str, x: Tensor, y: Tensor, ipc: int, num_classes: int, expert: nn.Module | None,
                 gen: torch.Generator, seed: int) -> Tensor:
    if init == "representative":
        if expert is None:
            raise ValueError("init='representative' needs init_model (an expert at its final parameters)")
        return x[representative_init(expert, x, y, ipc, num_classes, seed=seed)].clone()
    if init == "noise":
        return torch.randn((num_classes * ipc,) + tuple(x.shape[1:]), generator=gen, dtype=x.dtype)
    chosen = []
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        if idx.numel() < ipc:
            raise ValueError(f"ipc: expected at most {idx.numel()} images per class (class {c} has "
                             f"{idx.numel()} real images), got {ipc}")
        chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:ipc]])
    return x[torch.cat(chosen)].clone()


def _distill(model: nn.Module, trajectories, x: Tensor, y: Tensor, *, ipc: int, iterations: int, syn_steps: int,
             expert_epochs: int, max_start_epoch: int, lr_img: float, lr_lr: float, lr_init: float,
             batch_syn: int | None, momentum: float, balanced_loss: bool, intermediate: str,
             weight_perturb: float, init: str, init_model: nn.Module | None, seed: int,
             callback: Callable[[int, "DistilledSet"], None] | None = None) -> DistilledSet:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module (the student architecture), got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError(f"x: expected real images [n, ...], got "
                        f"{shape_str(x) if isinstance(x, Tensor) else type(x).__name__}")
    if y.shape != (x.shape[0],) or y.dtype != torch.int64:
        raise ValueError(f"y: expected int64 labels [{x.shape[0]}], got {y.dtype} {shape_str(y)}")
    ipc = check_int("ipc", ipc, low=1)
    iterations = check_int("iterations", iterations, low=0)
    syn_steps = check_int("syn_steps", syn_steps, low=1)
    expert_epochs = check_int("expert_epochs", expert_epochs, low=1)
    max_start_epoch = check_int("max_start_epoch", max_start_epoch, low=1)
    lr_img = check_hparam("lr_img", lr_img, low=0.0, low_open=True)
    lr_lr = check_hparam("lr_lr", lr_lr, low=0.0)
    lr_init = check_hparam("lr_init", lr_init, low=0.0, low_open=True)
    momentum = check_hparam("momentum", momentum, low=0.0, high=1.0, high_open=True)
    balanced_loss = check_bool("balanced_loss", balanced_loss)
    intermediate = check_choice("intermediate", intermediate, ("none", "adaptive", "sum"))
    weight_perturb = check_hparam("weight_perturb", weight_perturb, low=0.0)
    init = check_choice("init", init, ("real", "representative", "noise"))
    num_classes = int(y.max()) + 1
    counts = torch.bincount(y, minlength=num_classes)
    if int(counts.min()) < ipc and init != "noise":
        c = int(counts.argmin())
        raise ValueError(f"ipc: expected at most {int(counts.min())} images per class (class {c} has "
                         f"{int(counts[c])} real images), got {ipc}")
    layout = ParamLayout.of(model)
    trajs = _check_trajectories(trajectories, layout, max_start_epoch + expert_epochs + 1)
    gen = torch.Generator().manual_seed(check_int("seed", seed))
    images = _init_images(init, x, y, ipc, num_classes, init_model, gen, seed).requires_grad_(True)
    labels = torch.arange(num_classes).repeat_interleave(ipc)
    syn_lr = torch.tensor(float(lr_init), dtype=x.dtype, requires_grad=True)
    opt_img = torch.optim.SGD([images], lr=lr_img, momentum=0.5)
    opt_lr = torch.optim.SGD([syn_lr], lr=max(lr_lr, 1e-12), momentum=0.5)
    bs = images.shape[0] if batch_syn is None else check_int("batch_syn", batch_syn, low=1)
    out = DistilledSet(images, labels, float(lr_init))
    t0 = time.perf_counter()
    for it in range(iterations):
        traj = trajs[int(torch.randint(len(trajs), (1,), generator=gen))]
        s = int(torch.randint(max_start_epoch, (1,), generator=gen))
        start = traj[s].to(x)
        if weight_perturb > 0:
            start = perturb_weights(start, layout, alpha=weight_perturb, generator=gen)
        target = traj[s + expert_epochs].to(x)
        w_inner = balanced_inner_weight(s, max_start_epoch) if balanced_loss else 1.0
        middle = {}
        if intermediate != "none":
            for i in range(1, expert_epochs):
                middle[(syn_steps // expert_epochs) * i] = (i, traj[s + i].to(x))
        theta = start.clone().requires_grad_(True)
        buf = None
        chunks: list[Tensor] = []
        mids: list[tuple[int, Tensor]] = []
        for step in range(syn_steps):
            if not chunks:
                chunks = list(torch.randperm(images.shape[0], generator=gen).split(bs))
            b = chunks.pop()
            logits = functional_call(model, layout.unflatten(theta), (images[b],))
            ce = w_inner * nn.functional.cross_entropy(logits, labels[b])
            (g,) = torch.autograd.grad(ce, theta, create_graph=True)
            buf = g if (buf is None or momentum == 0) else momentum * buf + g
            theta = theta - syn_lr * buf
            if step + 1 in middle and step + 1 < syn_steps:
                i, mt = middle[step + 1]
                mids.append((i, ((theta - mt) ** 2).sum() / ((start - mt) ** 2).sum().clamp_min(1e-12)))
        loss = ((theta - target) ** 2).sum() / ((start - target) ** 2).sum().clamp_min(1e-12)
        for i, ml in mids:
            loss = loss + (i / expert_epochs if intermediate == "adaptive" else 1.0) * ml
        opt_img.zero_grad(set_to_none=True)
        opt_lr.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"trajectory matching diverged at iteration {it} (loss {float(loss.detach())}); "
                                     "lower lr_img or lr_lr")
        opt_img.step()
        if lr_lr > 0:
            opt_lr.step()
            with torch.no_grad():
                syn_lr.clamp_(min=1e-6)
        out.losses.append(float(loss.detach()))
        out.lr = float(syn_lr.detach())
        if callback is not None:
            callback(it, out)
    out.images = images.detach()
    out.seconds = time.perf_counter() - t0
    return out


@register("ast", family="unlearning", kind="recipe", paper=AST_PAPER,
          summary="AST: trajectory matching with smooth experts, inner momentum, balanced inner loss, "
                  "intermediate matching, weight perturbation and representative initialisation.")
def run_ast(model: nn.Module, trajectories: Sequence[Sequence[Tensor]], x: Tensor, y: Tensor, *, ipc: int = 10,
            iterations: int = 500, syn_steps: int = 20, expert_epochs: int = 2, max_start_epoch: int = 10,
            lr_img: float = 100.0, lr_lr: float = 1e-5, lr_init: float = 0.01, batch_syn: int | None = None,
            momentum: float = 0.9, balanced_loss: bool = True, intermediate: str = "adaptive",
            weight_perturb: float = 1.0, init: str = "representative", init_model: nn.Module | None = None,
            seed: int = 0, callback: Callable | None = None) -> DistilledSet:
    """Distil ``ipc`` images per class from expert ``trajectories`` (lists of flat parameters,
    :func:`train_expert` with its smooth-expert defaults).

    ``model`` is the student architecture (its own parameter values are not
    used).  ``init_model``: an expert at its final parameters, whose logits the
    representative initialisation clusters.  Returns the images, their labels
    and the learnt step size.
    """
    return _distill(model, trajectories, x, y, ipc=ipc, iterations=iterations, syn_steps=syn_steps,
                    expert_epochs=expert_epochs, max_start_epoch=max_start_epoch, lr_img=lr_img, lr_lr=lr_lr,
                    lr_init=lr_init, batch_syn=batch_syn, momentum=momentum, balanced_loss=balanced_loss,
                    intermediate=intermediate, weight_perturb=weight_perturb, init=init, init_model=init_model,
                    seed=seed, callback=callback)


@register("mtt", family="unlearning", kind="recipe", paper=MTT_PAPER,
          summary="MTT: trajectory matching (random real initialisation, plain inner SGD with a learnt step).")
def run_mtt(model: nn.Module, trajectories: Sequence[Sequence[Tensor]], x: Tensor, y: Tensor, *, ipc: int = 10,
            iterations: int = 500, syn_steps: int = 20, expert_epochs: int = 2, max_start_epoch: int = 10,
            lr_img: float = 100.0, lr_lr: float = 1e-5, lr_init: float = 0.01, batch_syn: int | None = None,
            seed: int = 0, callback: Callable | None = None) -> DistilledSet:
    """Trajectory matching without AST's additions (pair it with experts from
    ``train_expert(..., clipping=False, gradient_penalty=0)``)."""
    return _distill(model, trajectories, x, y, ipc=ipc, iterations=iterations, syn_steps=syn_steps,
                    expert_epochs=expert_epochs, max_start_epoch=max_start_epoch, lr_img=lr_img, lr_lr=lr_lr,
                    lr_init=lr_init, batch_syn=batch_syn, momentum=0.0, balanced_loss=False, intermediate="none",
                    weight_perturb=0.0, init="real", init_model=None, seed=seed, callback=callback)


def evaluate_synthetic(make_model: Callable[[], nn.Module], images: Tensor, labels: Tensor, x_test: Tensor,
                       y_test: Tensor, *, lr: float = 0.01, epochs: int = 300, batch_size: int = 256,
                       momentum: float = 0.9, seed: int = 0) -> float:
    """Test accuracy of a fresh network trained on ``(images, labels)`` with SGD (the distillation's
    evaluation protocol: the learnt step size as lr)."""
    torch.manual_seed(seed)
    net = make_model()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2], 0.1)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(images.shape[0], generator=gen)
        for s in range(0, images.shape[0], batch_size):
            b = perm[s:s + batch_size]
            loss = nn.functional.cross_entropy(net(images[b]), labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        return float((net(x_test).argmax(1) == y_test).float().mean())
