"""N-way K-shot episode sampling over a labels tensor.

    >>> sampler = EpisodeSampler(labels, n_way=5, k_shot=1, n_query=15, episodes=100, seed=0)
    >>> for idx in sampler:                      # LongTensor [n_way * (k_shot + n_query)]
    ...     emb = model(images[idx])
    ...     loss = criterion(emb, labels[idx], support_mask=sampler.support_mask)

Layout of every episode (the Prototypical Networks convention): first the
support block, class by class (``n_way * k_shot`` rows), then the query block
in the same class order (``n_way * n_query`` rows).  ``support_mask`` marks the
support block; ``episode_labels()`` gives the episode-local labels ``0..N-1``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["EpisodeSampler", "episode_support_mask", "episode_labels"]


def _positive_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def episode_support_mask(n_way: int, k_shot: int, n_query: int) -> Tensor:
    """Bool ``[n_way * (k_shot + n_query)]``: True on the support block."""
    mask = torch.zeros(n_way * (k_shot + n_query), dtype=torch.bool)
    mask[: n_way * k_shot] = True
    return mask


def episode_labels(n_way: int, k_shot: int, n_query: int) -> Tensor:
    """Episode-local labels ``0..n_way-1`` in the episode layout."""
    way = torch.arange(n_way)
    return torch.cat([way.repeat_interleave(k_shot), way.repeat_interleave(n_query)])


class EpisodeSampler:
    """Seeded sampler of N-way K-shot (+ Q queries) episodes.

    Each episode draws ``n_way`` distinct classes uniformly, then ``k_shot +
    n_query`` distinct rows of each class uniformly without replacement, and
    yields their positions in ``labels`` as a LongTensor.  Rows with a
    negative label are never drawn.  A class with fewer than ``k_shot +
    n_query`` rows is an error, unless ``drop_small_classes=True`` (then it is
    never drawn).  Iterating twice gives the same episodes; ``set_epoch(e)``
    selects another reproducible stream.
    """

    def __init__(self, labels: Tensor | Sequence[int], n_way: int, k_shot: int, n_query: int = 0,
                 episodes: int = 100, seed: int = 0, drop_small_classes: bool = False):
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        if labels.dim() != 1:
            raise ValueError(f"labels: expected shape [N], got {list(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels: expected an integer dtype, got {labels.dtype}")
        self.n_way = _positive_int("n_way", n_way, 1)
        self.k_shot = _positive_int("k_shot", k_shot, 1)
        self.n_query = _positive_int("n_query", n_query, 0)
        self.episodes = _positive_int("episodes", episodes, 1)
        self.seed = _positive_int("seed", seed, 0)
        self.epoch = 0
        need = self.k_shot + self.n_query
        labels = labels.detach().cpu().long()
        keep = labels >= 0
        classes, inverse, counts = torch.unique(labels[keep], sorted=True, return_inverse=True,
                                                return_counts=True)
        small = counts < need
        if bool(small.any()) and not drop_small_classes:
            bad = int(small.nonzero()[0, 0])
            raise ValueError(
                f"labels: class {int(classes[bad])} has {int(counts[bad])} samples, an episode needs "
                f"k_shot + n_query = {need} per class ({int(small.sum())} classes are too small; "
                f"pass drop_small_classes=True to skip them)"
            )
        rows = keep.nonzero().squeeze(1)
        order = torch.argsort(inverse, stable=True)
        groups = torch.split(rows[order], counts.tolist())
        self._pools = [g for g, s in zip(groups, small.tolist()) if not s]
        self.classes = classes[~small]
        if len(self._pools) < self.n_way:
            raise ValueError(
                f"n_way: expected at most {len(self._pools)} (classes with >= {need} samples), got {self.n_way}"
            )

    @property
    def episode_size(self) -> int:
        return self.n_way * (self.k_shot + self.n_query)

    @property
    def support_mask(self) -> Tensor:
        return episode_support_mask(self.n_way, self.k_shot, self.n_query)

    def episode_labels(self) -> Tensor:
        return episode_labels(self.n_way, self.k_shot, self.n_query)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _positive_int("epoch", epoch, 0)

    def __len__(self) -> int:
        return self.episodes

    def __iter__(self) -> Iterator[Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        k, q = self.k_shot, self.n_query
        for _ in range(self.episodes):
            chosen = torch.randperm(len(self._pools), generator=g)[: self.n_way].tolist()
            picks = []
            for c in chosen:
                pool = self._pools[c]
                picks.append(pool[torch.randperm(pool.numel(), generator=g)[: k + q]])
            support = torch.cat([p[:k] for p in picks])
            query = torch.cat([p[k:] for p in picks]) if q else support.new_zeros(0)
            yield torch.cat([support, query])
