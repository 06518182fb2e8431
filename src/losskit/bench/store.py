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

__all__ = ["CONFIG_FILE", "CELLS_DIR", "BASELINES_DIR", "MODELS_DIR", "SPLITS_DIR", "LOCK_FILE", "atomic_write_json",
           "atomic_write_text", "cell_path", "error_path", "model_path", "load_cells", "latest_run", "read_config",
           "RunLock", "cell_key"]

CONFIG_FILE = "config.json"
CELLS_DIR = "cells"
BASELINES_DIR = "baselines"
MODELS_DIR = "models"
SPLITS_DIR = "splits"
LOCK_FILE = ".lock"


def cell_key(c: dict[str, Any]) -> tuple:
    """A cell's ``(objective, seed, split)`` (a cell written before splits existed is split 0)."""
    return c["objective"], c["seed"], c.get("split", 0)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path) -> None:
    """Give the temporary file the mode a plain ``open(path, "w")`` would (mkstemp's is 0600), then
    rename it over ``path``."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _json_safe(x: Any) -> Any:
    """NaN and infinities become null (strict JSON that any reader accepts)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file in ``path``'s folder, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON (NaN as null) to a temporary file in the same folder, then rename over ``path``."""
    data = _json_safe(data)
    _atomic_write(path, lambda f: json.dump(data, f, indent=1, allow_nan=False))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (temporary file, then rename), readable like a plain file."""
    _atomic_write(path, lambda f: f.write(text))


def _stem(objective: str, seed: int, split: int) -> str:
    return f"{file_safe(objective)}{f'__split{split}' if split else ''}__seed{seed}"


def cell_path(out: Path, objective: str, seed: int, split: int = 0, folder: str = CELLS_DIR) -> Path:
    """``cells/<objective>__seed<k>.json`` (class split ``s > 0``: ``<objective>__split<s>__seed<k>``);
    a variant label such as ``arcface[head=chunked]`` is made file-safe
    (:func:`~losskit.bench.labels.file_safe`); the JSON keeps the label intact.  Baselines are
    kept the same way under ``baselines/``."""
    return Path(out) / folder / f"{_stem(objective, seed, split)}.json"


def error_path(out: Path, objective: str, seed: int, split: int = 0) -> Path:
    """``cells/<objective>__seed<k>.error.txt``: the traceback of a failed cell."""
    return Path(out) / CELLS_DIR / f"{_stem(objective, seed, split)}.error.txt"


def model_path(out: Path, objective: str, seed: int, split: int = 0) -> Path:
    """``models/<objective>__seed<k>.pt``: a trained network kept by ``--save-models``."""
    return Path(out) / MODELS_DIR / f"{_stem(objective, seed, split)}.pt"


def load_cells(out: Path, fingerprint: dict[str, Any] | None = None, folder: str = CELLS_DIR) -> list[dict[str, Any]]:
    """The finished cells of run folder ``out``; with ``fingerprint`` (a protocol), a cell
    written under another protocol is a BenchConfigError."""
    cells = []
    expected = upgrade_protocol(fingerprint) if fingerprint is not None else None
    for p in sorted((Path(out) / folder).glob("*.json")):
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


class RunLock:
    """``RUN/.lock``, created exclusively while a bench writes into the folder: a second bench
    into the same folder is refused (a BenchConfigError naming the process holding it).  A lock
    left by a process that no longer runs (on this host) is taken over."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.held = False

    def acquire(self) -> "RunLock":
        import socket

        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # stale: its process is gone
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                raise BenchConfigError(
                    f"{self.path.parent}: another bench ({holder}) is writing into this run folder; wait for it to "
                    f"finish or use another --out (delete {self.path} if that process is gone)") from None
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.held = True
            return self
        raise BenchConfigError(f"{self.path.parent}: could not take the run folder's lock {self.path}")

    def _holder(self) -> str | None:
        """'pid N on HOST' of a live holder, None when the lock is stale."""
        import socket

        try:
            pid_text, _, host = self.path.read_text().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return "an unknown process"
        if host and host != socket.gethostname():
            return f"pid {pid} on {host}"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return f"pid {pid}"

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
