"""Running the grid of (objective, seed) cells, with a run folder that survives interruption.

Each finished cell is written atomically to ``cells/<objective>__seed<k>.json``
the moment it finishes; ``resume`` skips every cell already there, after
checking that the run's protocol (``config.json``) matches.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import (BenchConfig, BenchConfigError, diff_protocol, file_safe, normalize_label, protocol,
                     resolve_hparams, resolve_objectives, unbenchable_objectives)

__all__ = ["run_bench", "BenchRun", "atomic_write_json", "cell_path", "error_path", "load_cells", "latest_run",
           "resolve_device", "load_split"]

CONFIG_FILE = "config.json"
CELLS_DIR = "cells"


@dataclass
class BenchRun:
    out: Path
    config: BenchConfig
    protocol: dict[str, Any]
    cells: list[dict[str, Any]] = field(default_factory=list)
    computed: list[tuple[str, int]] = field(default_factory=list)  # cells trained in this call
    failed: dict[tuple[str, int], str] = field(default_factory=dict)
    interrupted: bool = False
    wall_time_s: float = 0.0
    leaderboard: str = ""

    @property
    def complete(self) -> bool:
        done = {(c["objective"], c["seed"]) for c in self.cells}
        return all((o, s) in done for o in self.config.objectives for s in range(self.config.seeds))


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
        with_suppress_unlink(tmp)
        raise


def with_suppress_unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def cell_path(out: Path, objective: str, seed: int) -> Path:
    """``cells/<objective>__seed<k>.json``; a variant label such as ``arcface[head=chunked]`` is
    made file-safe (:func:`~losskit.bench.config.file_safe`); the JSON keeps the label intact."""
    return Path(out) / CELLS_DIR / f"{file_safe(objective)}__seed{seed}.json"


def error_path(out: Path, objective: str, seed: int) -> Path:
    """``cells/<objective>__seed<k>.error.txt``: the traceback of a failed cell."""
    return Path(out) / CELLS_DIR / f"{file_safe(objective)}__seed{seed}.error.txt"


def load_cells(out: Path, fingerprint: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    cells = []
    for p in sorted((Path(out) / CELLS_DIR).glob("*.json")):
        with open(p) as f:
            c = json.load(f)
        if fingerprint is not None and c.get("protocol") != fingerprint:
            raise BenchConfigError(f"{p} was written under a different protocol than {Path(out) / CONFIG_FILE}")
        cells.append(c)
    return cells


def latest_run(root: Path = Path("runs")) -> Path:
    """The most recently modified run folder (one with a config.json) under ``root``."""
    runs = [p.parent for p in Path(root).glob(f"*/{CONFIG_FILE}")]
    if not runs:
        raise BenchConfigError(f"--resume: no run folder with a {CONFIG_FILE} under {root}/; "
                               "pass the run folder: --resume runs/<name>")
    return max(runs, key=lambda p: (p / CONFIG_FILE).stat().st_mtime)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchConfigError(f"--device {name}: CUDA is not available on this machine")
    return dev


def load_split(cfg: BenchConfig):
    """The open-set split the config names; a bad path or malformed data is a BenchConfigError."""
    from losskit.data import load_dataset

    kw: dict[str, Any] = {}
    if cfg.dataset in ("folder", "omniglot"):
        kw["image_size"] = cfg.image_size
        if cfg.max_per_class is not None:
            kw["max_per_class"] = cfg.max_per_class
    try:
        return load_dataset(cfg.dataset, cfg.data_dir, **kw)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise BenchConfigError(f"--dataset {cfg.dataset} --data-dir {cfg.data_dir}: {e}") from e


class _Progress:
    """tqdm when installed, wanted and stderr is a terminal (a log file gets
    no carriage-return spam); otherwise one line per finished cell."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None]):
        self.bar = None
        self.log = log
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def step(self, n: int = 1) -> None:
        if self.bar is not None and n > 0:
            self.bar.update(n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.log(text)

    def cell_done(self, text: str) -> None:
        """A line per finished cell when there is no bar to show progress."""
        if self.bar is None and self.enabled:
            self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_bench(
    cfg: BenchConfig,
    out: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    plots: bool = True,
    log: Callable[[str], None] = print,
    split: Any = None,
) -> BenchRun:
    """Run (or finish) the bench into the folder ``out``; write results, leaderboard and plots.

    ``resume=True`` requires ``out/config.json`` and a matching protocol.
    ``split`` may be given to skip loading the data set (tests).
    """
    from . import report

    t_start = time.perf_counter()
    out = Path(out)
    cfg.validate()
    if not cfg.objectives:
        for name, lacks in unbenchable_objectives().items():
            log(f"bench: leaving out {name}: it needs {', '.join(lacks)} (no default), which the bench cannot fill")
    cfg.objectives = resolve_objectives(cfg.objectives)
    overrides: dict[str, dict[str, Any]] = {}
    for key, params in cfg.overrides.items():
        overrides.setdefault(normalize_label(key), {}).update(params)
    cfg.overrides = overrides
    hparams = resolve_hparams(cfg.objectives, cfg.overrides)
    device = resolve_device(cfg.device)
    proto = protocol(cfg, hparams, str(device))

    cfg_file = out / CONFIG_FILE
    if resume:
        if not cfg_file.exists():
            raise BenchConfigError(f"--resume {out}: no {CONFIG_FILE} there; is this a bench run folder?")
        with open(cfg_file) as f:
            saved = json.load(f)
        diffs = diff_protocol(saved.get("protocol", {}), proto)
        if diffs:
            raise BenchConfigError(
                f"--resume {out}: the configuration differs from the run's, so its cells would not be "
                "comparable. Differences:\n  " + "\n  ".join(diffs)
                + "\nStart a new run (--out) or resume with the run's settings."
            )
    else:
        if cfg_file.exists():
            raise BenchConfigError(f"{out} already holds a bench run; use --resume {out} or another --out")
        if split is None:  # before the run folder exists, so a bad path leaves nothing behind
            split = load_split(cfg)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cfg_file, {
            "protocol": proto,
            "losskit_version": _version(),
            "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
        })

    run = BenchRun(out=out, config=cfg, protocol=proto)
    run.cells = load_cells(out, proto)
    done = {(c["objective"], c["seed"]) for c in run.cells}
    todo = [(o, s) for s in range(cfg.seeds) for o in cfg.objectives if (o, s) not in done]
    if resume:
        log(f"resuming {out}: {len(done)} cells done, {len(todo)} to run")

    if todo:
        if split is None:
            split = load_split(cfg)
        from .train import PKSampler, batch_shape, train_cell

        p, k = batch_shape(cfg, split.train_y)
        steps = cfg.epochs * PKSampler(split.train_y, p, k, 0).steps_per_epoch
        log(f"bench: {split.name}: {split.num_train_classes} train classes ({len(split.train_y)} images), "
            f"{split.num_test_classes} held-out test classes ({len(split.test_y)} images); "
            f"{len(cfg.objectives)} objectives x {cfg.seeds} seeds, {cfg.epochs} epochs = {steps} steps "
            f"of P={p} x K={k} per cell on {device}"
            + (f" ({cfg.threads} thread{'s' if cfg.threads > 1 else ''})" if cfg.threads and device.type == "cpu" else ""))
        bar = _Progress(len(todo) * steps, progress, log)
        threads = torch.get_num_threads()
        if cfg.threads and device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        try:
            for i, (objective, seed) in enumerate(todo, 1):
                bar.describe(f"{objective} s{seed}")
                counted = [0]

                def on_step() -> None:
                    counted[0] += 1
                    bar.step()

                try:
                    cell = train_cell(cfg, split, objective, hparams[objective], seed, device, on_step=on_step)
                except (KeyboardInterrupt, MemoryError):
                    raise
                except Exception as e:  # one objective's failure must not lose the others
                    bar.step(steps - counted[0])  # keep the bar's total honest
                    msg = f"{type(e).__name__}: {e}"
                    run.failed[(objective, seed)] = msg
                    (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)
                    error_path(out, objective, seed).write_text(traceback.format_exc())
                    bar.write(f"FAILED {objective} seed {seed}: {msg}")
                    continue
                cell["protocol"] = proto
                atomic_write_json(cell_path(out, objective, seed), cell)
                err = error_path(out, objective, seed)
                if err.exists():
                    err.unlink()
                run.cells.append(cell)
                run.computed.append((objective, seed))
                bar.cell_done(f"bench: [{i}/{len(todo)}] {objective} seed {seed} done")
        except KeyboardInterrupt:
            run.interrupted = True
        finally:
            bar.close()
            torch.set_num_threads(threads)

    run.wall_time_s = time.perf_counter() - t_start
    report.write_results(run)
    if plots and run.cells:
        try:
            import matplotlib  # noqa: F401  (optional: the `bench` extra)
        except ImportError:
            log("bench: matplotlib is not installed, so no plots (pip install 'losskit[bench]')")
        else:
            from . import plots as plotting

            plotting.write_plots(run)
    run.wall_time_s = time.perf_counter() - t_start
    return run


def _version() -> str:
    try:
        from losskit import __version__

        return __version__
    except ImportError:
        return "unknown"
