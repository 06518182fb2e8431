"""The run folder on disk: ``config.json``, one JSON file per finished cell, atomic writes.

Each finished cell is written atomically to ``cells/<objective>__seed<k>.json``
the moment it finishes; a failed cell leaves its traceback next to it.  The
formats are the same for every task.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import BenchConfigError
from .labels import file_safe
from .protocol import upgrade_protocol

__all__ = ["CONFIG_FILE", "CELLS_DIR", "atomic_write_json", "cell_path", "error_path", "load_cells", "latest_run",
           "read_config"]

CONFIG_FILE = "config.json"
CELLS_DIR = "cells"


def _json_safe(x: Any) -> Any:
    """NaN and infinities become null (strict JSON that any reader accepts)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON (NaN as null) to a temporary file in the same folder, then rename over ``path``."""
    data = _json_safe(data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def cell_path(out: Path, objective: str, seed: int) -> Path:
    """``cells/<objective>__seed<k>.json``; a variant label such as ``arcface[head=chunked]`` is
    made file-safe (:func:`~losskit.bench.labels.file_safe`); the JSON keeps the label intact."""
    return Path(out) / CELLS_DIR / f"{file_safe(objective)}__seed{seed}.json"


def error_path(out: Path, objective: str, seed: int) -> Path:
    """``cells/<objective>__seed<k>.error.txt``: the traceback of a failed cell."""
    return Path(out) / CELLS_DIR / f"{file_safe(objective)}__seed{seed}.error.txt"


def load_cells(out: Path, fingerprint: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The finished cells of run folder ``out``; with ``fingerprint`` (a protocol), a cell
    written under another protocol is a BenchConfigError."""
    cells = []
    expected = upgrade_protocol(fingerprint) if fingerprint is not None else None
    for p in sorted((Path(out) / CELLS_DIR).glob("*.json")):
        with open(p) as f:
            c = json.load(f)
        if expected is not None and upgrade_protocol(c.get("protocol")) != expected:
            raise BenchConfigError(f"{p} was written under a different protocol than {Path(out) / CONFIG_FILE}")
        cells.append(c)
    return cells


def read_config(out: Path) -> dict[str, Any]:
    """The run folder's ``config.json`` (a BenchConfigError when there is none)."""
    cfg_file = Path(out) / CONFIG_FILE
    if not cfg_file.exists():
        raise BenchConfigError(f"--resume {out}: no {CONFIG_FILE} there; is this a bench run folder?")
    with open(cfg_file) as f:
        return json.load(f)


def latest_run(root: Path = Path("runs")) -> Path:
    """The most recently modified run folder (one with a config.json) under ``root``."""
    runs = [p.parent for p in Path(root).glob(f"*/{CONFIG_FILE}")]
    if not runs:
        raise BenchConfigError(f"--resume: no run folder with a {CONFIG_FILE} under {root}/; "
                               "pass the run folder: --resume runs/<name>")
    return max(runs, key=lambda p: (p / CONFIG_FILE).stat().st_mtime)
