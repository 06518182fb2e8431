"""Context values: the inputs that travel *with* a batch besides the
embeddings/labels themselves, each one validated object instead of a row of
keywords restated in every function.

* :class:`PairReference` -- what a pair loss scores its anchors against
  (cross-batch memory, the global batch under torch.distributed).
* :class:`PreferenceBatch` -- the four summed log-probabilities of a
  preference batch with optional completion lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from losskit.core.checks import check_embeddings, check_finite, check_labels, check_vector, shape_str, \
    tensor_checks_enabled

__all__ = ["PairReference", "ResolvedReference", "PreferenceBatch"]


@dataclass(frozen=True)
class ResolvedReference:
    """A :class:`PairReference` resolved against one batch: every field set."""

    embeddings: Tensor        # [M, D]
    labels: Tensor            # [M]
    self_index: Tensor        # [B]: the column of anchor i in the reference, -1 if absent
    batch_size: int           # the B of 'mean'
    count_reduce: Callable | None
    is_batch: bool            # the reference is the batch itself

    def count(self, n: Tensor) -> Tensor:
        """A pair count summed over processes when ``count_reduce`` is set."""
        return self.count_reduce(n) if self.count_reduce is not None else n


@dataclass(frozen=True)
class PairReference:
    """What pair losses score their anchors against.

    * ``embeddings``/``labels``: the reference set ``[M, D]``/``[M]``
      (default: the batch itself);
    * ``self_index``: ``[B]``, the reference column holding anchor ``i``
      (never its own positive), ``-1`` when it is not there (default: the
      diagonal for the batch itself, none for another set);
    * ``batch_size``: the ``B`` of pair-average shares (anchor ``i`` gets
      ``B * sum_{pairs of i} l_p / N``): the global batch under
      torch.distributed; default the anchors given.  ``'mean'`` always
      divides by the anchors given (each rank's mean over its own rows);
    * ``count_reduce``: sums pair counts over processes (an all-reduce).

    Pass it as ``reference=`` to any pair loss (functional or module) or miner.
    """

    embeddings: Tensor | None = None
    labels: Tensor | None = None
    self_index: Tensor | None = None
    batch_size: int | None = None
    count_reduce: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self):
        if (self.embeddings is None) != (self.labels is None):
            given = "embeddings" if self.labels is None else "labels"
            raise ValueError(f"PairReference: {given} given without "
                             f"{'labels' if given == 'embeddings' else 'embeddings'}; pass both or neither")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or int(self.batch_size) < 0):
            raise ValueError(f"PairReference.batch_size: expected an integer >= 0, got {self.batch_size!r}")

    def resolve(self, embeddings: Tensor, labels: Tensor) -> ResolvedReference:
        """Validate against the anchors ``embeddings [B, D]``/``labels [B]``."""
        B = embeddings.shape[0]
        bs = B if self.batch_size is None else int(self.batch_size)
        if self.embeddings is None:
            si = self.self_index
            if si is None:
                si = torch.arange(B, device=labels.device)
            else:
                _check_self_index(si, B, None)
            return ResolvedReference(embeddings, labels, si, bs, self.count_reduce, True)
        ref = check_embeddings(self.embeddings, "reference.embeddings")
        if ref.shape[1] != embeddings.shape[1]:
            raise ValueError(f"reference.embeddings: expected shape [M, {embeddings.shape[1]}] (the anchors' D), "
                             f"got {shape_str(ref)}")
        if ref.device != embeddings.device:
            raise ValueError(f"reference.embeddings: expected device {embeddings.device}, got {ref.device}")
        rl = check_labels(self.labels, ref.shape[0], "reference.labels", device=labels.device)
        si = self.self_index
        if si is None:
            si = torch.full((B,), -1, dtype=torch.long, device=labels.device)
        else:
            _check_self_index(si, B, ref.shape[0])
        return ResolvedReference(ref, rl, si, bs, self.count_reduce, False)


def _check_self_index(si: Tensor, B: int, M: int | None) -> None:
    if not isinstance(si, Tensor) or si.shape != (B,):
        got = shape_str(si) if isinstance(si, Tensor) else type(si).__name__
        raise ValueError(f"reference.self_index: expected shape [{B}] (one column per anchor), got {got}")
    if si.is_floating_point():
        raise TypeError(f"reference.self_index: expected an integer dtype, got {si.dtype}")
    if M is not None and tensor_checks_enabled() and si.numel():
        lo, hi = int(si.min()), int(si.max())
        if lo < -1 or hi >= M:
            raise ValueError(f"reference.self_index: expected values in [-1, {M - 1}], got {lo if lo < -1 else hi}")


_LOGP_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class PreferenceBatch:
    """Everything a preference loss reads per pair, validated once at construction.

    * the four ``[B]`` summed log-probabilities (``policy_chosen_logps``,
      ``policy_rejected_logps``, ``ref_chosen_logps``, ``ref_rejected_logps``):
      same shape and device, floating, finite;
    * ``chosen_lengths``/``rejected_lengths``: completion token counts ``[B]``,
      positive, **both or neither** (length normalisation and RPO's NLL read them);
    * ``margin``: a per-pair offset in reward units, a float or ``[B]``, finite;
    * ``chosen_nll``: ``[B]`` NLL of the chosen completion for the RPO term, finite.

    ``pc``, ``pr``, ``rc``, ``rr`` are the log-probabilities in the compute
    dtype (float32, float64 for float64 input); lengths, ``margin`` and
    ``chosen_nll`` are stored in it.  ``out_dtype`` is the input dtype.
    Value checks (finite, positive) follow :func:`losskit.tensor_checks`.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    margin: Tensor | float | None = None
    chosen_nll: Tensor | None = None

    @classmethod
    def of(cls, *logps, **fields) -> "PreferenceBatch":
        """A :class:`PreferenceBatch` from one given as the single positional
        argument (no other field may be set then) or from its fields."""
        if logps and isinstance(logps[0], cls):
            extra = [k for k, v in fields.items() if v is not None] + [_LOGP_NAMES[i] for i, v in
                                                                         enumerate(logps) if i and v is not None]
            if extra:
                raise TypeError(f"a PreferenceBatch was given together with {', '.join(extra)}; set those fields "
                                "on the PreferenceBatch instead")
            return logps[0]
        missing = [n for n, v in zip(_LOGP_NAMES, logps + (None,) * (4 - len(logps))) if v is None]
        if missing:
            raise TypeError(f"expected a PreferenceBatch or the four log-probability tensors "
                            f"{', '.join(_LOGP_NAMES)}; missing {', '.join(missing)}")
        return cls(*logps, **fields)

    def __post_init__(self):
        import math

        ts = self.logps
        for name, t in zip(_LOGP_NAMES, ts):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor of shape [B] (one summed log-probability per "
                                f"pair), got {type(t).__name__}")
            if t.dim() != 1:
                raise ValueError(f"{name}: expected shape [B] (one summed log-probability per pair), got "
                                 f"{shape_str(t)}; sum the per-token log-probabilities over the completion first")
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
        b, dev = ts[0].shape[0], ts[0].device
        for name, t in zip(_LOGP_NAMES[1:], ts[1:]):
            if t.shape[0] != b:
                raise ValueError(f"{name}: expected shape [{b}] (the batch of policy_chosen_logps), got {shape_str(t)}")
            if t.device != dev:
                raise ValueError(f"{name}: expected device {dev} (policy_chosen_logps' device), got {t.device}")
        if tensor_checks_enabled() and b and not bool(torch.stack([torch.isfinite(t.detach()).all()
                                                                  for t in ts]).all()):
            for name, t in zip(_LOGP_NAMES, ts):
                try:
                    check_finite(t, name, "log-probabilities")
                except ValueError as e:
                    raise ValueError(f"{e} (a -inf usually means a completion token the model gives probability 0, "
                                     "or a fully masked completion)") from None
        if (self.chosen_lengths is None) != (self.rejected_lengths is None):
            given = "chosen_lengths" if self.rejected_lengths is None else "rejected_lengths"
            other = "rejected_lengths" if given == "chosen_lengths" else "chosen_lengths"
            raise ValueError(f"{given}: given without {other}; pass the token counts of both completions or "
                             "neither (length normalisation divides each log-ratio by its own completion's length)")
        ct = self.compute_dtype
        for name in ("chosen_lengths", "rejected_lengths"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, Tensor):
                v = torch.as_tensor(v, device=dev)
            check_vector(v, name, b, ts[0], floating=False, finite=False, what="completion length of each pair")
            v = v.to(ct)
            if tensor_checks_enabled() and v.numel() and not bool((v > 0).all() & torch.isfinite(v).all()):
                raise ValueError(f"{name}: expected positive finite lengths (token counts), got min {float(v.min())}")
            object.__setattr__(self, name, v)
        m = self.margin
        if m is not None:
            if not isinstance(m, Tensor):
                if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
                    raise ValueError(f"margin: expected a finite float or a [{b}] tensor (one offset per pair), "
                                     f"got {m!r}")
                m = torch.tensor(float(m), dtype=ct, device=dev)
            elif m.dim() != 0 and (m.dim() != 1 or m.shape[0] != b):
                raise ValueError(f"margin: expected a float or shape [{b}] (one offset per pair), got {shape_str(m)}")
            elif m.device != dev and m.dim():
                raise ValueError(f"margin: expected device {dev}, got {m.device}")
            object.__setattr__(self, "margin", check_finite(m.to(device=dev, dtype=ct), "margin"))
        if self.chosen_nll is not None:
            v = check_vector(self.chosen_nll, "chosen_nll", b, ts[0], what="NLL of the chosen completion per pair")
            object.__setattr__(self, "chosen_nll", v.to(ct))

    @property
    def logps(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (self.policy_chosen_logps, self.policy_rejected_logps, self.ref_chosen_logps, self.ref_rejected_logps)

    @property
    def batch(self) -> int:
        return self.policy_chosen_logps.shape[0]

    @property
    def out_dtype(self) -> torch.dtype:
        return self.policy_chosen_logps.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return _compute_dtype(self.out_dtype)

    @property
    def has_lengths(self) -> bool:
        return self.chosen_lengths is not None

    def _c(self, t: Tensor) -> Tensor:
        return t.to(self.compute_dtype)

    # the four log-probabilities in the compute dtype
    pc = property(lambda self: self._c(self.policy_chosen_logps))
    pr = property(lambda self: self._c(self.policy_rejected_logps))
    rc = property(lambda self: self._c(self.ref_chosen_logps))
    rr = property(lambda self: self._c(self.ref_rejected_logps))
