"""Running the grid of (objective, seed) cells of a task, with a run folder that survives interruption.

The same for every task (:mod:`losskit.bench.tasks`): the objectives and
their hyperparameters are resolved, the protocol is saved (``config.json``),
the cells run seed by seed and each is written the moment it finishes
(:mod:`losskit.bench.store`); ``resume`` skips every cell already there, after
checking that the run's protocol matches.  Then the results, the leaderboard
and the plots are written.

Before anything trains, everything a user can get wrong is checked: the
options, each objective's hyperparameters (each objective is built once), the
data of every class split (a metric that would be undefined is an error) and
the batch shape; a run folder is written by one bench at a time (a lock).
"""

from __future__ import annotations

import dataclasses
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
from .optim_axis import PILOT_DIR, PILOT_SCHEDULE, needs_pilot
from .progress import Progress
from .protocol import check_resume, protocol
from .store import (BASELINES_DIR, CELLS_DIR, CONFIG_FILE, SPLITS_DIR, RunLock, atomic_write_json, cell_key, cell_path,
                    error_path, load_cells, model_path, read_config)
from .tasks import Task, get_task

__all__ = ["run_bench", "BenchRun", "resolve_device"]


def _key(objective: str, seed: int, split: int = 0) -> tuple:
    """How cells are named in ``BenchRun.computed``/``failed``: ``(objective, seed)`` for split 0,
    ``(objective, seed, split)`` for the other class splits."""
    return (objective, seed) if not split else (objective, seed, split)


@dataclass
class BenchRun:
    out: Path
    config: BenchConfig
    protocol: dict[str, Any]
    cells: list[dict[str, Any]] = field(default_factory=list)
    computed: list[tuple] = field(default_factory=list)  # cells trained in this call (see _key)
    failed: dict[tuple, str] = field(default_factory=dict)
    interrupted: bool = False
    wall_time_s: float = 0.0
    leaderboard: str = ""
    #: the task's baseline rows (raw input, untrained network), one record per (baseline, seed, split)
    baseline_cells: list[dict[str, Any]] = field(default_factory=list)
    #: warnings about the data (singleton classes, skipped files), also in config.json
    warnings: list[str] = field(default_factory=list)
    #: the data set's name for titles
    data_name: str = ""

    @property
    def task(self) -> Task:
        return get_task(self.config.task)

    def units(self) -> list[tuple[int, int]]:
        """Every (seed, split) of the protocol, in run order (split by split, seed by seed)."""
        return [(seed, split) for split in range(getattr(self.config, "splits", 1))
                for seed in range(self.config.seeds)]

    @property
    def complete(self) -> bool:
        done = {cell_key(c) for c in self.cells}
        return all((o, s, sp) in done for o in self.config.objectives for s, sp in self.units())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise BenchConfigError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchConfigError(f"--device {name}: CUDA is not available on this machine")
    return dev


def _make_folder(out: Path) -> list[Path]:
    """Create ``out`` (and missing parents); return the folders created, deepest first."""
    made = []
    p = out
    while not p.exists():
        made.append(p)
        if p.parent == p:
            break
        p = p.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchConfigError(f"--out {out}: cannot create the run folder ({e.strerror or e})") from None
    if not out.is_dir():
        raise BenchConfigError(f"--out {out}: not a folder")
    if not os.access(out, os.W_OK | os.X_OK):
        raise BenchConfigError(f"--out {out}: the run folder is not writable")
    return made


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            break


