"""Validation shared by every registered object.

Two moments, each checked once:

* **construction**: hyperparameters (:func:`check_hparam` and the small
  validators below).  The error names the hyperparameter, the expected
  range and the value given.
* **call**: tensors (shape, dtype, device, finite values).  Shape, dtype and
  device checks are free (no host synchronisation) and always run.  Value
  checks (finite embeddings, label range, non-negative weights) need the
  data on the host; :func:`tensor_checks` turns them off for tight loops and
  for ``torch.compile``: with them off a forward makes no ``.item()``,
  ``int(t.min())`` or ``.tolist()``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Iterator

import torch
from torch import Tensor

__all__ = [
    "tensor_checks", "set_tensor_checks", "tensor_checks_enabled",
    "shape_str", "check_embeddings", "check_labels", "check_sample_weight", "check_finite", "check_vector",
    "check_hparam", "check_choice", "check_int", "check_bool", "check_reduction", "REDUCTIONS",
]

REDUCTIONS = ("mean", "sum", "none")

_VALUE_CHECKS = True


def tensor_checks_enabled() -> bool:
    """Whether per-call value checks (those that synchronise with the host) run."""
    return _VALUE_CHECKS


def set_tensor_checks(enabled: bool) -> bool:
    """Turn per-call value checks on or off globally; returns the previous setting."""
    global _VALUE_CHECKS
    prev, _VALUE_CHECKS = _VALUE_CHECKS, bool(enabled)
    return prev


@contextlib.contextmanager
def tensor_checks(enabled: bool) -> Iterator[None]:
    """``with losskit.tensor_checks(False): ...`` skips value checks inside."""
    prev = set_tensor_checks(enabled)
    try:
        yield
    finally:
        set_tensor_checks(prev)


def shape_str(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


# ---------------------------------------------------------------- hyperparameters

def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_hparam(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False,
                 finite: bool = True) -> Any:
    """A real hyperparameter in a range; returns it as a float (None passes with ``allow_none``).

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``.
    NaN is always refused, infinities unless ``finite=False``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if not _is_real(value):
        raise TypeError(f"{name}: expected a real number{_range(low, high, low_open, high_open)}, "
                        f"got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ValueError(f"{name}: expected a finite number{_range(low, high, low_open, high_open)}, got {v}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name}: expected a value{_range(low, high, low_open, high_open)}, got {v}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name}: expected a value{_range(low, high, low_open, high_open)}, got {v}")
    return v


def _range(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              allow_none: bool = False) -> int | None:
    """An integer hyperparameter in ``[low, high]``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        rng = _range(low, high, False, False)
        raise TypeError(f"{name}: expected an integer{rng}{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__} {value!r}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name}: expected an integer{_range(low, high, False, False)}, got {v}")
    return v


def check_choice(name: str, value: Any, choices: tuple | list) -> Any:
    if value not in tuple(choices):
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: Any, allow_none: bool = False) -> bool | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_reduction(reduction: Any) -> str:
    return check_choice("reduction", reduction, REDUCTIONS)


# ---------------------------------------------------------------- tensors

def check_finite(t: Tensor, name: str, what: str = "values") -> Tensor:
    """Refuse NaN/inf in ``t`` (a host sync; skipped when value checks are off)."""
    if _VALUE_CHECKS and t.numel() and t.device.type != "meta" and not bool(torch.isfinite(t.detach()).all()):
        bad = (~torch.isfinite(t.detach())).nonzero()[0].tolist()
        at = bad[0] if len(bad) == 1 else tuple(bad)
        raise ValueError(f"{name}: expected finite {what}, got {t.detach()[tuple(bad)].item()} at index {at}")
    return t


def check_embeddings(embeddings: Any, name: str = "embeddings", *, finite: bool = True) -> Tensor:
    """A floating ``[B, D]`` tensor with finite values."""
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape [B, D], got {type(embeddings).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"{name}: expected shape [B, D], got {shape_str(embeddings)}")
    if not embeddings.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {embeddings.dtype}")
    if finite:
        check_finite(embeddings, name)
    return embeddings


def check_vector(t: Any, name: str, batch: int | None = None, like: Tensor | None = None, *,
                 floating: bool = True, finite: bool = True, what: str = "one value per row") -> Tensor:
    """A ``[batch]`` tensor on ``like``'s device (floating and finite by default)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape [{'B' if batch is None else batch}] "
                        f"({what}), got {type(t).__name__}")
    if t.dim() != 1 or (batch is not None and t.shape[0] != batch):
        raise ValueError(f"{name}: expected shape [{'B' if batch is None else batch}] ({what}), got {shape_str(t)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {t.device}")
    if finite and floating:
        check_finite(t, name)
    return t


def check_labels(labels: Any, batch: int, name: str = "labels", device: torch.device | None = None,
                 num_classes: int | None = None, allow_ignore: bool = False) -> Tensor:
    """Integer labels of shape ``[batch]``; with ``num_classes``, in range
    ``[0, num_classes)`` (``-1`` allowed when ``allow_ignore``; the range
    check is a value check)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor of shape [{batch}], got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{name}: expected shape [{batch}] (one label per embedding), got {shape_str(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype (torch.long), got {labels.dtype}")
    if device is not None and labels.device != device:
        raise ValueError(f"{name}: expected device {device} (the embeddings' device), got {labels.device}")
    if _VALUE_CHECKS and num_classes is not None and labels.numel() > 0 and labels.device.type != "meta":
        lo = -1 if allow_ignore else 0
        mn, mx = int(labels.min()), int(labels.max())
        if mn < lo or mx >= num_classes:
            bad = mn if mn < lo else mx
            raise ValueError(
                f"{name}: expected values in [{lo}, {num_classes - 1}] (num_classes={num_classes}), got {bad}"
            )
    return labels


def check_sample_weight(sample_weight: Any, batch: int, like: Tensor) -> Tensor | None:
    """``None`` or a ``[batch]`` tensor of finite, non-negative weights, cast to ``like``'s dtype."""
    if sample_weight is None:
        return None
    if not isinstance(sample_weight, Tensor):
        sample_weight = torch.as_tensor(sample_weight, device=like.device)
    if sample_weight.dim() != 1 or sample_weight.shape[0] != batch:
        raise ValueError(f"sample_weight: expected shape [{batch}] (one weight per row), "
                         f"got {shape_str(sample_weight)}")
    if sample_weight.device != like.device:
        raise ValueError(f"sample_weight: expected device {like.device}, got {sample_weight.device}")
    if sample_weight.dtype == torch.bool or sample_weight.is_complex():
        raise TypeError(f"sample_weight: expected a real tensor, got dtype {sample_weight.dtype}")
    if _VALUE_CHECKS and sample_weight.numel() and sample_weight.device.type != "meta":
        w = sample_weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise ValueError("sample_weight: expected finite values, got NaN or inf")
        if bool((w < 0).any()):
            raise ValueError(f"sample_weight: expected values >= 0, got min {float(w.min())}")
    return sample_weight.to(like.dtype)


