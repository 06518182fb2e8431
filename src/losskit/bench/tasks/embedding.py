"""The ``embedding`` task: open-set retrieval and verification on held-out classes.

Every objective trains the same network (initialised from the seed alone) on
the same class-balanced P x K batches, with the same augmentation draws,
optimiser (Adam on the network's and the objective's parameters) and number
of steps; the embeddings of the test classes, never seen in training, are
scored with ``losskit.metrics`` (Recall@k, MAP@R, TAR@FAR, EER, OPIS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from losskit.core import registry
from losskit.data.samplers import PKSampler, pk_batch_shape

from ..errors import BenchConfigError, CellDiverged
from ..labels import base_name
from ..model import build_model, choose_model
from ..plots import finish_grid, grid
from .base import CellTrainer, Evaluation, Metric, Task

__all__ = ["EmbeddingTask", "batch_shape", "shift", "embed"]

#: the seed offset of the augmentation generator (a cell's shifts depend on its seed only)
AUGMENT_SEED_OFFSET = 104729


def batch_shape(cfg, labels: Tensor) -> tuple[int, int]:
    """``(P, K)`` for ``cfg`` (``--batch-classes``/``--batch-samples``, 0 = from the data;
    see :func:`losskit.data.samplers.pk_batch_shape`)."""
    try:
        return pk_batch_shape(labels, cfg.batch_size, cfg.batch_classes, cfg.batch_samples)
    except ValueError as e:
        raise BenchConfigError(f"the training split's P x K batches (--batch-classes {cfg.batch_classes}, "
                               f"--batch-samples {cfg.batch_samples}): {e}") from None


def shift(x: Tensor, gen: torch.Generator) -> Tensor:
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


@torch.no_grad()
def embed(model: nn.Module, x: Tensor, device: torch.device, chunk: int = 1024) -> Tensor:
    model.eval()
    return torch.cat([model(x[i:i + chunk].to(device)).float().cpu() for i in range(0, len(x), chunk)])


def _histogram(scores: Tensor, bins: int) -> list[int]:
    return torch.histc(scores.float().clamp(-1, 1), bins=bins, min=-1.0, max=1.0).long().tolist()


def _distributed_ready() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized()


#: the fixed seed of the linear probes' fit/test halves and shot draws
PROBE_SEED = 31337


def linear_probe_scores(emb: Tensor, labels: Tensor) -> dict[str, float]:
    """Logistic regression and Gaussian naive Bayes (``losskit.metrics.linear_probe``) on the
    held-out classes' embeddings: each class's images split in halves (a fixed draw), the probes
    fit on 1, 5 or all images per class of the first half and scored on the second."""
    from losskit.metrics.linear_probe import linear_probe

    g = torch.Generator().manual_seed(PROBE_SEED)
    fit, test = [], []
    for c in torch.unique(labels).tolist():
        rows = (labels == c).nonzero().squeeze(1)
        rows = rows[torch.randperm(rows.shape[0], generator=g)]
        half = max(1, rows.shape[0] // 2)
        fit.append(rows[:half])
        test.append(rows[half:])
    fit_i, test_i = torch.cat(fit), torch.cat(test)
    if test_i.numel() == 0:
        return {}
    return linear_probe(emb[fit_i], labels[fit_i], emb[test_i], labels[test_i], shots=(1, 5, None), seed=PROBE_SEED)


class EmbeddingTask(Task):
    name = "embedding"
    objective_task = "embedding"
    filled = ("num_classes", "embedding_dim")
    default_first = ("softmax",)
    # the margin heads; plain ``arcface`` is head='auto', which trains with the fused head
    default_variants = {"arcface": ("arcface[head=dense]", "arcface[head=chunked]", "arcface[head=sampled]")}
    metrics = (
        Metric("recall@1", "R@1"),
        Metric("recall@4", "R@4"),
        Metric("map@r", "MAP@R"),
        Metric("tar@far=0.001", "TAR@1e-3"),
        Metric("tar@far=0.01", "TAR@1e-2"),
        Metric("eer", "EER", lower_is_better=True),
        Metric("opis", "OPIS", percent=False, lower_is_better=True),
        # linear probes on the held-out classes (half of each class's images fit, the other half test)
        Metric("logistic@1", "LR@1"),
        Metric("naive-bayes@1", "NB@1"),
        Metric("logistic@5", "LR@5"),
        Metric("naive-bayes@5", "NB@5"),
        Metric("logistic@all", "LR@all"),
        Metric("naive-bayes@all", "NB@all"),
    )
    primary = "recall@1"
    leaderboard_note = "all metrics on the held-out classes"

    def validate(self, cfg) -> None:
        if cfg.dataset != "digits" and not cfg.data_dir:
            raise BenchConfigError(f"--dataset {cfg.dataset} needs --data-dir PATH")

    def check_hparams(self, label: str, hparams: dict[str, Any]) -> None:
        if hparams.get("head") == "sharded" and not _distributed_ready():
            raise BenchConfigError(
                f"objective {label!r}: head='sharded' splits the classes across the ranks of a torch.distributed "
                "process group, and the bench trains in one process where torch.distributed is not initialised. "
                "Use head='chunked' (the same numbers in one process) or run the bench inside an initialised "
                "process group."
            )

    # ------------------------------------------------------------------ data

    def load_data(self, cfg):
        """The open-set split the config names."""
        from losskit.data import load_dataset

        kw: dict[str, Any] = {}
        if cfg.dataset in ("folder", "omniglot"):
            kw["image_size"] = cfg.image_size
            if cfg.max_per_class is not None:
                kw["max_per_class"] = cfg.max_per_class
        try:
            return load_dataset(cfg.dataset, cfg.data_dir, **kw)
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            raise BenchConfigError(f"--dataset {cfg.dataset} --data-dir {cfg.data_dir}: {e}") from e

    def describe_data(self, data) -> str:
        return (f"{data.name}: {data.num_train_classes} train classes ({len(data.train_y)} images), "
                f"{data.num_test_classes} held-out test classes ({len(data.test_y)} images)")

    def steps_per_epoch(self, cfg, data) -> int:
        p, k = batch_shape(cfg, data.train_y)
        return PKSampler(data.train_y, p, k, 0).steps_per_epoch

    def describe_steps(self, cfg, data) -> str:
        p, k = batch_shape(cfg, data.train_y)
        return f"{super().describe_steps(cfg, data)} of P={p} x K={k}"

    # ------------------------------------------------------------------ model, step, metrics

    def setup(self, cfg, data, objective, hparams, seed, device) -> CellTrainer:
        name = base_name(objective)
        spec = registry.spec(name, kind="objective")
        input_shape = tuple(data.train_x.shape[1:])
        model = build_model(cfg.model, input_shape, cfg.embedding_dim, seed).to(device)
        kwargs = dict(hparams)
        if spec.needs_classes:
            kwargs["num_classes"] = int(data.train_y.max()) + 1
        if "embedding_dim" in spec.required or "embedding_dim" in spec.hparams:
            kwargs["embedding_dim"] = cfg.embedding_dim
        loss_fn = self.build_objective(name, kwargs, seed)
        if isinstance(loss_fn, nn.Module):
            loss_fn = loss_fn.to(device)
            extra = [p for p in loss_fn.parameters() if p.requires_grad]
        else:
            extra = []
        opt = torch.optim.Adam(list(model.parameters()) + extra, lr=cfg.lr, weight_decay=cfg.weight_decay)

        p, k = batch_shape(cfg, data.train_y)
        sampler = PKSampler(data.train_y, p, k, seed)
        aug_gen = torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET)
        train_x, train_y = data.train_x.to(device), data.train_y.to(device)

        def step() -> Tensor:
            idx = torch.from_numpy(sampler.batch()).to(device)
            x, y = train_x[idx], train_y[idx]
            if cfg.augment == "shift":
                x = shift(x, aug_gen)
            emb = model(x)
            loss = loss_fn(emb, y)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                shape = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise TypeError(f"objective {objective!r} must return a scalar loss tensor; got {shape}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        return CellTrainer(
            step=step,
            steps_per_epoch=sampler.steps_per_epoch,
            modules=[model, *([loss_fn] if isinstance(loss_fn, nn.Module) else [])],
            model=model,
            info={"batch": {"P": p, "K": k}, "model": choose_model(cfg.model, input_shape),
                  "objective_params": sum(p_.numel() for p_ in extra)},
        )

    def evaluate(self, cfg, data, trainer, device) -> Evaluation:
        from losskit import metrics as M

        emb = embed(trainer.model, data.test_x, device)
        if not torch.isfinite(emb).all():
            raise CellDiverged(f"{trainer.label} (seed {trainer.seed}): the trained network gives non-finite "
                               "embeddings")
        test_y = data.test_y.cpu()
        scores = M.evaluate_embeddings(emb, test_y, ks=cfg.ks, fars=cfg.fars)
        scores.update(linear_probe_scores(emb, test_y))
        genuine, impostor = M.pair_scores(emb, test_y)
        hist = {"bins": cfg.hist_bins, "range": [-1.0, 1.0],
                "genuine": _histogram(genuine, cfg.hist_bins), "impostor": _histogram(impostor, cfg.hist_bins)}
        return Evaluation({k_: float(v) for k_, v in scores.items()}, {"hist": hist})

    # ------------------------------------------------------------------ report

    def title(self, cfg, n_objectives: int) -> str:
        return (f"losskit bench: {cfg.dataset}, {n_objectives} objectives x {cfg.seeds} seeds, "
                f"{cfg.epochs} epochs, embedding dim {cfg.embedding_dim}")

    def plot_title(self, cfg) -> str:
        return f"losskit bench on {cfg.dataset} (held-out classes)"

    def plots(self, plt, run, rows, folder: Path, title: str) -> list[Path]:
        path = Path(folder) / "similarity_hist.png"
        _hists(plt, run.cells, [r["objective"] for r in rows], path, title)
        return [path]


def _hists(plt, cells: list[dict[str, Any]], order: list[str], path: Path, title: str) -> None:
    """Per objective: genuine vs impostor cosine-similarity densities of the held-out pairs, seeds pooled."""
    nr, nc = grid(len(order))
    fig, axes = plt.subplots(nr, nc, figsize=(max(3.6 * nc, 7.5), 2.7 * nr + 1.0),
                             squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, order):
        mine = [c for c in cells if c["objective"] == name]
        h = mine[0]["hist"]
        edges = np.linspace(h["range"][0], h["range"][1], h["bins"] + 1)
        centers = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        for key, color in (("impostor", "tab:red"), ("genuine", "tab:blue")):
            counts = np.sum([c["hist"][key] for c in mine], axis=0).astype(float)
            dens = counts / max(counts.sum() * width, 1e-12)
            ax.fill_between(centers, dens, step="mid", alpha=0.45, color=color, label=key)
        eers = [c["metrics"].get("eer") for c in mine if c["metrics"].get("eer") is not None]
        sub = f"EER {100 * np.mean(eers):.1f}%" if eers else ""
        ax.set_title(f"{name}\n{sub} ({len(mine)} seed{'s' if len(mine) > 1 else ''})", fontsize=9)
        ax.set_xlim(-1, 1)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=7, loc="upper left")
    finish_grid(plt, fig, axes, len(order), path, title + "\ncosine similarity of all held-out pairs, genuine "
                "(same class) vs impostor;\ndensities, seeds pooled")