def _user_set(name: str, hp: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of ``hp`` that differ from the registry's defaults."""
    from losskit.core import registry

    defaults = registry.spec(name, kind="objective").hparams
    return {k: v for k, v in hp.items() if k not in defaults or defaults[k] != v}


def _probe_objectives(task: Task, cfg: BenchConfig, data: Any, hparams: dict[str, dict[str, Any]],
                      device: torch.device) -> None:
    """Build every objective once (``task.check_objective``) before anything trains: a bad
    ``--set`` or variant value is a BenchConfigError naming the objective and what was set."""
    for label, hp in hparams.items():
        try:
            task.check_objective(cfg, data, label, hp, device)
        except BenchConfigError:
            raise
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - the objective's own check is the message
            given = _user_set(normalize_label(label).partition("[")[0], hp)
            what = (" with " + ", ".join(f"{k}={v!r}" for k, v in given.items())) if given else ""
            raise BenchConfigError(f"objective {label!r}{what}: {type(e).__name__}: {e}") from None


def run_bench(
    cfg: BenchConfig,
    out: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    plots: bool = True,
    log: Callable[[str], None] = print,
    data: Any = None,
    save_models: bool = False,
) -> BenchRun:
    """Run (or finish) the bench into the folder ``out``; write results, leaderboard and plots.

    ``resume=True`` requires ``out/config.json`` and a matching protocol.
    ``data`` may be given to skip the task's loading of its data (tests; class split 0).
    ``save_models=True`` keeps each trained network under ``out/models/`` (``losskit eval``).
    """
    t_start = time.perf_counter()
    out = Path(out)
    cfg.validate()
    task = get_task(cfg.task)
    if (cfg.splits > 1 or cfg.split_seed) and not task.supports_splits:
        raise BenchConfigError(f"--splits/--split-seed: the {task.name!r} task has one fixed split")
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
    if resume and not (out / CONFIG_FILE).exists():
        read_config(out)  # the error naming the folder
    if not resume and (out / CONFIG_FILE).exists():
        raise BenchConfigError(f"{out} already holds a bench run; use --resume {out} or another --out")

    made = _make_folder(out)
    lock = RunLock(out)
    try:
        lock.acquire()
    except BaseException:
        _remove_empty(made)
        raise
    started = [False]
    try:
        return _run_locked(task, cfg, out, resume, progress, plots, log, data, save_models, hparams, device, proto,
                           t_start, started)
    finally:
        lock.release()
        if not started[0]:  # nothing was written: leave no folder behind
            _remove_empty(made)


def _run_locked(task, cfg, out, resume, progress, plots, log, data, save_models, hparams, device, proto, t_start,
                started) -> BenchRun:
    cfg_file = out / CONFIG_FILE
    datas: dict[int, Any] = {}

    def data_for(split: int) -> Any:
        if split not in datas:
            datas[split] = data if (split == 0 and data is not None) else task.load_split(cfg, split)
        return datas[split]

    warnings: list[str] = []
    if resume:
        saved = read_config(out)
        check_resume(out, saved.get("protocol", {}), proto)
        warnings = list(saved.get("warnings", []))
        data_name = saved.get("data_name", "")
    else:
        if cfg_file.exists():
            raise BenchConfigError(f"{out} already holds a bench run; use --resume {out} or another --out")
        classes = {}
        for split in range(cfg.splits):  # every split is loaded and checked before anything trains
            d = data_for(split)
            found = task.check_data(cfg, d)
            warnings += [f"split {split}: {w}" if cfg.splits > 1 else w for w in found]
            task.steps_per_epoch(cfg, d)
            classes[split] = task.split_classes(d)
        _probe_objectives(task, cfg, data_for(0), hparams, device)
        data_name = task.data_name(cfg, data_for(0))
        for w in warnings:
            log(f"bench: warning: {w}")
        atomic_write_json(cfg_file, {
            "protocol": proto,
            "losskit_version": _version(),
            "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
            "data_name": data_name,
            "warnings": warnings,
        })
        started[0] = True
        for split, names in classes.items():
            if names is not None:
                atomic_write_json(out / SPLITS_DIR / f"split{split}.json",
                                  {"split": split, "split_seed": cfg.split_seed + split, **names})
    started[0] = True

    run = BenchRun(out=out, config=cfg, protocol=proto, warnings=warnings, data_name=data_name)
    run.cells = load_cells(out, proto)
    run.baseline_cells = load_cells(out, proto, folder=BASELINES_DIR) if cfg.baselines else []
    done = {cell_key(c) for c in run.cells}
    todo = [(o, seed, split) for seed, split in run.units() for o in cfg.objectives if (o, seed, split) not in done]
    base_done = {cell_key(c) for c in run.baseline_cells}
    base_todo = [(b, seed, split) for seed, split in run.units() for b in (task.baselines if cfg.baselines else ())
                 if (b, seed, split) not in base_done]
    if resume:
        log(f"resuming {out}: {len(done)} cells done, {len(todo)} to run")

    if base_todo:
        _run_baselines(task, cfg, data_for, base_todo, device, proto, run, log)
    if todo:
        train_cfg = _pilot(cfg, out, progress, log, data, run) if needs_pilot(cfg) else cfg
        if not run.interrupted:
            _run_cells(task, train_cfg, data_for, todo, hparams, device, proto, run, progress, log, save_models)

    run.wall_time_s = time.perf_counter() - t_start
    report.write_results(run)
    for w in report.budget_warnings(run):
        log(f"bench: warning: {w}")
    if plots and run.cells:
        try:
            import matplotlib  # noqa: F401  (optional: the `bench` extra)
        except ImportError:
            log("bench: matplotlib is not installed, so no plots (pip install 'losskit[bench]')")
        else:
            plotting.write_plots(run)
    run.wall_time_s = time.perf_counter() - t_start
    return run


def _pilot(cfg: BenchConfig, out: Path, progress: bool, log, data, run: BenchRun) -> BenchConfig:
    """``--schedule refined`` without ``--refine-from``: train (or finish) the pilot run -- the same
    protocol with ``--schedule linear-decay``, no baselines -- in ``out/pilot``, and return the
    configuration that trains the refined cells from it.  The run's own protocol keeps
    ``refine_from`` empty (so ``--resume`` with the same options resumes both)."""
    pilot_out = out / PILOT_DIR
    pilot_cfg = dataclasses.replace(cfg, schedule=PILOT_SCHEDULE, refine_from=None, baselines=False,
                                    objectives=list(cfg.objectives), overrides=dict(cfg.overrides))
    again = (pilot_out / CONFIG_FILE).exists()
    log(f"bench: --schedule refined without --refine-from: {'finishing' if again else 'training'} the pilot run "
        f"(--schedule {PILOT_SCHEDULE}) in {pilot_out} first; the refined cells follow its gradient norms")
    pilot = run_bench(pilot_cfg, pilot_out, resume=again, progress=progress, plots=False,
                      log=lambda s: log(f"pilot: {s}"), data=data)
    run.interrupted = pilot.interrupted
    return dataclasses.replace(cfg, refine_from=str(pilot_out))


def _run_baselines(task: Task, cfg: BenchConfig, data_for, todo, device, proto, run: BenchRun, log) -> None:
    """Score the task's baseline rows (no training) for every (seed, split)."""
    for name, seed, split in todo:
        t0 = time.perf_counter()
        try:
            scores = task.evaluate_baseline(cfg, data_for(split), name, seed, device)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # a baseline that cannot be scored is reported, the run goes on
            run.failed[_key(name, seed, split)] = f"{type(e).__name__}: {e}"
            log(f"FAILED baseline {name} seed {seed}: {type(e).__name__}: {e}")
            continue
        cell = {"objective": name, "name": name, "baseline": True, "seed": seed, "split": split,
                "metrics": dict(scores.metrics), "eval_time_s": time.perf_counter() - t0, **scores.extras,
                "device": str(device), "protocol": proto}
        atomic_write_json(cell_path(run.out, name, seed, split, folder=BASELINES_DIR), cell)
        run.baseline_cells.append(cell)


def _saver(task: Task, cfg: BenchConfig, data: Any, out: Path, objective: str, seed: int, split: int,
           proto: dict[str, Any]):
    def keep(trainer) -> None:
        record = task.model_record(cfg, data, trainer)
        if record is None:
            return
        path = model_path(out, objective, seed, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({**record, "objective": objective, "seed": seed, "split": split, "task": task.name,
                    "protocol": proto}, tmp)
        os.replace(tmp, path)

    return keep


def _run_cells(task: Task, cfg: BenchConfig, data_for, todo: list[tuple[str, int, int]],
               hparams: dict[str, dict[str, Any]], device: torch.device, proto: dict[str, Any], run: BenchRun,
               progress: bool, log: Callable[[str], None], save_models: bool = False) -> None:
    """Train the ``todo`` cells in order, writing each as it finishes; a failing cell is recorded
    and the others go on; Ctrl-C stops with ``run.interrupted`` set."""
    out = run.out
    first = data_for(todo[0][2])
    steps = cfg.epochs * task.steps_per_epoch(cfg, first)
    threaded = bool(cfg.threads) and device.type == "cpu"
    splits = f" x {cfg.splits} class splits" if cfg.splits > 1 else ""
    log(f"bench: {task.describe_data(first)}; {len(cfg.objectives)} objectives x {cfg.seeds} seeds{splits}, "
        f"{task.describe_steps(cfg, first)} per cell on {device}"
        + (f" ({cfg.threads} thread{'s' if cfg.threads > 1 else ''})" if threaded else ""))
    total = sum(cfg.epochs * task.steps_per_epoch(cfg, data_for(sp)) for _, _, sp in todo)
    bar = Progress(total, progress, log)
    threads = torch.get_num_threads()
    if threaded:
        torch.set_num_threads(cfg.threads)
    try:
        for i, (objective, seed, split) in enumerate(todo, 1):
            data = data_for(split)
            steps = cfg.epochs * task.steps_per_epoch(cfg, data)
            where = f"seed {seed}" + (f" split {split}" if split else "")
            bar.describe(f"{objective} s{seed}" + (f" c{split}" if split else ""))
            counted = [0]

            def on_step() -> None:
                counted[0] += 1
                bar.step()

            keep = _saver(task, cfg, data, out, objective, seed, split, proto) if save_models else None
            try:
                cell = run_cell(task, cfg, data, objective, hparams[objective], seed, device, on_step=on_step,
                                split=split, keep=keep)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # one objective's failure must not lose the others
                bar.step(steps - counted[0])  # keep the bar's total honest
                msg = f"{type(e).__name__}: {e}"
                run.failed[_key(objective, seed, split)] = msg
                (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)
                error_path(out, objective, seed, split).write_text(traceback.format_exc())
                bar.write(f"FAILED {objective} {where}: {msg}")
                continue
            cell["protocol"] = proto
            atomic_write_json(cell_path(out, objective, seed, split), cell)
            err = error_path(out, objective, seed, split)
            if err.exists():
                err.unlink()
            run.cells.append(cell)
            run.computed.append(_key(objective, seed, split))
            bar.cell_done(f"bench: [{i}/{len(todo)}] {objective} {where} done")
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
