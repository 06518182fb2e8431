"""Running the grid of (objective, seed) cells of a task, with a run folder that survives interruption.

The same for every task (:mod:`losskit.bench.tasks`): the objectives and
their hyperparameters are resolved, the protocol is saved (``config.json``),
the cells run seed by seed and each is written the moment it finishes
(:mod:`losskit.bench.store`); ``resume`` skips every cell already there, after
checking that the run's protocol matches.  Then the results, the leaderboard
and the plots are written.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import plots as plotting
from . import report
from .cell import run_cell
from .config import BenchConfig
from .errors import BenchConfigError
from .labels import normalize_label
from .objectives import resolve_hparams, resolve_objectives, unbenchable_objectives
from .progress import Progress
from .protocol import check_resume, protocol
from .store import CELLS_DIR, CONFIG_FILE, atomic_write_json, cell_path, error_path, load_cells, read_config
from .tasks import Task, get_task

__all__ = ["run_bench", "BenchRun", "resolve_device"]


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
    def task(self) -> Task:
        return get_task(self.config.task)

    @property
    def complete(self) -> bool:
        done = {(c["objective"], c["seed"]) for c in self.cells}
        return all((o, s) in done for o in self.config.objectives for s in range(self.config.seeds))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchConfigError(f"--device {name}: CUDA is not available on this machine")
    return dev


def run_bench(
    cfg: BenchConfig,
    out: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    plots: bool = True,
    log: Callable[[str], None] = print,
    data: Any = None,
) -> BenchRun:
    """Run (or finish) the bench into the folder ``out``; write results, leaderboard and plots.

    ``resume=True`` requires ``out/config.json`` and a matching protocol.
    ``data`` may be given to skip the task's loading of its data (tests).
    """
    t_start = time.perf_counter()
    out = Path(out)
    cfg.validate()
    task = get_task(cfg.task)
    if not cfg.objectives:
        for name, lacks in unbenchable_objectives(task).items():
            log(f"bench: leaving out {name}: it needs {', '.join(lacks)} (no default), which the bench cannot fill")
    cfg.objectives = resolve_objectives(cfg.objectives, task)
    overrides: dict[str, dict[str, Any]] = {}
    for key, params in cfg.overrides.items():
        overrides.setdefault(normalize_label(key), {}).update(params)
    cfg.overrides = overrides
    hparams = resolve_hparams(cfg.objectives, cfg.overrides, task)
    device = resolve_device(cfg.device)
    proto = protocol(cfg, hparams, str(device))

    cfg_file = out / CONFIG_FILE
    if resume:
        check_resume(out, read_config(out).get("protocol", {}), proto)
    else:
        if cfg_file.exists():
            raise BenchConfigError(f"{out} already holds a bench run; use --resume {out} or another --out")
        if data is None:  # before the run folder exists, so a bad path leaves nothing behind
            data = task.load_data(cfg)
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
        if data is None:
            data = task.load_data(cfg)
        _run_cells(task, cfg, data, todo, hparams, device, proto, run, progress, log)

    run.wall_time_s = time.perf_counter() - t_start
    report.write_results(run)
    if plots and run.cells:
        try:
            import matplotlib  # noqa: F401  (optional: the `bench` extra)
        except ImportError:
            log("bench: matplotlib is not installed, so no plots (pip install 'losskit[bench]')")
        else:
            plotting.write_plots(run)
    run.wall_time_s = time.perf_counter() - t_start
    return run


def _run_cells(task: Task, cfg: BenchConfig, data: Any, todo: list[tuple[str, int]],
               hparams: dict[str, dict[str, Any]], device: torch.device, proto: dict[str, Any], run: BenchRun,
               progress: bool, log: Callable[[str], None]) -> None:
    """Train the ``todo`` cells in order, writing each as it finishes; a failing cell is recorded
    and the others go on; Ctrl-C stops with ``run.interrupted`` set."""
    out = run.out
    steps = cfg.epochs * task.steps_per_epoch(cfg, data)
    threaded = bool(cfg.threads) and device.type == "cpu"
    log(f"bench: {task.describe_data(data)}; {len(cfg.objectives)} objectives x {cfg.seeds} seeds, "
        f"{task.describe_steps(cfg, data)} per cell on {device}"
        + (f" ({cfg.threads} thread{'s' if cfg.threads > 1 else ''})" if threaded else ""))
    bar = Progress(len(todo) * steps, progress, log)
    threads = torch.get_num_threads()
    if threaded:
        torch.set_num_threads(cfg.threads)
    try:
        for i, (objective, seed) in enumerate(todo, 1):
            bar.describe(f"{objective} s{seed}")
            counted = [0]

            def on_step() -> None:
                counted[0] += 1
                bar.step()

            try:
                cell = run_cell(task, cfg, data, objective, hparams[objective], seed, device, on_step=on_step)
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


def _version() -> str:
    try:
        from losskit import __version__

        return __version__
    except ImportError:
        return "unknown"
