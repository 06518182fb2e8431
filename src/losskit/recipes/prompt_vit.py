"""A small vision transformer and MVP's prompted, masked model around it.

:class:`TinyViT` is a plain pre-norm ViT (patch embedding, class token,
learned positions, ``depth`` blocks, final LayerNorm, linear head), small
enough to pretrain on a CPU.  :class:`MVPModel` freezes it and adds what MVP
tunes (Moon et al., ICCV 2023; code KHU-AGI/Si-Blurry ``models/mvp.py``):

* a pool of ``num_prompts`` keys and expert prompts (``len_e`` tokens at each
  block of ``pos_e``) and one general prompt (``len_g`` tokens at each block of
  ``pos_g``), prompt tuning: the prompt tokens are appended to the sequence
  entering a block and dropped after it (the official ``prompt_tuning``);
* key choice from the frozen model's class-token query ``q``:
  ``k* = argmin_j (1 - cos(q, k_j)) (n_j + 1)`` with ``n_j`` the number of
  training rows that chose key ``j`` so far (``count_scaled=False``: plain
  cosine distance); the key loss is the mean distance ``1 - cos(q, k*)``;
* a mask logit vector per prompt, initialised to -1 (``2 sigmoid(-1) = 0.54``),
  returned for the chosen prompt (the official code averages over the top-k
  chosen prompts; ``k = 1`` as its default ``selection_size``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losskit.core.checks import check_int

__all__ = ["TinyViT", "MVPModel"]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """``[B, C, H, W] -> [B, num_classes]``; ``features(x)`` is the normed class token ``[B, dim]``."""

    def __init__(self, image_size: int = 28, patch_size: int = 7, channels: int = 1, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, num_classes: int = 10):
        super().__init__()
        image_size = check_int("image_size", image_size, low=1)
        patch_size = check_int("patch_size", patch_size, low=1)
        if image_size % patch_size:
            raise ValueError(f"patch_size: expected a divisor of image_size {image_size}, got {patch_size}")
        self.dim = check_int("dim", dim, low=1)
        self.patch = nn.Conv2d(channels, dim, patch_size, patch_size)
        n = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(check_int("depth", depth, low=1)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, check_int("num_classes", num_classes, low=1))

    def tokens(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1) + self.pos

    def features(self, x: Tensor) -> Tensor:
        t = self.tokens(x)
        for b in self.blocks:
            t = b(t)
        return self.norm(t)[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class MVPModel(nn.Module):
    """A frozen :class:`TinyViT` with MVP's prompts, keys, logit masks and a new head over ``num_classes``.

    ``forward(x)`` returns ``(features [B, D], mask_logits [B, C] or None, key_loss)``;
    ``logits(x, seen)`` the masked evaluation logits."""

    def __init__(self, backbone: TinyViT, num_classes: int, num_prompts: int = 5, pos_g: tuple = (0,),
                 len_g: int = 2, pos_e: tuple = (1, 2), len_e: int = 4, count_scaled: bool = True,
                 use_mask: bool = True):
        super().__init__()
        if not isinstance(backbone, TinyViT):
            raise TypeError(f"backbone: expected a TinyViT, got {type(backbone).__name__}")
        depth = len(backbone.blocks)
        for p in tuple(pos_g) + tuple(pos_e):
            if not 0 <= int(p) < depth:
                raise ValueError(f"pos_g/pos_e: expected block indices in [0, {depth - 1}], got {p}")
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        D = backbone.dim
        P = check_int("num_prompts", num_prompts, low=1)
        self.num_classes = check_int("num_classes", num_classes, low=1)
        self.pos_g, self.pos_e = tuple(int(p) for p in pos_g), tuple(int(p) for p in pos_e)
        self.len_g, self.len_e = check_int("len_g", len_g, low=1), check_int("len_e", len_e, low=1)
        self.count_scaled, self.use_mask = bool(count_scaled), bool(use_mask)
        self.key = nn.Parameter(torch.randn(P, D))
        self.g_prompt = nn.Parameter(torch.randn(len(self.pos_g), self.len_g, D) * 0.02)
        self.e_prompts = nn.Parameter(torch.randn(P, len(self.pos_e), self.len_e, D) * 0.02)
        self.mask = nn.Parameter(torch.full((P, self.num_classes), -1.0))
        self.head = nn.Linear(D, self.num_classes)
        self.register_buffer("count", torch.zeros(P))

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout/statistics updates, as the official forward_features
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        bb = self.backbone
        with torch.no_grad():
            q = bb.features(x)
        dist = 1 - F.cosine_similarity(q[:, None, :], self.key[None], dim=-1)      # [B, P]
        score = dist * (self.count + 1) if self.count_scaled else dist
        k = score.argmin(1)
        key_loss = dist.gather(1, k[:, None]).mean()
        if self.training:
            with torch.no_grad():
                self.count += torch.bincount(k, minlength=self.count.shape[0]).to(self.count.dtype)
        t = bb.tokens(x)
        n = t.shape[1]
        e = self.e_prompts[k]                                                      # [B, |pos_e|, Le, D]
        for i, blk in enumerate(bb.blocks):
            extra = []
            if i in self.pos_g:
                extra.append(self.g_prompt[self.pos_g.index(i)].expand(t.shape[0], -1, -1))
            if i in self.pos_e:
                extra.append(e[:, self.pos_e.index(i)])
            t = blk(torch.cat([t, *extra], 1) if extra else t)[:, :n]
        feats = bb.norm(t)[:, 0]
        mask_logits = self.mask[k] if self.use_mask else None
        return feats, mask_logits, key_loss

    @torch.no_grad()
    def logits(self, x: Tensor, seen: Tensor | None = None) -> Tensor:
        from losskit.functional.mvp import masked_logits
        f, m, _ = self(x)
        return masked_logits(self.head(f), m, seen)
