"""``losskit bench``: train an embedding model with each objective and compare them, open-set."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from .config import BenchConfig, BenchConfigError, parse_set, split_objectives

__all__ = ["add_bench_parser", "config_from_args", "cmd_bench"]

_DEFAULTS = BenchConfig()

#: argparse dest -> BenchConfig field, for options that map one to one.
_FIELDS = ("dataset", "data_dir", "image_size", "max_per_class", "seeds", "epochs", "embedding_dim", "model",
           "lr", "weight_decay", "batch_size", "batch_classes", "batch_samples", "augment", "device", "threads")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    d = _DEFAULTS
    p = subparsers.add_parser(
        "bench",
        help="train an embedding model with each objective and compare them on held-out classes",
        description=(
            "Train the same embedding network with each chosen objective (same initialisation per seed, "
            "same class-balanced batches, optimiser, budget and augmentation) and evaluate retrieval and "
            "verification on classes never seen in training. With no arguments: scikit-learn's digits, "
            "classes 0-4 train, 5-9 test, softmax plus every registered embedding objective plus arcface with "
            "its dense, chunked and sampled heads, 3 seeds."
        ),
    )
    # defaults are None so that --resume can tell given options from defaults
    p.add_argument("--objectives", default=None,
                   help="comma-separated registry names or variants NAME[param=value,...], e.g. "
                        "softmax,arcface,arcface[head=chunked] (default: softmax + every embedding objective "
                        "+ arcface's dense, chunked and sampled heads)")
    p.add_argument("--set", dest="overrides", action="append", default=None, metavar="NAME.PARAM=VALUE",
                   help="override a hyperparameter, e.g. --set arcface.margin=0.4 (python literal; repeatable; "
                        "applies to arcface and its variants; 'arcface[head=chunked].margin=0.4' sets one variant)")
    p.add_argument("--seeds", type=int, default=None, help=f"number of seeds 0..N-1 (default {d.seeds})")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs per cell (default {d.epochs})")
    p.add_argument("--dataset", choices=("digits", "folder", "omniglot"), default=None,
                   help=f"data set (default {d.dataset})")
    p.add_argument("--data-dir", default=None, help="folder (one subfolder per class) or Omniglot zips/folders")
    p.add_argument("--image-size", type=int, default=None, help=f"resize side for folder/omniglot ({d.image_size})")
    p.add_argument("--max-per-class", type=int, default=None, help="cap images per class (folder/omniglot)")
    p.add_argument("--embedding-dim", type=int, default=None, help=f"embedding size (default {d.embedding_dim})")
    p.add_argument("--model", choices=("auto", "mlp", "cnn"), default=None,
                   help="network: auto = MLP for <=16x16 images, small CNN above")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate, all parameters ({d.lr})")
    p.add_argument("--weight-decay", type=float, default=None, help=f"Adam weight decay ({d.weight_decay})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"target batch size when P is automatic ({d.batch_size})")
    p.add_argument("--batch-classes", type=int, default=None, help="P classes per batch (default: from data)")
    p.add_argument("--batch-samples", type=int, default=None, help="K samples per class (default: from data)")
    p.add_argument("--augment", choices=("none", "shift"), default=None,
                   help="training augmentation, identical for all objectives (default none)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: the bench's models are tiny and extra threads only "
                        "contend on a busy machine; 0 = torch's default)")
    p.add_argument("--out", default=None, help="run folder (default runs/<timestamp>)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
                   help="finish an interrupted run (default: the newest folder under runs/)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
    return p


def _overlay(cfg: BenchConfig, args: argparse.Namespace) -> BenchConfig:
    changes = {f: getattr(args, f) for f in _FIELDS if getattr(args, f, None) is not None}
    if args.objectives is not None:
        changes["objectives"] = split_objectives(args.objectives)
    if args.overrides is not None:
        changes["overrides"] = parse_set(args.overrides)
    return dataclasses.replace(cfg, **changes)


def config_from_args(args: argparse.Namespace) -> tuple[BenchConfig, Path, bool]:
    """(config, run folder, resume?) from parsed arguments.

    With ``--resume`` the run's saved config is the base and given options
    overlay it (a difference is refused later, by the protocol check).
    """
    from .runner import CONFIG_FILE, latest_run

    if args.resume is not None:
        out = latest_run() if args.resume == "latest" else Path(args.resume)
        if args.out is not None and Path(args.out) != out:
            raise BenchConfigError("give the run folder once: --resume RUN_DIR (not also --out)")
        cfg_file = out / CONFIG_FILE
        if not cfg_file.exists():
            raise BenchConfigError(f"--resume {out}: no {CONFIG_FILE} there; is this a bench run folder?")
        saved = json.loads(cfg_file.read_text())["protocol"]
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
    from .runner import run_bench

    t0 = time.perf_counter()
    try:
        cfg, out, resume = config_from_args(args)
        run = run_bench(cfg, out, resume=resume, progress=not args.no_progress, plots=not args.no_plots,
                        log=lambda s: print(s, file=sys.stderr))
    except BenchConfigError as e:
        print(f"losskit bench: error: {e}", file=sys.stderr)
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
