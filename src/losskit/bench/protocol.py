"""The protocol: what must be identical for two runs' cells to be comparable.

It is the config's fields, the resolved device and every objective's resolved
hyperparameters, as plain JSON.  ``config.json`` saves it, every cell carries
it, and ``--resume`` refuses to continue when the current one differs.
"""

from __future__ import annotations

from typing import Any

from .errors import BenchConfigError

__all__ = ["protocol", "upgrade_protocol", "diff_protocol", "check_resume", "plain"]

#: fields added to the protocol after run folders were first written, with the value an
#: older folder implicitly had (its protocol lacks the key): such a folder still resumes
ADDED_FIELDS = {"task": "embedding", "splits": 1, "split_seed": 0, "baselines": True, "skip_bad_images": False,
                "track_every": 1, "oneshot": False, "amp": "none", "early_stop": 0.0,
                "test_fraction": 0.3, "label_noise": 0.0, "noise": "symmetric", "imbalance": 1.0,
                "pgd_radius": 8 / 255, "pgd_steps": 10,
                "optimizer": "adam", "schedule": "constant", "refine_from": None,
                "rotation_classes": False, "train_on": "split"}


def plain(v: Any) -> Any:
    """``v`` as JSON-plain values (tuples become lists, other objects their repr)."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    return repr(v)


def protocol(cfg, hparams: dict[str, dict[str, Any]], device: str) -> dict[str, Any]:
    """The protocol of ``cfg`` (a BenchConfig) with its resolved hyperparameters and device (JSON-plain)."""
    d = cfg.to_json()
    d["device"] = device
    d["hparams"] = plain(hparams)
    return plain(d)


def upgrade_protocol(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved protocol with the fields added since it was written (:data:`ADDED_FIELDS`)."""
    if not isinstance(saved, dict):
        return saved
    return {**{k: v for k, v in ADDED_FIELDS.items() if k not in saved}, **saved}


def diff_protocol(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human-readable differences between two protocols (empty when they match)."""
    saved, now = upgrade_protocol(saved), upgrade_protocol(now)
    lines = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<missing>"), now.get(k, "<missing>")
        if k == "hparams" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    lines.append(f"hparams[{name}]: run has {a.get(name)!r}, now {b.get(name)!r}")
        elif a != b:
            lines.append(f"{k}: run has {a!r}, now {b!r}")
    return lines


def check_resume(out, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise a BenchConfigError naming every difference when run folder ``out``'s protocol is not ``now``."""
    diffs = diff_protocol(saved, now)
    if diffs:
        raise BenchConfigError(
            f"--resume {out}: the configuration differs from the run's, so its cells would not be "
            "comparable. Differences:\n  " + "\n  ".join(diffs)
            + "\nStart a new run (--out) or resume with the run's settings."
        )
