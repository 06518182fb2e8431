"""Cross-batch memory (XBM; Wang et al., CVPR 2020, arXiv 1912.06798).

A FIFO queue of detached embeddings and labels from past iterations; the
current batch is scored against it with any losskit pair loss.  As in the
official code (msight-tech/research-xbm), the batch is enqueued first and
the loss is ``loss(batch, batch) + weight * loss(batch, memory)``; the
queued copy of each anchor is excluded from its own pairs (``self_index``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from losskit._checks import check_embeddings, check_labels

__all__ = ["CrossBatchMemory"]


class CrossBatchMemory(nn.Module):
    """Wrap a pair loss with a memory of ``memory_size`` past embeddings.

    ``loss``: a losskit pair loss (``losskit.get("multi-similarity")``, ...)
    or its registry name (built with ``loss_kwargs``).  ``start_iteration``:
    forward calls (in training mode) before the memory term starts (the
    paper warms up without it).  The queue is only updated in training mode.
    """

    def __init__(self, loss="multi-similarity", memory_size: int = 8192, weight: float = 1.0,
                 start_iteration: int = 0, include_batch_loss: bool = True, loss_kwargs: dict | None = None):
        super().__init__()
        if isinstance(loss, str):
            from losskit import registry

            loss = registry.get(loss, **(loss_kwargs or {}))
        if not hasattr(loss, "compute"):
            raise TypeError("loss: expected a losskit pair loss (with .compute), got " f"{type(loss).__name__}")
        if memory_size < 1:
            raise ValueError(f"memory_size: expected an integer >= 1, got {memory_size}")
        if weight < 0:
            raise ValueError(f"weight: expected a value >= 0, got {weight}")
        self.loss = loss
        self.memory_size = int(memory_size)
        self.weight = float(weight)
        self.start_iteration = int(start_iteration)
        self.include_batch_loss = include_batch_loss
        self.register_buffer("memory", torch.empty(0), persistent=True)
        self.register_buffer("memory_labels", torch.empty(0, dtype=torch.long), persistent=True)
        self.ptr = 0
        self.filled = 0
        self.iteration = 0

    def reset(self) -> None:
        self.memory = torch.empty(0, device=self.memory.device)
        self.memory_labels = torch.empty(0, dtype=torch.long, device=self.memory_labels.device)
        self.ptr = self.filled = self.iteration = 0

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
        check_embeddings(embeddings)
        check_labels(labels, embeddings.shape[0], device=embeddings.device)
        total = self.loss.compute(embeddings, labels, sample_weight) if self.include_batch_loss else None
        if self.training:
            self.iteration += 1
        if self.training and self.iteration > self.start_iteration and embeddings.shape[0]:
            idx = self.enqueue(embeddings, labels)
            n = self.filled
            # the filled part is the first `filled` slots until the queue wraps, then all of it
            mem, mem_labels = self.memory[:n], self.memory_labels[:n]
            mem_term = self.loss.compute(embeddings, labels, sample_weight, ref_embeddings=mem.to(embeddings.dtype),
                                         ref_labels=mem_labels, self_index=idx)
            total = self.weight * mem_term if total is None else total + self.weight * mem_term
        if total is None:
            total = self.loss.compute(embeddings, labels, sample_weight) * 0
        return total
