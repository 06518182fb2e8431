"""KLoM: KL divergence of margins between unlearned models and retrained oracles.

Georgiev, Rinberg, Park, Garg, Ilyas, Madry, Neel, "Attribute-to-Delete:
Machine Unlearning via Datamodel Matching" (ICLR 2025, arXiv:2410.23232),
the evaluation section; official code RoyRin/data-unlearning-bench,
``unlearning_bench/eval.py`` (``compute_binned_KL_div``, ``kl_from_margins``).

For every evaluation point ``x`` (forget, retain and validation points):

1. the margin ``m(x) = z_y(x) - logsumexp_{j != y} z_j(x)`` of each of ``N``
   unlearned models (run with different seeds) and of each of ``N'`` oracles
   (models retrained from scratch without the forget set);
2. both samples clipped to ``[-clip, clip]`` (100);
3. ``bins`` (20) equal bins over the joint range ``[min, max]`` of the two
   clipped samples; ``p`` and ``q`` the unlearned and oracle histograms
   (normalised counts);
4. where ``p > 0`` the oracle probability is floored, ``q <- max(q, eps)``
   (1e-5), and ``q`` renormalised (scipy's ``entropy`` renormalises);
5. ``KLoM(x) = KL(p || q) = sum_b p_b log(p_b / q_b)``.

The paper reports the 95th percentile of ``KLoM(x)`` over each group of
points (forget, retain, validation): :func:`klom_summary`.

Two differences from the official code, both its mistakes:

* ``np.digitize(arr, edges)`` puts a sample equal to the last edge (the joint
  maximum, so at least one sample of every point) into bin ``bins + 1``, which
  the count loop never reads: that sample is dropped from its histogram.  Here
  the last bin is closed on the right, so every sample is counted.
* ``run.py``'s ``load_klom`` calls ``kl_from_margins(oracle_margins,
  margins)`` against its signature ``(unlearned, oracle)``, so the published
  script computes ``KL(oracle || unlearned)`` with the floor on the wrong
  side.  Here the arguments are keyword-named and the divergence is always
  ``KL(unlearned || oracle)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from losskit.core.checks import check_hparam, check_int, shape_str

__all__ = ["margins_from_logits", "binned_kl", "klom", "klom_summary", "KLoMAccumulator"]


def margins_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """``z_y - logsumexp_{j != y} z_j`` for logits ``[..., T, C]`` and labels ``[T]``: shape ``[..., T]``."""
    if not isinstance(logits, Tensor) or logits.dim() < 2 or not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating tensor [..., T, C], got "
                        f"{shape_str(logits) if isinstance(logits, Tensor) else type(logits).__name__}")
    labels = torch.as_tensor(labels, device=logits.device)
    t, c = logits.shape[-2], logits.shape[-1]
    if labels.shape != (t,) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels: expected integer labels of shape [{t}], got {labels.dtype} {shape_str(labels)}")
    if c < 2:
        raise ValueError(f"logits: a margin needs at least 2 classes, got C = {c}")
    if t and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise ValueError(f"labels: expected values in [0, {c - 1}], got [{int(labels.min())}, {int(labels.max())}]")
    onehot = torch.nn.functional.one_hot(labels.long(), c).bool().expand_as(logits)
    correct = logits.masked_select(onehot).view(logits.shape[:-1])
    others = logits.masked_fill(onehot, float("-inf")).logsumexp(-1)
    return correct - others


def _check_samples(x: Tensor, name: str, min_samples: int) -> Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: expected floating margins [models, points] (or [models]), got "
                         f"{x.dtype} {shape_str(x)}")
    if x.shape[0] < min_samples:
        raise ValueError(f"{name}: expected at least {min_samples} models (rows) to fill the histogram's bins, "
                         f"got {x.shape[0]}; train more models or pass a smaller min_samples")
    if torch.isnan(x).any():  # infinities are clipped; NaN has no bin
        raise ValueError(f"{name}: margins contain NaN")
    return x


def binned_kl(p_samples: Tensor, q_samples: Tensor, *, bins: int = 20, eps: float = 1e-5,
              clip: float = 100.0) -> Tensor:
    """``KL(p || q)`` per column between two samples ``[Np, T]`` and ``[Nq, T]`` (shared bins per column).

    The histogram of each column has ``bins`` equal bins over the joint range
    of both clipped samples, the last bin closed; ``q`` is floored at ``eps``
    where ``p > 0`` and renormalised.  A column where every sample is equal
    has divergence 0.  Returns float64 ``[T]``.
    """
    p = p_samples.to(torch.float64).clamp(-clip, clip)
    q = q_samples.to(torch.float64).clamp(-clip, clip)
    lo = torch.minimum(p.min(0).values, q.min(0).values)
    hi = torch.maximum(p.max(0).values, q.max(0).values)
    width = hi - lo
    flat = width <= 0
    width = torch.where(flat, torch.ones_like(width), width)  # all equal: every sample in bin 0

    def hist(s: Tensor) -> Tensor:
        idx = ((s - lo) / width * bins).floor().long().clamp(0, bins - 1)  # the maximum goes in the last bin
        h = torch.zeros(bins, s.shape[1], dtype=torch.float64, device=s.device)
        h.scatter_add_(0, idx, torch.ones_like(s))
        return h / s.shape[0]

    ph, qh = hist(p), hist(q)
    qh = torch.where(ph > 0, qh.clamp_min(eps), qh)
    qh = qh / qh.sum(0, keepdim=True)
    terms = torch.where(ph > 0, ph * (ph.log() - qh.log()), torch.zeros_like(ph))
    return terms.sum(0)


def klom(unlearned: Tensor, oracle: Tensor, *, bins: int = 20, eps: float = 1e-5, clip: float = 100.0,
         min_samples: int | None = None) -> Tensor:
    """KLoM per point: ``KL(unlearned margins || oracle margins)``, float64 ``[T]``.

    ``unlearned``: margins ``[N, T]`` from ``N`` unlearned models; ``oracle``:
    ``[N', T]`` from ``N'`` retrained oracles (the paper uses N = N' = 100).
    Each side needs at least ``min_samples`` models (default ``bins``: fewer
    samples than bins cannot describe a 20-bin histogram).
    """
    bins = check_int("bins", bins, low=2)
    eps = check_hparam("eps", eps, low=0.0, high=1.0, low_open=True)
    clip = check_hparam("clip", clip, low=0.0, low_open=True)
    min_samples = bins if min_samples is None else check_int("min_samples", min_samples, low=2)
    u = _check_samples(unlearned, "unlearned", min_samples)
    o = _check_samples(oracle, "oracle", min_samples)
    if u.shape[1] != o.shape[1]:
        raise ValueError(f"oracle: expected margins for the same {u.shape[1]} points as unlearned, "
                         f"got {shape_str(o)} against {shape_str(u)}")
    return binned_kl(u, o.to(u.device), bins=bins, eps=eps, clip=clip)


def klom_summary(unlearned: Tensor, oracle: Tensor, groups: Mapping[str, Tensor], *, q: float = 0.95,
                 **kw) -> dict[str, float]:
    """The ``q`` quantile (default 95th percentile) of KLoM over each group of points.

    ``groups`` maps a name (``"forget"``, ``"retain"``, ``"validation"``) to
    the column indices of its points.  Keywords go to :func:`klom`.
    """
    q = check_hparam("q", q, low=0.0, high=1.0)
    values = klom(unlearned, oracle, **kw)
    out: dict[str, float] = {}
    for name, idx in groups.items():
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.numel() == 0:
            raise ValueError(f"groups[{name!r}]: expected at least one point index, got none")
        if int(idx.min()) < 0 or int(idx.max()) >= values.numel():
            raise ValueError(f"groups[{name!r}]: expected indices in [0, {values.numel() - 1}], got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        out[name] = float(torch.quantile(values[idx], q))
    return out


class KLoMAccumulator:
    """KLoM over models evaluated one at a time.

    ``add_unlearned(logits, labels)`` / ``add_oracle(logits, labels)`` take the
    logits ``[T, C]`` of one model on the evaluation points (or ``margins=``
    ``[T]`` directly); ``compute()`` returns KLoM per point and ``summary(groups)``
    the quantiles of :func:`klom_summary`.  ``state_dict()`` round trips.
    """

    def __init__(self, bins: int = 20, eps: float = 1e-5, clip: float = 100.0, min_samples: int | None = None):
        self.bins = check_int("bins", bins, low=2)
        self.eps = check_hparam("eps", eps, low=0.0, high=1.0, low_open=True)
        self.clip = check_hparam("clip", clip, low=0.0, low_open=True)
        self.min_samples = min_samples
        self._rows: dict[str, list[Tensor]] = {"unlearned": [], "oracle": []}

    def _add(self, side: str, logits: Tensor | None, labels: Tensor | None, margins: Tensor | None) -> None:
        if (logits is None) == (margins is None):
            raise TypeError(f"add_{side}: pass logits [T, C] with labels, or margins [T]")
        if margins is None:
            if labels is None:
                raise TypeError(f"add_{side}: logits need labels [T]")
            if logits.dim() != 2:
                raise ValueError(f"logits: expected one model's logits [T, C], got {shape_str(logits)}")
            margins = margins_from_logits(logits, labels)
        margins = torch.as_tensor(margins).detach().to(torch.float64).cpu()
        if margins.dim() != 1:
            raise ValueError(f"margins: expected one model's margins [T], got {shape_str(margins)}")
        first = next((r for rows in self._rows.values() for r in rows), None)
        if first is not None and first.shape != margins.shape:
            raise ValueError(f"margins: expected {first.shape[0]} points like the models added before, "
                             f"got {margins.shape[0]}")
        self._rows[side].append(margins)

    def add_unlearned(self, logits: Tensor | None = None, labels: Tensor | None = None, *,
                      margins: Tensor | None = None) -> None:
        self._add("unlearned", logits, labels, margins)

    def add_oracle(self, logits: Tensor | None = None, labels: Tensor | None = None, *,
                   margins: Tensor | None = None) -> None:
        self._add("oracle", logits, labels, margins)

    @property
    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self._rows.items()}

    def _stacked(self, side: str) -> Tensor:
        rows = self._rows[side]
        if not rows:
            raise ValueError(f"{side}: no models added yet (add_{side})")
        return torch.stack(rows)

    def compute(self) -> Tensor:
        return klom(self._stacked("unlearned"), self._stacked("oracle"), bins=self.bins, eps=self.eps,
                    clip=self.clip, min_samples=self.min_samples)

    def summary(self, groups: Mapping[str, Tensor], q: float = 0.95) -> dict[str, float]:
        return klom_summary(self._stacked("unlearned"), self._stacked("oracle"), groups, q=q, bins=self.bins,
                            eps=self.eps, clip=self.clip, min_samples=self.min_samples)

    def reset(self) -> None:
        self._rows = {"unlearned": [], "oracle": []}

    def state_dict(self) -> dict:
        return {"bins": self.bins, "eps": self.eps, "clip": self.clip, "min_samples": self.min_samples,
                "unlearned": [r.clone() for r in self._rows["unlearned"]],
                "oracle": [r.clone() for r in self._rows["oracle"]]}

    def load_state_dict(self, state: dict) -> None:
        self.bins, self.eps, self.clip = state["bins"], state["eps"], state["clip"]
        self.min_samples = state["min_samples"]
        self._rows = {"unlearned": [r.clone() for r in state["unlearned"]],
                      "oracle": [r.clone() for r in state["oracle"]]}
