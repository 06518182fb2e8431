"""Online class-incremental learning on a Si-Blurry stream: MVP and its baselines.

Moon et al., "Online Class Incremental Learning on Stochastic Blurry Task
Boundary via Mask and Visual Prompt Tuning" (ICCV 2023, arXiv:2308.09303);
code KHU-AGI/Si-Blurry (``methods/mvp.py``, ``methods/er_baseline.py``,
``scripts/mvp.sh``).

The stream (:func:`losskit.data.streams.si_blurry_stream`) is read once, in
batches of ``batch_size``; each incoming batch is trained on ``online_iter``
times (the official scripts: 3); the classes seen so far are the only ones
the logits may predict (``-inf`` elsewhere, at training and at test).  Every
``eval_period`` samples the model is scored on the test samples of the seen
classes (A_auc), and at the end of each task (the last is A_last).

``method``:

* ``"mvp"``: the pretrained backbone frozen; prompts, keys, masks and a new
  head tuned with :func:`losskit.functional.mvp.mvp_loss` plus the key loss
  (:class:`~losskit.recipes.prompt_vit.MVPModel`); the switches ``use_mask``,
  ``use_afs``, ``use_gsf`` and ``gsf_mode`` are the ablations;
* ``"er"``: experience replay: the whole network (a copy of the backbone with
  a new head) trained by CE on the batch plus ``memory_batch_size`` rows drawn
  from a reservoir memory of ``memory_size``;
* ``"finetune"``: the same without memory (plain online fine-tuning).

Registered as the recipe ``mvp``: ``losskit.get("mvp", method="er")`` then
``recipe(backbone, x, y, x_test, y_test, stream)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losskit.core.checks import check_bool, check_choice, check_hparam, check_int, shape_str
from losskit.core.registry import Paper, register
from losskit.data.streams import SiBlurryStream
from losskit.functional.mvp import GSF_MODES, masked_logits, mvp_loss
from losskit.metrics.stream import AnytimeAccuracy
from losskit.recipes.prompt_vit import MVPModel, TinyViT

__all__ = ["OnlineResult", "run_online_continual", "ONLINE_METHODS"]

MVP_PAPER = Paper("Online Class Incremental Learning on Stochastic Blurry Task Boundary via Mask and Visual "
                  "Prompt Tuning", 2023, "2308.09303")
ONLINE_METHODS = ("mvp", "er", "finetune")


@dataclass
class OnlineResult:
    a_auc: float
    a_last: float
    curve: AnytimeAccuracy
    model: nn.Module
    extra: dict = field(default_factory=dict)


class _Plain(nn.Module):
    """A trainable copy of the backbone with a new head (ER / fine-tuning)."""

    def __init__(self, backbone: TinyViT, num_classes: int):
        super().__init__()
        self.net = copy.deepcopy(backbone)
        for p in self.net.parameters():
            p.requires_grad_(True)
        self.net.head = nn.Linear(backbone.dim, num_classes)

    def logits(self, x: Tensor, seen: Tensor | None = None) -> Tensor:
        return masked_logits(self.net(x), None, seen)


@torch.no_grad()
def _accuracy(model, x: Tensor, y: Tensor, seen: Tensor, batch: int = 512) -> float:
    keep = seen[y]
    if not bool(keep.any()):
        return 0.0
    xs, ys = x[keep], y[keep]
    was = model.training
    model.eval()
    correct = 0
    for s in range(0, len(ys), batch):
        correct += int((model.logits(xs[s:s + batch], seen).argmax(1) == ys[s:s + batch]).sum())
    model.train(was)
    return correct / len(ys)


@register("mvp", family="continual", kind="recipe", paper=MVP_PAPER,
          summary="Online class-incremental learning on a Si-Blurry stream: MVP (prompts, instance-wise logit "
                  "masks, gradient-similarity focal loss, adaptive feature scaling), ER and fine-tuning baselines.")
def run_online_continual(backbone: TinyViT, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor,
                         stream: SiBlurryStream, *, method: str = "mvp", num_classes: int | None = None,
                         batch_size: int = 16, online_iter: int = 3, lr: float = 5e-3, eval_period: int = 100,
                         memory_size: int = 500, memory_batch_size: int = 16, alpha: float = 0.5,
                         gamma: float = 2.0, margin: float = 0.5, use_mask: bool = True, use_afs: bool = True,
                         use_gsf: bool = True, gsf_mode: str = "per-sample", count_scaled: bool = True,
                         num_prompts: int = 5, seed: int = 0) -> OnlineResult:
    """Run one online pass of ``stream`` over ``(x, y)``; test on ``(x_test, y_test)``."""
    if not isinstance(backbone, TinyViT):
        raise TypeError(f"backbone: expected a pretrained TinyViT, got {type(backbone).__name__}")
    if not isinstance(stream, SiBlurryStream):
        raise TypeError(f"stream: expected a SiBlurryStream (losskit.data.streams.si_blurry_stream), "
                        f"got {type(stream).__name__}")
    check_choice("method", method, ONLINE_METHODS)
    check_choice("gsf_mode", gsf_mode, GSF_MODES)
    batch_size = check_int("batch_size", batch_size, low=1)
    online_iter = check_int("online_iter", online_iter, low=1)
    lr = check_hparam("lr", lr, low=0.0, low_open=True)
    eval_period = check_int("eval_period", eval_period, low=1)
    memory_size = check_int("memory_size", memory_size, low=0)
    memory_batch_size = check_int("memory_batch_size", memory_batch_size, low=0)
    for n, v in (("use_mask", use_mask), ("use_afs", use_afs), ("use_gsf", use_gsf), ("count_scaled", count_scaled)):
        check_bool(n, v)
    seed = check_int("seed", seed)
    for n, t in (("y", y), ("y_test", y_test)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.is_floating_point():
            raise ValueError(f"{n}: expected [N] integer labels, got {shape_str(t) if isinstance(t, Tensor) else t}")
    if x.shape[0] != y.shape[0] or x_test.shape[0] != y_test.shape[0]:
        raise ValueError(f"x/y and x_test/y_test: expected matching rows, got {x.shape[0]}/{y.shape[0]} and "
                         f"{x_test.shape[0]}/{y_test.shape[0]}")
    C = int(max(int(y.max()), int(y_test.max())) + 1) if num_classes is None else check_int("num_classes",
                                                                                             num_classes, low=1)
    idx_all = stream.order
    if idx_all.numel() and (int(idx_all.max()) >= x.shape[0] or int(idx_all.min()) < 0):
        raise ValueError(f"stream: indexes up to {int(idx_all.max())}, but x has {x.shape[0]} rows")

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if method == "mvp":
        model = MVPModel(copy.deepcopy(backbone), C, num_prompts=num_prompts, count_scaled=count_scaled,
                         use_mask=use_mask)
    else:
        model = _Plain(backbone, C)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    seen = torch.zeros(C, dtype=torch.bool)
    curve = AnytimeAccuracy()
    memory: list[int] = []
    n_seen = 0
    next_eval = eval_period
    use_memory = method == "er" and memory_size > 0 and memory_batch_size > 0
    model.train()
    for t, task_idx in enumerate(stream.tasks):
        for s in range(0, len(task_idx), batch_size):
            bidx = task_idx[s:s + batch_size]
            seen[y[bidx]] = True
            for _ in range(online_iter):
                idx = bidx
                if use_memory and memory:
                    pick = torch.randint(0, len(memory), (min(memory_batch_size, len(memory)),), generator=gen)
                    idx = torch.cat([bidx, torch.as_tensor(memory)[pick]])
                xb, yb = x[idx], y[idx]
                if method == "mvp":
                    f, m, key_loss = model(xb)
                    loss = mvp_loss(f, yb, model.head.weight, model.head.bias, m, seen, alpha, gamma, margin,
                                    afs=use_afs, gsf=use_gsf, gsf_mode=gsf_mode) + key_loss
                else:
                    loss = F.cross_entropy(masked_logits(model.net(xb), None, seen), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if use_memory:  # reservoir sampling over the stream (the official update_memory)
                for i in bidx.tolist():
                    if len(memory) < memory_size:
                        memory.append(i)
                    else:
                        j = int(torch.randint(0, n_seen + 1, (1,), generator=gen))
                        if j < memory_size:
                            memory[j] = i
                    n_seen += 1
            else:
                n_seen += len(bidx)
            while n_seen >= next_eval:
                curve.record(next_eval, _accuracy(model, x_test, y_test, seen))
                next_eval += eval_period
        curve.end_task(_accuracy(model, x_test, y_test, seen))
    if not curve.accuracies:
        raise ValueError(f"eval_period: {eval_period} is longer than the stream ({n_seen} samples): no anytime "
                         "evaluation, so no A_auc")
    return OnlineResult(curve.a_auc, curve.a_last, curve, model, {"seen_classes": int(seen.sum())})
