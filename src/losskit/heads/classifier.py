"""The normalised classifier that owns the class centres, with one option
choosing how the softmax is computed.

``MarginHead(num_classes, embedding_dim, policy, head=...)``:

* ``"dense"``: builds the ``B x C`` cosine matrix (the readable reference);
* ``"chunked"``: never builds it: online log-sum-exp over class chunks,
  recomputation in backward (:mod:`losskit.heads.chunked`); same numbers;
* ``"sampled"``: Partial FC: the batch's positive centres plus random
  negatives up to ``sample_rate * C`` classes (an approximation by design;
  ``sample_rate=1`` gives the dense numbers);
* ``"sharded"``: each rank of ``process_group`` owns a contiguous slice of
  the classes; embeddings are all-gathered and the softmax is distributed
  (:mod:`losskit.distributed.sharded_softmax`);
* ``"fused"``: row chunks spanning all classes, gradients computed during
  forward and stored (:mod:`losskit.heads.fused`): 3 GEMMs instead of the
  chunked head's 4; used when the output is a scalar ('mean'/'sum', sample
  weights without gradient) and a gradient is needed, otherwise it runs the
  chunked head; same numbers;
* ``"auto"``: fused where it applies (a scalar loss that needs a
  gradient), else dense when ``B * C <= 2**22``, else chunked.

Every margin policy works in every mode (CFCD's batch statistics come from a
no-grad pass over the rows it needs; UNPG's extra columns are one scalar
log-sum-exp added to every row).  Labels ``-1`` are ignored rows: loss 0, no
gradient, still counted in the ``'mean'`` denominator (like weight 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from losskit._checks import (check_embeddings, check_labels, check_reduction, check_sample_weight, reduce_loss,
                             zero_with_graph)
from losskit.functional import margins as FM
from losskit.heads.chunked import DEFAULT_CHUNK, nontarget_lse, nontarget_lse_nograd
from losskit.heads.fused import fused_margin_ce
from losskit.heads.margin_spec import MarginPolicy

__all__ = ["MarginHead", "HEADS", "select_sampled_classes"]

HEADS = ("auto", "dense", "chunked", "fused", "sampled", "sharded")
AUTO_DENSE_MAX = 2 ** 22
AUTO_CHUNK_ELEMS = 2 ** 21
AUTO_CHUNK_WEIGHT_ELEMS = 2 ** 19


def select_sampled_classes(labels: Tensor, num_classes: int, sample_rate: float,
                           generator: torch.Generator | None = None) -> Tensor:
    """Partial FC class selection: the batch's positive classes plus random
    others up to ``ceil(sample_rate * C)`` classes (never fewer than the
    positives).  Returns sorted class indices."""
    pos = torch.unique(labels[labels >= 0])
    k = int(math.ceil(sample_rate * num_classes))
    if k <= pos.numel():
        return pos
    score = torch.rand(num_classes, generator=generator).to(labels.device)
    score[pos] = 2.0
    return torch.sort(torch.topk(score, k).indices).values


class MarginHead(nn.Module):
    def __init__(self, num_classes: int, embedding_dim: int, policy: MarginPolicy, *, head: str = "auto",
                 chunk_size: int | None = None, sample_rate: float = 0.1, process_group=None,
                 unpg_whisker: float | None = None, reduction: str = "mean",
                 generator: torch.Generator | None = None, row_chunk_size: int | None = None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected an integer >= 1, got {num_classes!r}")
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim: expected an integer >= 1, got {embedding_dim!r}")
        if head not in HEADS:
            raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size: expected None (auto) or an integer >= 1, got {chunk_size!r}")
        if not (0.0 < sample_rate <= 1.0):
            raise ValueError(f"sample_rate: expected a value in (0, 1], got {sample_rate!r}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.policy, self.head, self.chunk_size = policy, head, chunk_size
        self.sample_rate, self.unpg_whisker, self.generator = float(sample_rate), unpg_whisker, generator
        if row_chunk_size is not None and (not isinstance(row_chunk_size, int) or row_chunk_size < 1):
            raise ValueError(f"row_chunk_size: expected None (auto) or an integer >= 1, got {row_chunk_size!r}")
        #: rows per block of the fused head (None: heads.fused.auto_row_chunk); an attribute, settable
        self.row_chunk_size = row_chunk_size
        self.reduction = check_reduction(reduction)
        self.process_group = process_group
        self.class_offset = 0
        local = num_classes
        if head == "sharded":
            from losskit.distributed.sharded_softmax import shard_range
            self.class_offset, end = shard_range(num_classes, process_group)
            local = end - self.class_offset
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    def _chunk(self, batch: int) -> int:
        """``chunk_size``, or automatically: a weight chunk of at most 2^19
        elements (2 MiB in fp32, so it stays in cache between the products
        that read it) and at most 2^21 logits (``B x chunk``, 8 MiB), between
        256 and 8192 classes.  On the project's CPU (C = 100k, D = 512, one
        thread) 1024 classes per chunk was the fastest or within 3% of it at
        B = 64 to 1024 (B = 256: 1.37 s against 1.56 s with 8192)."""
        if self.chunk_size is not None:
            return self.chunk_size
        dim = max(self.embedding_dim, 1)
        return max(256, min(DEFAULT_CHUNK, AUTO_CHUNK_WEIGHT_ELEMS // dim, AUTO_CHUNK_ELEMS // max(batch, 1)))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, head={self.head!r}, "
                f"policy={self.policy!r}")

    # ------------------------------------------------------------------ checks
    def _check(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None):
        check_embeddings(embeddings)
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings: expected shape [B, {self.embedding_dim}] (embedding_dim), "
                             f"got {list(embeddings.shape)}")
        if embeddings.device != self.weight.device:
            raise ValueError(f"embeddings: expected device {self.weight.device} (the head's weight), "
                             f"got {embeddings.device}")
        check_labels(labels, embeddings.shape[0], device=embeddings.device, num_classes=self.num_classes,
                     allow_ignore=True)
        return check_sample_weight(sample_weight, embeddings.shape[0], embeddings)

    # ----------------------------------------------------------------- forward
    def forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None,
                reduction: str | None = None) -> Tensor:
        reduction = check_reduction(self.reduction if reduction is None else reduction)
        sample_weight = self._check(embeddings, labels, sample_weight)
        if self.head == "sharded":
            from losskit.distributed.sharded_softmax import sharded_margin_loss
            per, sw = sharded_margin_loss(self, embeddings, labels, sample_weight)
            return reduce_loss(per, reduction, sw)
        B = embeddings.shape[0]
        if B == 0:
            z = zero_with_graph(embeddings, self.weight)
            return embeddings.sum(dim=1) * 0 + z if reduction == "none" else z
        dtype = torch.promote_types(embeddings.dtype, self.weight.dtype)
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        weight, y = self.weight, labels
        mode = self.head
        if mode == "sampled":
            idx = select_sampled_classes(labels, self.num_classes, self.sample_rate, self.generator)
            weight = self.weight[idx]
            y = torch.where(labels >= 0, torch.searchsorted(idx, labels.clamp_min(0)), labels)
            mode = "auto"
        fusable = (reduction != "none" and torch.is_grad_enabled()
                   and (embeddings.requires_grad or weight.requires_grad)
                   and (sample_weight is None or not sample_weight.requires_grad))
        if mode == "auto":
            # fused was as fast as or faster than dense at every size measured (B x C from
            # 8 x 50 to 1024 x 100k, one CPU thread; docs/margin.md)
            mode = "fused" if fusable else ("dense" if B * weight.shape[0] <= AUTO_DENSE_MAX else "chunked")
        elif mode == "fused" and not fusable:
            mode = "chunked"
        xn = Fn.normalize(embeddings.to(dtype), dim=1)
        if mode == "fused":
            coef = torch.ones(B, dtype=dtype, device=xn.device) if sample_weight is None \
                else sample_weight.detach().to(dtype)
            if reduction == "mean":
                coef = coef / B
            return self._fused(xn, weight, y, coef).to(dtype)
        per = self._per_sample(xn, weight, y, mode, embeddings)
        return reduce_loss(per.to(dtype), reduction, sample_weight)

    def _extra(self, xn: Tensor, labels: Tensor, scale: float) -> Tensor | None:
        if self.unpg_whisker is None:
            return None
        neg = FM.unpg_negatives(xn, labels, self.unpg_whisker)
        if neg.numel() == 0:
            return None
        return torch.logsumexp(neg * scale, 0)

    def _prepare_chunked(self, xn: Tensor, weight: Tensor, y: Tensor) -> float:
        """Phase 1 for the class-chunked and fused heads: the policy's batch
        statistics on the detached target cosines of the valid rows (CFCD's
        median and ``B_i``, ElasticFace's draws and "+" ranking)."""
        valid = y >= 0
        yc = y.clamp_min(0)
        vrows = valid.nonzero().squeeze(1)
        ly = torch.where(valid, yc, torch.full_like(yc, -1))
        with torch.no_grad():
            w0 = weight[yc].to(xn.dtype)
            w0 = w0 / torch.linalg.vector_norm(w0, dim=1, keepdim=True).clamp_min(1e-12)
            c0 = torch.linalg.vecdot(xn.detach(), w0)

        def nt_lse(rows: Tensor, s: float) -> Tensor:
            r = vrows[rows]
            return nontarget_lse_nograd(xn[r], weight, ly[r], s, self._chunk(xn.shape[0]))

        return float(self.policy.prepare(c0[valid].clamp(-1.0, 1.0), training=self.training, nontarget_lse=nt_lse))

    def _fused(self, xn: Tensor, weight: Tensor, y: Tensor, coef: Tensor) -> Tensor:
        scale = self._prepare_chunked(xn, weight, y)
        valid = y >= 0

        def target_fn(cos_y: Tensor) -> Tensor:
            psi_v = self.policy.target(cos_y[valid])
            return torch.zeros_like(cos_y).masked_scatter(valid, psi_v.to(cos_y.dtype)) * scale

        extra_fn = None if self.unpg_whisker is None else (lambda x: self._extra(x, y, scale))
        return fused_margin_ce(xn, weight, y, coef, scale, target_fn, extra_fn, self.row_chunk_size)

    def _per_sample(self, xn: Tensor, weight: Tensor, y: Tensor, mode: str, embeddings: Tensor) -> Tensor:
        valid = y >= 0
        yc = y.clamp_min(0)
        vrows = valid.nonzero().squeeze(1)
        if mode == "dense":
            with torch.autocast(device_type=xn.device.type, enabled=False):
                cos = torch.mm(xn, Fn.normalize(weight.to(xn.dtype), dim=1).t())
            cos_y = cos.gather(1, yc[:, None]).squeeze(1)

            def nt_lse(rows: Tensor, s: float) -> Tensor:
                with torch.no_grad():
                    r = vrows[rows]
                    lg = (cos[r] * s).scatter(1, yc[r][:, None], float("-inf"))
                    return torch.logsumexp(lg, 1)

            scale = float(self.policy.prepare(cos_y.detach()[valid].clamp(-1.0, 1.0), training=self.training,
                                              nontarget_lse=nt_lse))
        else:
            scale = self._prepare_chunked(xn, weight, y)
        extra = self._extra(xn, y, scale)
        if mode != "dense":
            # chunked: the kernel returns the non-target LSE and the target cosine
            ly = torch.where(valid, yc, torch.full_like(yc, -1))
            n, cos_y = nontarget_lse(xn, weight, ly, scale, self._chunk(xn.shape[0]), return_target=True)
            cos_y = cos_y.clamp(-1.0, 1.0)
        psi_v = self.policy.target(cos_y[valid])
        psi = torch.zeros_like(cos_y).masked_scatter(valid, psi_v.to(cos_y.dtype))
        if mode == "dense":
            logits = FM.apply_target(cos, y, psi, scale)
            lse = torch.logsumexp(logits, 1)
            if extra is not None:
                lse = torch.logaddexp(lse, extra)
            tgt = logits.gather(1, yc[:, None]).squeeze(1)
            return torch.where(valid, lse - tgt, torch.zeros_like(lse))
        t = psi * scale
        if extra is not None:
            n = torch.logaddexp(n, extra)
        lse = torch.logaddexp(n, t)
        return torch.where(valid, lse - t, torch.zeros_like(lse))
