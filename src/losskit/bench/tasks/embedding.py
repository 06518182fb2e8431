"""The ``embedding`` task: open-set retrieval and verification on held-out classes.

Every objective trains the same network (initialised from the seed alone) on
the same class-balanced P x K batches, with the same augmentation draws,
optimiser (``--optimizer``, default Adam, on the network's and the objective's parameters) and number
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
from ..optim_axis import build_optim_axis
from ..plots import finish_grid, grid
from .base import CellTrainer, Evaluation, Metric, Task, check_scalar_loss

__all__ = ["EmbeddingTask", "batch_shape", "shift", "affine", "embed", "RAW", "UNTRAINED"]

#: the baseline rows: the test images themselves, and the network as initialised
RAW, UNTRAINED = "(raw input)", "(untrained network)"

#: the seed offset of the augmentation generator (a cell's shifts depend on its seed only)
AUGMENT_SEED_OFFSET = 104729


def batch_shape(cfg, labels: Tensor) -> tuple[int, int]:
    """``(P, K)`` for ``cfg`` (``--batch-classes``/``--batch-samples``, 0 = from the data;
    see :func:`losskit.data.samplers.pk_batch_shape`), from the classes with at least 2 images."""
    counts = torch.bincount(labels.cpu())
    pairable = labels[torch.isin(labels.cpu(), (counts >= 2).nonzero().flatten())]  # singletons never form a pair
    try:
        return pk_batch_shape(pairable if len(pairable) else labels, cfg.batch_size, cfg.batch_classes,
                              cfg.batch_samples)
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


#: Koch et al. 2015, sec. 4.4 (at 105x105 pixels): rotation in [-10, 10] degrees, shear in [-0.3, 0.3],
#: scale in [0.8, 1.2], translation in [-2, 2] pixels; each part applied with probability 0.5
AFFINE = {"rotate_deg": 10.0, "shear": 0.3, "scale": (0.8, 1.2), "translate_px_at_105": 2.0, "p": 0.5}


def affine(x: Tensor, gen: torch.Generator, params: dict | None = None) -> Tensor:
    """Random affine distortion per image, as the Siamese one-shot paper (Koch et al. 2015,
    sec. 4.4, :data:`AFFINE`; ``params`` overrides some of its keys, e.g. ``{"p": 1.0}``); the
    translation is the same fraction of the image at any size; bilinear resampling, edge pixels
    repeated outside the image."""
    b = x.shape[0]
    unknown = sorted(set(params or {}) - set(AFFINE))
    if unknown:
        raise ValueError(f"params: unknown keys {unknown}; expected some of {sorted(AFFINE)}")
    a = {**AFFINE, **(params or {})}

    def draw(low, high):
        return low + (high - low) * torch.rand(b, generator=gen)

    def on():
        return (torch.rand(b, generator=gen) < a["p"]).float()

    theta = torch.deg2rad(draw(-a["rotate_deg"], a["rotate_deg"])) * on()
    shx, shy = draw(-a["shear"], a["shear"]) * on(), draw(-a["shear"], a["shear"]) * on()
    sx = 1 + (draw(*a["scale"]) - 1) * on()
    sy = 1 + (draw(*a["scale"]) - 1) * on()
    t = 2 * a["translate_px_at_105"] / 105.0
    tx, ty = draw(-t, t) * on(), draw(-t, t) * on()
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # [B, 2, 2]
    shear = torch.stack([torch.stack([torch.ones(b), shx], 1), torch.stack([shy, torch.ones(b)], 1)], 1)
    scale = torch.diag_embed(torch.stack([sx, sy], 1))
    m = rot @ shear @ scale
    mat = torch.cat([m, torch.stack([tx, ty], 1)[:, :, None]], 2).to(x.device, x.dtype)  # [B, 2, 3]
    grid = torch.nn.functional.affine_grid(mat, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _autocast(cfg, device: torch.device):
    """``torch.autocast`` for ``--amp`` (bf16 on CPU and CUDA, fp16 on CUDA), else a null context."""
    import contextlib

    amp = getattr(cfg, "amp", "none")
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def embed(model: nn.Module, x: Tensor, device: torch.device, chunk: int = 1024) -> Tensor:
    model.eval()
    return torch.cat([model(x[i:i + chunk].to(device)).float().cpu() for i in range(0, len(x), chunk)])


def _histogram(scores: Tensor, bins: int, low: float, high: float) -> list[int]:
    return torch.histc(scores.float().clamp(low, high), bins=bins, min=low, max=high).long().tolist()


#: the stored histograms have ``hist_bins * HIST_FINE`` bins on [-1, 1]; the plot crops them to the
#: data's range and merges them back to about ``hist_bins`` bins there
HIST_FINE = 10


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
    # the margin heads; plain ``arcface`` is head='auto', which trains with the fused head.  The sampled head
    # is not in the default list: where a batch holds every class (digits: P = C = 5) it is the full
    # softmax and its row repeats arcface's
    default_variants = {"arcface": ("arcface[head=dense]", "arcface[head=chunked]")}
    metrics = (
        Metric("recall@1", "R@1"),
        Metric("recall@4", "R@4"),
        Metric("map@r", "MAP@R"),
        Metric("tar@far=0.001", "TAR@1e-3"),
        Metric("tar@far=0.01", "TAR@1e-2"),
        Metric("eer", "EER", lower_is_better=True),
        Metric("opis", "OPIS", percent=False, lower_is_better=True),
        Metric("oneshot_error", "1-shot err", lower_is_better=True),
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
    supports_splits = True
    baselines = (RAW, UNTRAINED)
    baseline_notes = {
        RAW: "the held-out images flattened, minus the training images' mean, cosine similarity",
        UNTRAINED: "the network at the seed's initialisation (what every objective starts from)",
    }

    def validate(self, cfg) -> None:
        if cfg.dataset != "digits" and not cfg.data_dir:
            raise BenchConfigError(f"--dataset {cfg.dataset} needs --data-dir PATH")
        from ..model import check_model

        try:
            check_model(cfg.model)
        except ValueError as e:
            raise BenchConfigError(str(e)) from None
        if getattr(cfg, "oneshot", False) and cfg.dataset != "omniglot":
            raise BenchConfigError(f"--oneshot is Omniglot's 20-way one-shot task; --dataset is {cfg.dataset}")
        if getattr(cfg, "train_on", "split") == "all":
            if cfg.dataset != "omniglot" or not getattr(cfg, "oneshot", False):
                raise BenchConfigError("--train-on all trains on every Omniglot background class and holds out the "
                                       "one-shot runs: it needs --dataset omniglot --oneshot; got --dataset "
                                       f"{cfg.dataset}{' --oneshot' if getattr(cfg, 'oneshot', False) else ''}")
            if getattr(cfg, "splits", 1) > 1 or getattr(cfg, "split_seed", 0):
                raise BenchConfigError(f"--train-on all pools every background class, so there is no class split to "
                                       f"repeat or seed; got --splits {cfg.splits} --split-seed {cfg.split_seed}")
        on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        if getattr(cfg, "amp", "none") == "fp16" and on_cpu:
            raise BenchConfigError("--amp fp16 needs CUDA; use --amp bf16 on CPU")

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
        """The open-set split the config names (class split 0)."""
        return self.load_split(cfg, 0)

    def load_split(self, cfg, split: int):
        """Class split ``split``, its seed ``cfg.split_seed + split`` (digits: seed 0 = classes 0-4
        train; another seed holds out 5 digits chosen by it; a folder: its loader's seeded rule;
        Omniglot: seed 0 = the background splits as stored, another seed holds out whole
        alphabets of both, chosen by it)."""
        from losskit.data import load_dataset
        from losskit.data.folder import split_classes

        seed = int(getattr(cfg, "split_seed", 0)) + int(split)
        kw: dict[str, Any] = {}
        if cfg.dataset in ("folder", "omniglot"):
            kw["image_size"] = cfg.image_size
            kw["skip_bad_images"] = bool(getattr(cfg, "skip_bad_images", False))
            if cfg.max_per_class is not None:
                kw["max_per_class"] = cfg.max_per_class
        if cfg.dataset == "folder":
            kw["seed"] = seed
        elif cfg.dataset == "omniglot" and seed:
            kw["split_seed"] = seed
        elif cfg.dataset == "digits" and seed:
            kw["train_classes"] = [int(c) for c in split_classes([str(d) for d in range(10)], 0.5, seed)[0]]
        try:
            data = load_dataset(cfg.dataset, cfg.data_dir, **kw)
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            raise BenchConfigError(f"--dataset {cfg.dataset} --data-dir {cfg.data_dir}: {e}") from None
        if getattr(cfg, "oneshot", False):
            from losskit.data.omniglot import load_oneshot_runs

            try:
                data.oneshot = load_oneshot_runs(cfg.data_dir, cfg.image_size)
            except (FileNotFoundError, NotADirectoryError, ValueError) as e:
                raise BenchConfigError(f"--oneshot --data-dir {cfg.data_dir}: {e}") from None
            if getattr(cfg, "train_on", "split") == "all":
                from losskit.data.omniglot import train_on_background

                runs = data.oneshot
                data = train_on_background(data, runs)
                data.oneshot = runs
        if getattr(cfg, "rotation_classes", False):
            from losskit.data.split import with_rotation_classes

            runs = getattr(data, "oneshot", None)
            data = with_rotation_classes(data)
            if runs is not None:
                data.oneshot = runs
        return data

    def data_name(self, cfg, data) -> str:
        name = str(getattr(data, "name", cfg.dataset))
        if name.startswith("folder:"):
            return f"folder {Path(name[len('folder:'):]).name or name}"
        return name

    def check_data(self, cfg, data) -> list[str]:
        """Singleton classes and classes below K in training are warned about (the sampler leaves
        them out); held-out data on which retrieval is undefined is an error saying why."""
        warnings = []
        skipped = list(getattr(data, "skipped", []) or [])
        if skipped:
            warnings.append(f"{len(skipped)} unreadable image file{'s' if len(skipped) > 1 else ''} left out "
                            f"(--skip-bad-images): {', '.join(skipped)}")
        p, k = batch_shape(cfg, data.train_y)
        counts = torch.bincount(data.train_y, minlength=len(data.train_classes))
        small = [(str(data.train_classes[i]), int(n)) for i, n in enumerate(counts.tolist()) if n < k]
        if small:
            ones = sum(1 for _, n in small if n <= 1)
            warnings.append(
                f"{len(small)} training class{'es' if len(small) > 1 else ''} below K={k} images "
                f"({ones} with one image or none) left out of the P x K batches, so that no positive pair is an image "
                f"with itself: " + ", ".join(f"{c} ({n})" for c, n in small[:20]) + (" ..." if len(small) > 20 else ""))
        test_counts = torch.bincount(data.test_y, minlength=len(data.test_classes)) if len(data.test_y) else \
            torch.zeros(len(data.test_classes), dtype=torch.long)
        usable = int((test_counts >= 2).sum())
        if usable == 0:
            raise BenchConfigError(
                f"no held-out class has 2 or more images ({len(data.test_y)} images over {len(data.test_classes)} "
                f"classes{f', --max-per-class {cfg.max_per_class}' if cfg.max_per_class else ''}), so no query has "
                "a same-class neighbour: Recall@k, MAP@R and the verification metrics are undefined. Give each class "
                "at least 2 images.")
        if usable < 2:
            raise BenchConfigError(
                "only one held-out class has 2 or more images: verification (TAR, EER) needs same-class pairs and "
                "other-class pairs among them; give at least two held-out classes 2 or more images.")
        lone = int((test_counts == 1).sum())
        if lone:
            warnings.append(f"{lone} held-out class{'es' if lone > 1 else ''} with a single image: such images "
                            "are distractors only (never queries: they have no same-class neighbour)")
        return warnings

    def describe_data(self, data) -> str:
        return (f"{data.name}: {data.num_train_classes} train classes ({len(data.train_y)} images), "
                f"{data.num_test_classes} held-out test classes ({len(data.test_y)} images)")

    def steps_per_epoch(self, cfg, data) -> int:
        p, k = batch_shape(cfg, data.train_y)
        return self._sampler(data.train_y, p, k, 0).steps_per_epoch

    @staticmethod
    def _sampler(labels: Tensor, p: int, k: int, seed: int) -> PKSampler:
        """P x K batches over the training classes with at least K images (``check_data`` warns
        about the others); one epoch is still ``ceil(N / (P*K))`` batches of all N images."""
        counts = torch.bincount(labels)
        keep = torch.isin(labels, (counts >= k).nonzero().flatten())
        n_keep = int((counts >= k).sum())
        if n_keep < p:
            raise BenchConfigError(
                f"P={p} classes per batch, but only {n_keep} training classes have K={k} or more images "
                f"(--batch-classes, --batch-samples)")
        rows = keep.nonzero().flatten()
        sampler = PKSampler(labels[rows], p, k, seed)
        sampler.by_class = [rows[torch.from_numpy(ix)].numpy() for ix in sampler.by_class]
        sampler.steps_per_epoch = max(1, -(-len(labels) // (p * k)))
        return sampler

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
        loss_fn, extra = self.build_trainable_objective(name, kwargs, seed, device)
        p, k = batch_shape(cfg, data.train_y)
        sampler = self._sampler(data.train_y, p, k, seed)
        axis = build_optim_axis(cfg, model, extra, cfg.epochs * sampler.steps_per_epoch, objective, seed)
        opt = axis.optimizer
        aug_gen = torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET)
        train_x, train_y = data.train_x.to(device), data.train_y.to(device)

        def step() -> Tensor:
            idx = torch.from_numpy(sampler.batch()).to(device)
            x, y = train_x[idx], train_y[idx]
            if cfg.augment == "shift":
                x = shift(x, aug_gen)
            elif cfg.augment == "affine":
                x = affine(x, aug_gen)
            with _autocast(cfg, device):
                emb = model(x)
            loss = loss_fn(emb, y)
            check_scalar_loss(loss, objective)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            axis.after_step()
            return loss.detach()

        axis.info = {"batch": {"P": p, "K": k}, "model": choose_model(cfg.model, input_shape),
                     "objective_params": sum(p_.numel() for p_ in extra), **axis.info}
        return CellTrainer(
            step=step,
            steps_per_epoch=sampler.steps_per_epoch,
            modules=[model, *([loss_fn] if isinstance(loss_fn, nn.Module) else [])],
            model=model,
            info=axis.info,
            on_end=axis.finish,  # the optimiser axis adds the recorded gradient norms when training ends
        )

    def check_objective(self, cfg, data, label, hparams, device) -> None:
        """Build the objective as :meth:`setup` would (the network is left out: it is the same for
        every objective and built once here)."""
        name = base_name(label)
        spec = registry.spec(name, kind="objective")
        kwargs = dict(hparams)
        if spec.needs_classes:
            kwargs["num_classes"] = int(data.train_y.max()) + 1
        if "embedding_dim" in spec.required or "embedding_dim" in spec.hparams:
            kwargs["embedding_dim"] = cfg.embedding_dim
        if not getattr(self, "_model_checked", None) == (cfg.model, tuple(data.train_x.shape[1:])):
            try:
                build_model(cfg.model, tuple(data.train_x.shape[1:]), cfg.embedding_dim, 0)
            except ValueError as e:
                raise BenchConfigError(str(e)) from None
            self._model_checked = (cfg.model, tuple(data.train_x.shape[1:]))
        self.build_objective(name, kwargs, 0)

    def evaluate_baseline(self, cfg, data, name, seed, device) -> Evaluation:
        from losskit import metrics as M

        if name == RAW:
            emb = (data.test_x.flatten(1) - data.train_x.flatten(1).mean(0, keepdim=True)).float()
        elif name == UNTRAINED:
            model = build_model(cfg.model, tuple(data.train_x.shape[1:]), cfg.embedding_dim, seed).to(device)
            emb = embed(model, data.test_x, device)
        else:
            return super().evaluate_baseline(cfg, data, name, seed, device)
        scores = M.evaluate_embeddings(emb, data.test_y.cpu(), ks=cfg.ks, fars=cfg.fars)
        extras = {"hist": self._hist(cfg, emb, data.test_y.cpu())}
        if getattr(data, "oneshot", None) is not None:
            from losskit.data.omniglot import oneshot_error

            if name == RAW:
                mean = data.train_x.flatten(1).mean(0, keepdim=True)
                scores.update(oneshot_error(lambda x: x.flatten(1) - mean, data.oneshot))
            else:
                scores.update(oneshot_error(lambda x: embed(model, x, device), data.oneshot))
        return Evaluation({k_: float(v) for k_, v in scores.items()}, extras)

    def track(self, cfg, data, trainer, device) -> float | None:
        """Held-out Recall@1 (= precision@1) of the network as it trains."""
        from losskit.metrics import precision_at_1

        emb = embed(trainer.model, data.test_x, device)
        if not torch.isfinite(emb).all():
            return float("nan")
        return float(precision_at_1(emb, data.test_y.cpu()))

    def model_record(self, cfg, data, trainer) -> dict[str, Any] | None:
        record = super().model_record(cfg, data, trainer)
        if record is not None:
            record.update(model=cfg.model, input_shape=list(data.train_x.shape[1:]), embedding_dim=cfg.embedding_dim,
                          test_classes=[str(c) for c in data.test_classes])
        return record

    def _hist(self, cfg, emb: Tensor, labels: Tensor) -> dict[str, Any]:
        from losskit import metrics as M

        genuine, impostor = M.pair_scores(emb, labels)
        bins = cfg.hist_bins * HIST_FINE
        return {"bins": bins, "range": [-1.0, 1.0], "plot_bins": cfg.hist_bins,
                "genuine": _histogram(genuine, bins, -1.0, 1.0), "impostor": _histogram(impostor, bins, -1.0, 1.0)}

    def evaluate(self, cfg, data, trainer, device) -> Evaluation:
        from losskit import metrics as M

        emb = embed(trainer.model, data.test_x, device)
        if not torch.isfinite(emb).all():
            raise CellDiverged(f"{trainer.label} (seed {trainer.seed}): the trained network gives non-finite "
                               "embeddings")
        test_y = data.test_y.cpu()
        scores = M.evaluate_embeddings(emb, test_y, ks=cfg.ks, fars=cfg.fars)
        scores.update(linear_probe_scores(emb, test_y))
        if getattr(data, "oneshot", None) is not None:
            from losskit.data.omniglot import oneshot_error

            scores.update(oneshot_error(lambda x: embed(trainer.model, x, device), data.oneshot))
        return Evaluation({k_: float(v) for k_, v in scores.items()}, {"hist": self._hist(cfg, emb, test_y)})

    # ------------------------------------------------------------------ report

    def title(self, cfg, n_objectives: int) -> str:
        splits = getattr(cfg, "splits", 1)
        return (f"losskit bench: {cfg.dataset}, {n_objectives} objectives x {cfg.seeds} seeds"
                + (f" x {splits} class splits" if splits > 1 else "")
                + f", {cfg.epochs} epochs, embedding dim {cfg.embedding_dim}")

    def plot_title(self, cfg, data_name: str | None = None) -> str:
        return f"losskit bench on {data_name or cfg.dataset} (held-out classes)"

    def plots(self, plt, run, rows, folder: Path, title: str) -> list[Path]:
        path = Path(folder) / "similarity_hist.png"
        cells = [*run.cells, *getattr(run, "baseline_cells", [])]
        order = [r["objective"] for r in rows] + list(dict.fromkeys(c["objective"] for c in
                                                                  getattr(run, "baseline_cells", [])))
        _hists(plt, cells, order, path, title)
        return [path]


def _pooled(mine: list[dict[str, Any]]) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """The cells' histograms summed (they share bins: ``hist_bins * HIST_FINE`` on [-1, 1]):
    (edges, {"genuine": counts, "impostor": counts}, bins to show)."""
    h0 = mine[0]["hist"]
    edges = np.linspace(h0["range"][0], h0["range"][1], h0["bins"] + 1)
    counts = {k: np.sum([np.asarray(c["hist"][k], dtype=float) for c in mine], axis=0) for k in ("genuine", "impostor")}
    return edges, counts, int(h0.get("plot_bins", h0["bins"]))


def _crop(edges: np.ndarray, counts: dict[str, np.ndarray], show: int):
    """Crop to the bins holding data and merge them into about ``show`` bins."""
    total = counts["genuine"] + counts["impostor"]
    nz = np.flatnonzero(total)
    if len(nz) == 0:
        return edges, counts
    a, b = int(nz[0]), int(nz[-1]) + 1
    merge = max(1, -(-(b - a) // max(show, 1)))
    b = min(len(total), a + merge * (-(-(b - a) // merge)))
    a = max(0, b - merge * (-(-(b - a) // merge)))
    out = {k: v[a:b].reshape(-1, merge).sum(1) for k, v in counts.items()}
    return edges[a:b + 1:merge], out


def _hists(plt, cells: list[dict[str, Any]], order: list[str], path: Path, title: str) -> None:
    """Per objective: genuine vs impostor cosine-similarity densities of the held-out pairs, seeds
    pooled, on the range of the data (each panel its own), with axes."""
    order = [o for o in order if any(c["objective"] == o and "hist" in c for c in cells)]
    nr, nc = grid(len(order))
    fig, axes = plt.subplots(nr, nc, figsize=(max(3.8 * nc, 7.5), 2.8 * nr + 1.2),
                             squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, order):
        mine = [c for c in cells if c["objective"] == name and "hist" in c]
        mine = [c for c in mine if c["hist"]["bins"] == mine[0]["hist"]["bins"]]  # cells of older runs differ
        edges, counts, show = _pooled(mine)
        if len(edges) - 1 == show * HIST_FINE:
            edges, counts = _crop(edges, counts, show)
        centers = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        for key, color in (("impostor", "tab:red"), ("genuine", "tab:blue")):
            dens = counts[key] / max(counts[key].sum() * width, 1e-12)
            ax.fill_between(centers, dens, step="mid", alpha=0.45, color=color, label=key)
        eers = [c["metrics"].get("eer") for c in mine if c["metrics"].get("eer") is not None]
        sub = f"EER {100 * np.mean(eers):.1f}%" if eers else ""
        ax.set_title(f"{name}\n{sub} ({len(mine)} run{'s' if len(mine) > 1 else ''})", fontsize=9)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel("cosine similarity", fontsize=7)
        ax.set_ylabel("density", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if order:
        axes.flat[0].legend(fontsize=7, loc="upper left")
    finish_grid(plt, fig, axes, len(order), path, title + "\ncosine similarity of all held-out pairs, genuine "
                "(same class) vs impostor;\ndensities, seeds pooled, each panel on its data's range")
