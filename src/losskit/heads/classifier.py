"""The normalised classifier that owns the class centres, with one option
choosing how the softmax is computed.

``MarginHead(num_classes, embedding_dim, policy, head=...)`` checks its
inputs once and hands them to the backend ``head`` names
(:mod:`losskit.heads.backends`, one interface):

* ``"dense"``: builds the ``B x C`` cosine matrix (the readable reference);
* ``"chunked"``: never builds it: online log-sum-exp over class chunks,
  recomputation in backward (:mod:`losskit.kernels.chunked_lse`); same numbers;
* ``"fused"``: row chunks spanning all classes, gradients computed during
  forward and stored (:mod:`losskit.kernels.fused_margin_ce`): 3 GEMMs
  instead of the chunked head's 4; used when the output is a scalar
  ('mean'/'sum', sample weights without gradient) and a gradient is needed,
  otherwise it runs the chunked head; same numbers;
* ``"sampled"``: Partial FC: the batch's positive centres plus random
  negatives up to ``sample_rate * C`` classes (an approximation by design;
  ``sample_rate=1`` gives the dense numbers);
* ``"sharded"``: each rank of ``process_group`` owns a contiguous slice of
  the classes; embeddings are all-gathered and the softmax is distributed
  (:mod:`losskit.heads.backends.sharded`); each rank's loss is that of its
  own rows;
* ``"auto"``: fused where it applies (a scalar loss that needs a
  gradient), else dense when ``B * C <= 2**22``, else chunked.

``tau`` (default 1, cross-entropy) makes the loss the comp-sum loss ``l_tau``
of the same logits (:mod:`losskit.functional.comp_sum`): a function of each
row's cross-entropy, so every backend computes it without building more than
it does for cross-entropy (the fused kernel scales each row block's gradient
by ``l_tau'(ce)``).

Every margin policy works in every mode (CFCD's batch statistics come from a
no-grad pass over the rows it needs; UNPG's extra columns are one scalar
log-sum-exp added to every row, the policy's ``extra_lse`` hook).  Labels
``-1`` are ignored rows: loss 0, no gradient, still counted in the
``'mean'`` denominator (``B``, the rows given, like weight 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from losskit.core.checks import (check_choice, check_embeddings, check_hparam, check_int, check_labels,
                                 check_reduction, check_sample_weight, shape_str)
from losskit.core.reduction import zero_with_graph
from losskit.heads.backends import BACKENDS, HEADS, select_sampled_classes
from losskit.heads.margin_spec import MarginPolicy
from losskit.kernels.chunked_lse import DEFAULT_CHUNK

__all__ = ["MarginHead", "HEADS", "select_sampled_classes"]

AUTO_CHUNK_ELEMS = 2 ** 21
AUTO_CHUNK_WEIGHT_ELEMS = 2 ** 19
#: with several torch threads: at most this many class chunks ...
THREADED_MAX_CHUNKS = 6
#: ... of at most this many logits each (B x chunk; 64 MiB in fp32)
THREADED_CHUNK_ELEMS = 2 ** 24


class MarginHead(nn.Module):
    def __init__(self, num_classes: int, embedding_dim: int, policy: MarginPolicy, *, head: str = "auto",
                 chunk_size: int | None = None, sample_rate: float = 0.1, process_group=None,
                 reduction: str = "mean", generator: torch.Generator | None = None,
                 row_chunk_size: int | None = None, tau: float = 1.0):
        super().__init__()
        #: the comp-sum parameter of the loss (functional.comp_sum): 1 cross-entropy (the margin losses),
        #: 0 sum-exponential, (1, 2) generalized cross-entropy, 2 MAE; every backend, same numbers
        self.tau = check_hparam("tau", tau, low=0.0)
        self.num_classes = check_int("num_classes", num_classes, low=1)
        self.embedding_dim = check_int("embedding_dim", embedding_dim, low=1)
        if not isinstance(policy, MarginPolicy):
            raise TypeError(f"policy: expected a MarginPolicy, got {type(policy).__name__}")
        self.policy = policy
        self.head = check_choice("head", head, HEADS)
        self.backend = BACKENDS[head]
        self.chunk_size = check_int("chunk_size", chunk_size, low=1, allow_none=True)
        self.sample_rate = check_hparam("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        #: rows per block of the fused head (None: kernels.fused_margin_ce.auto_row_chunk); an attribute, settable
        self.row_chunk_size = check_int("row_chunk_size", row_chunk_size, low=1, allow_none=True)
        self.reduction = check_reduction(reduction)
        self.process_group = process_group
        self.class_offset = 0
        local = num_classes
        if head == "sharded":
            from losskit.heads.backends.sharded import shard_range
            self.class_offset, end = shard_range(num_classes, process_group)
            local = end - self.class_offset
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    def chunk_for(self, batch: int, num_classes: int | None = None) -> int:
        """``chunk_size``, or automatically.

        One torch thread: a weight chunk of at most 2^19 elements (2 MiB in
        fp32, so it stays in cache between the products that read it) and
        at most 2^21 logits (``B x chunk``, 8 MiB), between 256 and 8192
        classes (C = 100k, D = 512: 1024 classes per chunk was the fastest
        or within 3% of it at B = 64 to 1024).

        Several threads: every op of the chunk loop is an OpenMP parallel
        region that ends in a barrier, and on a loaded machine (more runnable
        threads than cores) a barrier waits for a descheduled thread.  The
        chunk loop's cost then grows with the number of chunks, not with the
        work (docs/margin.md, "Threads and contention"), so the classes are
        split into at most ``THREADED_MAX_CHUNKS`` chunks, up to 2^24 logits
        per chunk."""
        if self.chunk_size is not None:
            return self.chunk_size
        dim = max(self.embedding_dim, 1)
        b = max(batch, 1)
        chunk = max(256, min(DEFAULT_CHUNK, AUTO_CHUNK_WEIGHT_ELEMS // dim, AUTO_CHUNK_ELEMS // b))
        if torch.get_num_threads() > 1:
            C = self.weight.shape[0] if num_classes is None else num_classes
            chunk = max(chunk, min(-(-C // THREADED_MAX_CHUNKS), THREADED_CHUNK_ELEMS // b))
        return chunk

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, head={self.head!r}, "
                f"policy={self.policy!r}")

    # ------------------------------------------------------------------ checks
    def _check(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None):
        check_embeddings(embeddings)
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings: expected shape [B, {self.embedding_dim}] (embedding_dim), "
                             f"got {shape_str(embeddings)}")
        if embeddings.device != self.weight.device:
            raise ValueError(f"embeddings: expected device {self.weight.device} (the head's weight), "
                             f"got {embeddings.device}")
        check_labels(labels, embeddings.shape[0], device=embeddings.device, num_classes=self.num_classes,
                     allow_ignore=True)
        return check_sample_weight(sample_weight, embeddings.shape[0], embeddings)

    # ----------------------------------------------------------------- forward
    def forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None,
                reduction: str | None = None) -> Tensor:
        """The loss of the rows given: ``[B]`` for ``reduction='none'``
        (0 on rows with label -1), else a scalar; ``'mean'`` divides by ``B``."""
        reduction = check_reduction(self.reduction if reduction is None else reduction)
        sample_weight = self._check(embeddings, labels, sample_weight)
        if embeddings.shape[0] == 0 and not self.backend.collective:
            z = zero_with_graph(embeddings, self.weight)
            return embeddings.sum(dim=1) * 0 + z if reduction == "none" else z
        dtype = torch.promote_types(embeddings.dtype, self.weight.dtype)
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        xn = Fn.normalize(embeddings.to(dtype), dim=1)
        out = self.backend.loss(self, xn, self.weight, labels, reduction, sample_weight)
        # computed in float32 for half-precision input; returned in the input's dtype, like every loss
        return out.to(embeddings.dtype) if embeddings.dtype in (torch.float16, torch.bfloat16) else out
