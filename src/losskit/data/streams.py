"""Si-Blurry: the stochastic blurry-task-boundary stream of MVP.

Moon et al., "Online Class Incremental Learning on Stochastic Blurry Task
Boundary via Mask and Visual Prompt Tuning" (ICCV 2023, arXiv:2308.09303),
code KHU-AGI/Si-Blurry ``utils/online_sampler.py`` (its
``varing_NM`` branch: tasks of random size).

Rule, for ``T`` tasks over the classes of ``labels`` (seeded, reproducible):

1. shuffle the classes; the first ``floor(C * disjoint_ratio)`` are
   *disjoint* classes (each appears in one task only), the rest *blurry*;
2. cut the disjoint classes and the blurry classes, each at ``T - 1`` random
   points, into ``T`` groups of random size (a task's new classes);
3. every sample goes to the task of its class;
4. ``blurry_ratio`` of the blurry classes' samples are *blurred*: drawn at
   random from all of them, taken out of their tasks and dealt to the tasks
   in ``T`` chunks of random size, so a blurry class also shows up, a little,
   in other tasks;
5. each task is shuffled; the stream is the tasks in order, seen once.

Differences from the official sampler, on purpose: a task that would get no
sample (two equal cut points) is an error here (``ValueError`` naming the
seed), where the official code yields an empty task; the blurred samples are
drawn at random over all blurry samples (exactly ``floor(blurry_ratio * n)``
of them), where the official code takes from each task a random-size chunk of
its first blurry samples in data-set order (fewer when a task has fewer) and
deals them back with the same chunk sizes; the official trainer passes its arguments positionally so
that ``varing_NM`` receives ``selection_size`` (= 1): the random-size variant
is the one that runs, and the one implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from losskit.core.checks import check_hparam, check_int, shape_str

__all__ = ["SiBlurryStream", "si_blurry_stream"]


@dataclass
class SiBlurryStream:
    tasks: list[Tensor]                 # sample indices per task, in stream order
    disjoint_classes: list[list[int]]   # new disjoint classes per task
    blurry_classes: list[list[int]]     # new blurry classes per task
    blurred: int                        # number of blurred samples
    seed: int

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def order(self) -> Tensor:
        """Every index of the stream, in order."""
        return torch.cat(self.tasks)

    def batches(self, batch_size: int) -> Iterator[tuple[int, Tensor]]:
        """``(task, indices)`` in stream order, a single pass; a batch never spans two tasks."""
        batch_size = check_int("batch_size", batch_size, low=1)
        for t, idx in enumerate(self.tasks):
            for s in range(0, len(idx), batch_size):
                yield t, idx[s:s + batch_size]


def _cuts(n: int, parts: int, g: torch.Generator) -> list[int]:
    if n == 0:
        return [0] * (parts + 1)
    inner = torch.randint(0, n, (parts - 1,), generator=g).sort().values.tolist()
    return [0] + inner + [n]


def si_blurry_stream(labels, num_tasks: int = 5, disjoint_ratio: float = 0.5, blurry_ratio: float = 0.1,
                     seed: int = 0) -> SiBlurryStream:
    """Build a Si-Blurry stream over ``labels`` (``[N]`` class ids); see the module doc.

    Defaults are the paper's: 5 tasks, 50% disjoint classes (N = 50), 10% of
    the blurry classes' samples blurred (M = 10)."""
    y = torch.as_tensor(labels)
    if y.dim() != 1 or y.is_floating_point():
        raise ValueError(f"labels: expected [N] integer class ids, got {shape_str(y)} {y.dtype}")
    num_tasks = check_int("num_tasks", num_tasks, low=1)
    disjoint_ratio = check_hparam("disjoint_ratio", disjoint_ratio, low=0.0, high=1.0)
    blurry_ratio = check_hparam("blurry_ratio", blurry_ratio, low=0.0, high=1.0)
    seed = check_int("seed", seed)
    classes = torch.unique(y)
    C = len(classes)
    if num_tasks > C:
        raise ValueError(f"num_tasks: expected at most the number of classes ({C}), got {num_tasks}")
    g = torch.Generator().manual_seed(seed)
    order = classes[torch.randperm(C, generator=g)]
    n_dis = int(C * disjoint_ratio)
    dis, blu = order[:n_dis].tolist(), order[n_dis:].tolist()
    dc, bc = _cuts(len(dis), num_tasks, g), _cuts(len(blu), num_tasks, g)
    dis_t = [dis[dc[t]:dc[t + 1]] for t in range(num_tasks)]
    blu_t = [blu[bc[t]:bc[t + 1]] for t in range(num_tasks)]
    empty = [t for t in range(num_tasks) if not dis_t[t] and not blu_t[t]]
    if empty:
        raise ValueError(f"seed: Si-Blurry seed {seed} cannot produce {num_tasks} tasks over {C} classes "
                         f"(disjoint_ratio {disjoint_ratio}): the random cuts leave task(s) {empty} without a "
                         f"class; use another seed or fewer tasks")
    task_of = torch.full((int(y.max()) + 1 if y.numel() else 1,), -1, dtype=torch.long)
    blurry_cls = torch.zeros_like(task_of, dtype=torch.bool)
    for t in range(num_tasks):
        for c in dis_t[t]:
            task_of[c] = t
        for c in blu_t[t]:
            task_of[c] = t
            blurry_cls[c] = True
    per_task = [(task_of[y] == t).nonzero().squeeze(1) for t in range(num_tasks)]
    blurry_idx = blurry_cls[y].nonzero().squeeze(1)
    n_blur = int(len(blurry_idx) * blurry_ratio)
    pool = blurry_idx[torch.randperm(len(blurry_idx), generator=g)[:n_blur]]
    chunks = _cuts(n_blur, num_tasks, g)
    tasks = []
    for t in range(num_tasks):
        idx = per_task[t]
        idx = torch.cat([idx[~torch.isin(idx, pool)], pool[chunks[t]:chunks[t + 1]]])
        tasks.append(idx[torch.randperm(len(idx), generator=g)])
    if any(len(t) == 0 for t in tasks):
        bad = [i for i, t in enumerate(tasks) if len(t) == 0]
        raise ValueError(f"seed: Si-Blurry seed {seed} leaves task(s) {bad} without samples; use another seed")
    return SiBlurryStream(tasks, dis_t, blu_t, int(len(pool)), seed)
