"""``losskit bench``: the command line of the bench (its config options come from :class:`BenchConfig`'s fields)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from .config import BenchConfig, BenchConfigError, choices_of, cli_fields, flag_of
from .runner import run_bench
from .store import latest_run, read_config

__all__ = ["add_bench_parser", "add_config_options", "config_from_args", "cmd_bench"]


def _help(f) -> str:
    md = f.metadata
    text = md.get("default_text")
    if text is None and f.default is not None and f.default is not dataclasses.MISSING:
        text = str(f.default)
    return md["help"] + (f" (default: {text})" if text else "")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`BenchConfig` field (:func:`~losskit.bench.config.cli_fields`), read
    from the field's :func:`~losskit.bench.config.option`.  Every default is None, so that
    ``--resume`` can tell the options given from the defaults; :func:`config_from_args` fills them."""
    for f in cli_fields():
        md = f.metadata
        kw: dict = {"dest": f.name, "default": None, "help": _help(f)}
        if md.get("append"):
            kw["action"] = "append"
        elif isinstance(f.default, bool):  # --flag / --no-flag
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = md.get("type") or (type(f.default) if f.default is not dataclasses.MISSING else str)
        choices = choices_of(f)
        if choices is not None:
            kw["choices"] = choices
        if md.get("metavar"):
            kw["metavar"] = md["metavar"]
        parser.add_argument(flag_of(f), **kw)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="train with each objective and compare them (default task: embeddings on held-out classes)",
        description=(
            "Train the same network with each chosen objective (same initialisation per seed, same batches, "
            "optimiser, budget and augmentation) and compare them on the task's metrics. The default task, "
            "embedding, evaluates retrieval and verification on classes never seen in training. With no "
            "arguments: scikit-learn's digits, classes 0-4 train, 5-9 test, softmax plus every registered "
            "embedding objective plus arcface with its dense and chunked heads, 3 seeds, with the raw input and the untrained network as baseline rows."
        ),
    )
    add_config_options(p)
    # how to run, not what is measured: not part of the config or the protocol
    p.add_argument("--out", default=None, help="run folder (default runs/<timestamp>)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
                   help="finish an interrupted run (default: the newest folder under runs/)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--save-models", action="store_true",
                   help="keep each cell's trained network under RUN/models/ (for losskit eval)")
    p.set_defaults(func=cmd_bench)
    return p


def _overlay(cfg: BenchConfig, args: argparse.Namespace) -> BenchConfig:
    changes = {}
    for f in cli_fields():
        value = getattr(args, f.name, None)
        if value is not None:
            parse = f.metadata.get("parse")
            changes[f.name] = parse(value) if parse else value
    return dataclasses.replace(cfg, **changes)


def config_from_args(args: argparse.Namespace) -> tuple[BenchConfig, Path, bool]:
    """(config, run folder, resume?) from parsed arguments.

    With ``--resume`` the run's saved config is the base and given options
    overlay it (a difference is refused later, by the protocol check).
    """
    if args.resume is not None:
        out = latest_run() if args.resume == "latest" else Path(args.resume)
        if args.out is not None and Path(args.out) != out:
            raise BenchConfigError("give the run folder once: --resume RUN_DIR (not also --out)")
        saved = read_config(out)["protocol"]
        saved = {k: v for k, v in saved.items() if k != "hparams"}
        base = BenchConfig.from_json(saved)
        return _overlay(base, args), out, True
    cfg = _overlay(BenchConfig(), args)
    if args.out is not None:
        out = Path(args.out)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / stamp
        i = 1
        while out.exists():
            out = Path("runs") / f"{stamp}-{i}"
            i += 1
    return cfg, out, False


def _process_age() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere): includes python's and torch's start-up."""
    try:
        import os

        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def cmd_bench(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        cfg, out, resume = config_from_args(args)
        run = run_bench(cfg, out, resume=resume, progress=not args.no_progress, plots=not args.no_plots,
                        log=lambda s: print(s, file=sys.stderr), save_models=getattr(args, "save_models", False))
    except BenchConfigError as e:
        print(f"losskit bench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the run folder or a data file: the user's side, said in one line
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"losskit bench: error:{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(run.leaderboard)
    print(f"\nrun folder: {run.out}  (results.json, cells.csv, summary.csv, config.json, leaderboard.txt"
          f"{', plots/*.png' if not args.no_plots and run.cells else ''})")
    trained = len(run.computed)
    age = _process_age()
    since = f"{age:.1f} s since the process started, " if age is not None else ""
    print(f"total wall time: {since}{time.perf_counter() - t0:.1f} s in the bench command "
          f"({trained} cell{'s' if trained != 1 else ''} trained in this call)")
    if run.interrupted:
        print(f"interrupted: finished cells are saved; continue with: losskit bench --resume {run.out}",
              file=sys.stderr)
        return 130
    return 1 if run.failed else 0
