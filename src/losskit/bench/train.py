"""Training and evaluating one (objective, seed) cell.

Every objective sees the same network initialisation, the same batches (a
class-balanced P x K sampler seeded by the seed), the same augmentation, the
same optimiser and the same number of steps; only the objective differs.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from losskit import registry

from .config import BenchConfig, base_name
from .model import build_model, choose_model

__all__ = ["PKSampler", "batch_shape", "train_cell", "measure_step_memory", "CellDiverged", "MEMORY_LABELS"]

#: What ``peak_memory_mb`` means, by how it was measured.
MEMORY_LABELS = {
    "cuda_max_allocated": ("torch.cuda.max_memory_allocated over the training steps (MB; includes the network, "
                           "the objective and the training images, which are held on the GPU)"),
    "cpu_profiler_step": (
        "CPU tensor memory of one training step (MB): bytes of the network's and the objective's parameters "
        "plus the peak of the bytes allocated during the first training step (gradients, optimiser state, "
        "activations), from torch.profiler's allocation events; allocator caching and Python overhead excluded"
    ),
}


class CellDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class PKSampler:
    """Class-balanced batches: ``P`` classes, ``K`` samples each, drawn with a seeded generator.

    Classes are drawn without replacement within a batch; samples without
    replacement within a class when it has at least ``K``, with replacement
    otherwise.  One epoch is ``ceil(N / (P*K))`` batches.
    """

    def __init__(self, labels: Tensor, p: int, k: int, seed: int):
        y = labels.cpu().numpy()
        self.classes = np.unique(y)
        if p > len(self.classes):
            raise ValueError(f"P={p} classes per batch but the training set has {len(self.classes)}")
        self.by_class = [np.flatnonzero(y == c) for c in self.classes]
        self.p, self.k = p, k
        self.rng = np.random.default_rng(seed)
        self.steps_per_epoch = max(1, math.ceil(len(y) / (p * k)))

    def batch(self) -> np.ndarray:
        chosen = self.rng.choice(len(self.classes), size=self.p, replace=False)
        parts = []
        for c in chosen:
            idx = self.by_class[c]
            parts.append(self.rng.choice(idx, size=self.k, replace=len(idx) < self.k))
        return np.concatenate(parts)


def batch_shape(cfg: BenchConfig, labels: Tensor) -> tuple[int, int]:
    """``(P, K)``: from the config, or chosen from the data when 0.

    Auto: ``K = min(16, max(2, smallest class // 4))``, ``P = min(#classes, max(2, batch_size // K))``.
    """
    counts = torch.bincount(labels.cpu())
    counts = counts[counts > 0]
    n_classes = len(counts)
    if n_classes < 2:
        raise ValueError(f"the training split needs at least 2 classes; got {n_classes}")
    k = cfg.batch_samples or min(16, max(2, int(counts.min()) // 4))
    p = cfg.batch_classes or min(n_classes, max(2, cfg.batch_size // k))
    if p > n_classes:
        raise ValueError(f"--batch-classes {p} exceeds the {n_classes} training classes")
    return p, k


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random translation by up to 1 pixel in each direction (zero padding)."""
    b, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (b,), generator=gen)
    dx = torch.randint(0, 3, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # [B, H]
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # [B, W]
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = pad.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's start/stop lines on fd 2 (Python errors still surface as exceptions)."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def measure_step_memory(step: Callable[[], Any], persistent_bytes: int) -> tuple[float, Any]:
    """Run ``step()`` under torch.profiler; return (MB, step's result).

    MB = ``persistent_bytes`` + peak of the running sum of CPU allocation
    events recorded during the step (frees subtract).
    """
    from torch.profiler import ProfilerActivity, profile

    # fd 2 is silenced (the C++ profiler prints start/stop lines there); python warnings raised
    # by the step are recorded and re-issued afterwards so that none is lost
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = step()
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        if str(e.device_type()).lower().endswith("cpu"):
            running += e.nbytes()
            peak = max(peak, running)
    return (persistent_bytes + peak) / 2**20, result


def _param_bytes(*modules: nn.Module) -> int:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        for b in m.buffers():
            if id(b) not in seen:
                seen.add(id(b))
                total += b.numel() * b.element_size()
    return total


@torch.no_grad()
def embed(model: nn.Module, x: Tensor, device: torch.device, chunk: int = 1024) -> Tensor:
    model.eval()
    return torch.cat([model(x[i:i + chunk].to(device)).float().cpu() for i in range(0, len(x), chunk)])


def _histogram(scores: Tensor, bins: int) -> list[int]:
    return torch.histc(scores.float().clamp(-1, 1), bins=bins, min=-1.0, max=1.0).long().tolist()


def train_cell(
    cfg: BenchConfig,
    split: Any,
    objective: str,
    hparams: dict[str, Any],
    seed: int,
    device: torch.device,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train the network with ``objective`` from ``seed`` and evaluate on the held-out classes.

    ``objective`` is a label: a registry name or a variant ``NAME[param=value,...]``
    (``hparams`` already holds the variant's params).  Returns the cell's record
    (JSON-plain): metrics, loss per epoch, time, memory, similarity histograms.
    """
    from losskit import metrics as M

    name = base_name(objective)
    spec = registry.spec(name)
    input_shape = tuple(split.train_x.shape[1:])
    model = build_model(cfg.model, input_shape, cfg.embedding_dim, seed).to(device)
    kwargs = dict(hparams)
    if spec.needs_classes:
        kwargs["num_classes"] = int(split.train_y.max()) + 1
    if "embedding_dim" in spec.required or "embedding_dim" in spec.hparams:
        kwargs["embedding_dim"] = cfg.embedding_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        loss_fn = registry.get(name, **kwargs)
    if isinstance(loss_fn, nn.Module):
        loss_fn = loss_fn.to(device)
        extra = [p for p in loss_fn.parameters() if p.requires_grad]
    else:
        extra = []
    params = list(model.parameters()) + extra
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    p, k = batch_shape(cfg, split.train_y)
    sampler = PKSampler(split.train_y, p, k, seed)
    aug_gen = torch.Generator().manual_seed(seed + 104729)
    train_x, train_y = split.train_x.to(device), split.train_y.to(device)
    cuda = device.type == "cuda"

    def step() -> float:
        idx = torch.from_numpy(sampler.batch()).to(device)
        x, y = train_x[idx], train_y[idx]
        if cfg.augment == "shift":
            x = _shift(x, aug_gen)
        emb = model(x)
        loss = loss_fn(emb, y)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise TypeError(f"objective {objective!r} must return a scalar loss tensor; got {shape}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    # objectives that draw random numbers (sampled heads, random margins) draw the same ones
    # whatever ran before this cell, so a resumed cell equals an uninterrupted one
    torch.manual_seed(seed + 15485863)
    model.train()
    if isinstance(loss_fn, nn.Module):
        loss_fn.train()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    epoch_loss: list[float] = []
    total_steps = cfg.epochs * sampler.steps_per_epoch
    train_time = 0.0
    memory_mb = float("nan")
    memory_kind = "cuda_max_allocated" if cuda else "cpu_profiler_step"
    n = 0
    for epoch in range(cfg.epochs):
        losses = []
        t0 = time.perf_counter()
        for _ in range(sampler.steps_per_epoch):
            if n == 0 and not cuda:
                # the first step is profiled for memory and left out of the timing
                tp = time.perf_counter()
                memory_mb, loss = measure_step_memory(step, _param_bytes(model, *(
                    [loss_fn] if isinstance(loss_fn, nn.Module) else [])))
                t0 += time.perf_counter() - tp
            else:
                loss = step()
            n += 1
            losses.append(loss)
            if on_step is not None:
                on_step()
        values = torch.stack(losses).float().cpu()  # one device sync per epoch
        train_time += time.perf_counter() - t0
        if not torch.isfinite(values).all():
            first = int((~torch.isfinite(values)).nonzero()[0])
            raise CellDiverged(f"{objective} (seed {seed}): loss became {float(values[first])} "
                               f"at step {first + 1 + epoch * sampler.steps_per_epoch} of {total_steps}")
        epoch_loss.append(float(values.mean()))
    if cuda:
        memory_mb = torch.cuda.max_memory_allocated(device) / 2**20

    t0 = time.perf_counter()
    emb = embed(model, split.test_x, device)
    if not torch.isfinite(emb).all():
        raise CellDiverged(f"{objective} (seed {seed}): the trained network gives non-finite embeddings")
    test_y = split.test_y.cpu()
    scores = M.evaluate_embeddings(emb, test_y, ks=cfg.ks, fars=cfg.fars)
    genuine, impostor = M.pair_scores(emb, test_y)
    eval_time = time.perf_counter() - t0

    return {
        "objective": objective,
        "name": name,
        "seed": seed,
        "hparams": {k_: (v if isinstance(v, (bool, int, float, str, type(None))) else repr(v))
                    for k_, v in hparams.items()},
        "metrics": {k_: float(v) for k_, v in scores.items()},
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "steps": n,
        "timed_steps": n if cuda else n - 1,
        "peak_memory_mb": memory_mb,
        "memory_kind": memory_kind,
        "epoch_loss": epoch_loss,
        "batch": {"P": p, "K": k},
        "model": choose_model(cfg.model, input_shape),
        "objective_params": sum(p_.numel() for p_ in extra),
        "hist": {"bins": cfg.hist_bins, "range": [-1.0, 1.0],
                 "genuine": _histogram(genuine, cfg.hist_bins), "impostor": _histogram(impostor, cfg.hist_bins)},
        "device": str(device),
    }
