"""Cross-batch memory (XBM; Wang et al., CVPR 2020, arXiv 1912.06798).

A FIFO queue of detached embeddings and labels from past iterations; the
current batch is scored against it with any losskit pair loss.  As in the
official code (msight-tech/research-xbm), the batch is enqueued first and
the loss is ``loss(batch, batch) + weight * loss(batch, memory)``; the
queued copy of each anchor is excluded from its own pairs (the reference's
``self_index``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from losskit.core.checks import check_bool, check_embeddings, check_hparam, check_int, check_labels
from losskit.core.context import PairReference
from losskit.core.registry import Paper, register
from losskit.losses.pair import PairLoss

__all__ = ["CrossBatchMemory"]

_STATE = ("ptr", "filled", "iteration")


@register("cross-batch-memory", family="pair", kind="memory",
          paper=Paper("Cross-Batch Memory for Embedding Learning", 2020, "1912.06798"),
          summary="A FIFO memory of past embeddings that a pair loss also scores the batch against.")
class CrossBatchMemory(nn.Module):
    """Wrap a pair loss with a memory of ``memory_size`` past embeddings.

    ``loss``: a losskit pair loss (``losskit.get("multi-similarity")``, ...)
    or its registry name (built with ``loss_kwargs``).  ``start_iteration``:
    forward calls (in training mode) before the memory term starts (the
    paper warms up without it).  The queue is only updated in training mode.
    ``state_dict()`` holds the queue, the ring pointer, the fill level and
    the iteration count; it loads into a freshly constructed memory.
    """

    def __init__(self, loss: Any = "multi-similarity", memory_size: int = 8192, weight: float = 1.0,
                 start_iteration: int = 0, include_batch_loss: bool = True, loss_kwargs: dict | None = None):
        super().__init__()
        if isinstance(loss, str):
            from losskit.core import registry

            loss = registry.get(loss, **(loss_kwargs or {}))
        elif loss_kwargs:
            raise ValueError("loss_kwargs: only used when loss is a registry name")
        if not isinstance(loss, PairLoss):
            raise TypeError(f"loss: expected a losskit pair loss (a PairLoss), got {type(loss).__name__}")
        self.loss = loss
        self.memory_size = check_int("memory_size", memory_size, low=1)
        self.weight = check_hparam("weight", weight, low=0)
        self.start_iteration = check_int("start_iteration", start_iteration, low=0)
        self.include_batch_loss = check_bool("include_batch_loss", include_batch_loss)
        self.register_buffer("memory", torch.empty(0), persistent=True)
        self.register_buffer("memory_labels", torch.empty(0, dtype=torch.long), persistent=True)
        self.ptr = 0
        self.filled = 0
        self.iteration = 0

    def reset(self) -> None:
        self.memory = torch.empty(0, device=self.memory.device)
        self.memory_labels = torch.empty(0, dtype=torch.long, device=self.memory_labels.device)
        self.ptr = self.filled = self.iteration = 0

    # ------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in _STATE}

    def set_extra_state(self, state: dict[str, int]) -> None:
        if not isinstance(state, dict) or set(state) != set(_STATE):
            raise ValueError(f"CrossBatchMemory state: expected a dict with keys {_STATE}, got {state!r}")
        ptr = check_int("ptr", state["ptr"], low=0, high=self.memory_size - 1)
        filled = check_int("filled", state["filled"], low=0, high=self.memory_size)
        self.ptr, self.filled, self.iteration = ptr, filled, check_int("iteration", state["iteration"], low=0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the queue is allocated lazily ([0] until the first batch): take the saved shape before loading
        mem = state_dict.get(prefix + "memory")
        if mem is not None and mem.shape != self.memory.shape:
            if mem.numel() and (mem.dim() != 2 or mem.shape[0] != self.memory_size):
                raise ValueError(f"memory: expected a saved queue of shape [{self.memory_size}, D] "
                                 f"(memory_size={self.memory_size}), got {list(mem.shape)}")
            self.memory = torch.empty(mem.shape, dtype=mem.dtype, device=self.memory.device)
        lab = state_dict.get(prefix + "memory_labels")
        if lab is not None and lab.shape != self.memory_labels.shape:
            self.memory_labels = torch.empty(lab.shape, dtype=lab.dtype, device=self.memory_labels.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------ queue
    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Write a batch into the queue; returns the slots written (its ``self_index``)."""
        B, D = embeddings.shape
        if B > self.memory_size:
            raise ValueError(f"embeddings: batch of {B} exceeds memory_size={self.memory_size}")
        if self.memory.numel() == 0 or self.memory.shape[1] != D:
            self.memory = embeddings.new_zeros(self.memory_size, D)
            self.memory_labels = labels.new_zeros(self.memory_size)
            self.ptr = self.filled = 0
        idx = (torch.arange(B, device=embeddings.device) + self.ptr) % self.memory_size
        self.memory[idx] = embeddings.detach().to(self.memory.dtype)
        self.memory_labels[idx] = labels
        self.ptr = (self.ptr + B) % self.memory_size
        self.filled = min(self.memory_size, self.filled + B)
        return idx

    def forward(self, embeddings: Tensor, labels: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        # shapes always; values here only when no batch loss checks them before the queue is written
        check_embeddings(embeddings, finite=not self.include_batch_loss)
        check_labels(labels, embeddings.shape[0], device=embeddings.device)
        total = self.loss(embeddings, labels, sample_weight) if self.include_batch_loss else None
        if self.training:
            self.iteration += 1
        if self.training and self.iteration > self.start_iteration and embeddings.shape[0]:
            idx = self.enqueue(embeddings, labels)
            n = self.filled
            # the filled part is the first `filled` slots until the queue wraps, then all of it
            ref = PairReference(self.memory[:n].to(embeddings.dtype), self.memory_labels[:n], self_index=idx)
            mem_term = self.loss(embeddings, labels, sample_weight, reference=ref)
            total = self.weight * mem_term if total is None else total + self.weight * mem_term
        if total is None:
            total = self.loss(embeddings, labels, sample_weight) * 0
        return total
