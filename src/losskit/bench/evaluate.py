"""``losskit eval RUN --task ...``: score a bench run's saved networks on another protocol.

``losskit bench --save-models`` keeps each cell's trained network under
``RUN/models/``; this rebuilds each one from the run's protocol (its ``--model``,
input shape and embedding size), loads its weights and evaluates it:

* ``--task oneshot``: Omniglot's 20-way one-shot classification on the 20 runs of
  ``all_runs.zip`` (Lake et al. 2015), each test image given the class of its
  nearest training image by cosine similarity, with the published error rates
  printed beside it;
* ``--task embedding``: the bench's open-set retrieval and verification metrics
  on another data set (``--dataset``, ``--data-dir``) of the same image size.

Several RUN folders (e.g. runs of the same protocol started side by side, each with its own
objectives) give one table: their protocols must agree except for the objectives.
The table is printed and written to ``eval_<task>.json`` in the first RUN.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_eval_parser", "evaluate_run", "load_model", "EVAL_TASKS"]

EVAL_TASKS = ("oneshot", "embedding")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="evaluate a bench run's saved networks on another protocol (e.g. Omniglot 20-way one-shot)",
        description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("run", metavar="RUN", nargs="+",
                   help="bench run folders holding models/ (losskit bench --save-models); several: one table, "
                        "their protocols equal but for the objectives")
    p.add_argument("--task", required=True, choices=EVAL_TASKS,
                   help="oneshot: Omniglot 20-way one-shot (all_runs.zip); embedding: retrieval on --dataset")
    p.add_argument("--data-dir", default=None,
                   help="oneshot: the folder holding all_runs.zip (default: the run's --data-dir); embedding: the "
                        "data set's folder")
    p.add_argument("--dataset", default=None, help="embedding: digits, folder or omniglot (default: the run's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    # the choices are losskit.data.omniglot.ONESHOT_TTA, written out so that --help does not import torch
    p.add_argument("--tta", default="none", choices=("none", "shift"),
                   help="oneshot: also the error with test-time augmentation, a second column (shift: each "
                        "image's embedding the mean over its 9 one-pixel shifts; the published figures use none)")
    p.set_defaults(func=cmd_eval)
    return p


def load_model(path: Path, protocol: dict[str, Any], device):
    """The network saved at ``path`` (a ``--save-models`` file), rebuilt and in eval mode."""
    import torch

    from .model import build_model

    record = torch.load(path, map_location="cpu", weights_only=False)
    shape = tuple(record.get("input_shape") or ())
    if not shape:
        raise ValueError(f"{path}: no input_shape in the saved record; not written by the embedding task?")
    net = build_model(record.get("model", protocol.get("model", "auto")), shape,
                      int(record.get("embedding_dim", protocol.get("embedding_dim", 64))), int(record["seed"]))
    net.load_state_dict(record["state_dict"])
    return net.to(device).eval(), record


def _stats(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


#: protocol keys that may differ between the run folders of one ``losskit eval`` table
PER_RUN_KEYS = ("objectives", "hparams", "overrides")


def evaluate_run(run: str | Path | list, task: str, data_dir: str | None = None, dataset: str | None = None,
                 device: str = "cpu", tta: str = "none") -> tuple[str, dict[str, Any]]:
    """Evaluate every saved network of ``run`` (a folder, or a list of folders whose protocols agree
    but for :data:`PER_RUN_KEYS`) on ``task``; return (table text, results).  ``tta="shift"``
    (oneshot only) adds the error with shift test-time augmentation (``oneshot_error_shift``)."""
    import torch

    from losskit.data.omniglot import ONESHOT_TTA, PUBLISHED_ONESHOT, load_oneshot_runs, oneshot_error

    from .errors import BenchConfigError
    from .store import MODELS_DIR, atomic_write_json, read_config
    from .tasks.embedding import embed

    if tta not in ONESHOT_TTA:
        raise BenchConfigError(f"--tta: expected one of {', '.join(ONESHOT_TTA)}; got {tta!r}")
    if tta != "none" and task != "oneshot":
        raise BenchConfigError(f"--tta {tta} is for --task oneshot; got --task {task}")
    folders = [Path(r) for r in (run if isinstance(run, (list, tuple)) else [run])]
    run = folders[0]
    proto = read_config(run)["protocol"]
    files = []
    for folder in folders:
        other = read_config(folder)["protocol"] if folder != run else proto
        diff = sorted(k for k in set(proto) | set(other)
                      if k not in PER_RUN_KEYS and proto.get(k, "<missing>") != other.get(k, "<missing>"))
        if diff:
            raise BenchConfigError(f"{folder}: its protocol differs from {run}'s in {', '.join(diff)}; one table "
                                   "needs runs that differ only in their objectives")
        mine = sorted((folder / MODELS_DIR).glob("*.pt"))
        if not mine:
            raise BenchConfigError(f"{folder}: no saved networks under {folder / MODELS_DIR}; run the bench with "
                                   "--save-models")
        files += mine
    dev = torch.device(device)
    image_size = int(proto.get("image_size", 28))
    if task == "oneshot":
        where = data_dir or proto.get("data_dir")
        if not where:
            raise BenchConfigError("--task oneshot needs --data-dir (the folder holding all_runs.zip)")
        try:
            runs = load_oneshot_runs(where, image_size)
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            raise BenchConfigError(f"--data-dir {where}: {e}") from None
    else:
        from losskit.data import load_dataset

        name = dataset or proto.get("dataset", "digits")
        kw = {} if name == "digits" else {"image_size": image_size}
        try:
            split = load_dataset(name, data_dir if name != "digits" else None, **kw)
        except (FileNotFoundError, NotADirectoryError, ValueError, TypeError) as e:
            raise BenchConfigError(f"--dataset {name} --data-dir {data_dir}: {e}") from None
    per: dict[str, list[dict[str, Any]]] = {}
    for f in files:
        try:
            net, record = load_model(f, proto, dev)
        except (ValueError, RuntimeError, KeyError) as e:
            raise BenchConfigError(f"{f}: cannot rebuild the saved network ({type(e).__name__}: {e})") from None
        if task == "oneshot":
            scores = oneshot_error(lambda x: embed(net, x, dev), runs)
            if tta != "none":
                shifted = oneshot_error(lambda x: embed(net, x, dev), runs, tta=tta)
                scores.update({f"{k}_{tta}": v for k, v in shifted.items()})
        else:
            from losskit import metrics as M

            if tuple(split.test_x.shape[1:]) != tuple(record["input_shape"]):
                raise BenchConfigError(f"the network takes images {tuple(record['input_shape'])}; {name} gives "
                                       f"{tuple(split.test_x.shape[1:])}")
            scores = M.evaluate_embeddings(embed(net, split.test_x, dev), split.test_y, ks=(1, 4))
        if any(c["seed"] == record["seed"] and c["split"] == record.get("split", 0)
               for c in per.get(record["objective"], [])):
            raise BenchConfigError(f"{f}: {record['objective']} seed {record['seed']} is saved in two of the runs; "
                                   "one table takes each network once")
        per.setdefault(record["objective"], []).append({"seed": record["seed"], "split": record.get("split", 0),
                                                        **{k: float(v) for k, v in scores.items()}})
    rows = []
    key = "oneshot_error" if task == "oneshot" else "recall@1"
    for objective, cells in per.items():
        mean, std = _stats([c[key] for c in cells])
        row = {"objective": objective, "n": len(cells), "mean": mean, "std": std, "cells": cells}
        if tta != "none":
            row[f"mean_{tta}"], row[f"std_{tta}"] = _stats([c[f"{key}_{tta}"] for c in cells])
        rows.append(row)
    rows.sort(key=lambda r: r["mean"] if task == "oneshot" else -r["mean"])
    label = "20-way 1-shot error %" if task == "oneshot" else "R@1 %"
    width = max(len(r["objective"]) for r in rows)
    lines = [f"losskit eval {' '.join(map(str, folders))} --task {task}: {len(files)} saved networks "
             f"(trained on {proto.get('dataset')}, {proto.get('epochs')} epochs, --model {proto.get('model')}, "
             f"--augment {proto.get('augment')}, {image_size}x{image_size}"
             + (", --train-on all" if proto.get("train_on") == "all" else "")
             + (", --rotation-classes" if proto.get("rotation_classes") else "") + ")",
             f"{'objective'.ljust(width)}  seeds  {label}"]
    first_columns = len(lines[-1])
    if tta != "none":
        lines[-1] += f"  {tta}-TTA error %"

    def cell(mean: float, std: float) -> str:
        return f"{100 * mean:.1f}" + (f"±{100 * std:.1f}" if math.isfinite(std) else "")

    for r in rows:
        line = f"{r['objective'].ljust(width)}  {r['n']:>5}  " + cell(r["mean"], r["std"])
        if tta != "none":
            line = line.ljust(first_columns) + "  " + cell(r[f"mean_{tta}"], r[f"std_{tta}"])
        lines.append(line)
    if task == "oneshot":
        lines.append("mean±std over seeds of the error over the 20 runs (400 test images; one run's error is "
                     "1/20 per mistake).")
        lines.append("published, same 20 runs: " + "; ".join(f"{k} {100 * v:.1f}%" for k, v in
                                                             PUBLISHED_ONESHOT.items()) + ".")
        if tta == "shift":
            lines.append("shift-TTA: each image's embedding is the mean of the L2-normalised embeddings of its 9 "
                         "one-pixel shifts (no label used); the published figures are without it.")
    text = "\n".join(lines)
    results = {"run": str(run), "runs": [str(f) for f in folders], "task": task, "tta": tta, "rows": rows,
               **({"published": PUBLISHED_ONESHOT} if task == "oneshot" else {})}
    atomic_write_json(run / f"eval_{task}.json", results)
    return text, results


def cmd_eval(args: argparse.Namespace) -> int:
    from .errors import BenchConfigError

    try:
        text, _ = evaluate_run(args.run, args.task, args.data_dir, args.dataset, args.device,
                               getattr(args, "tta", "none"))
    except BenchConfigError as e:
        print(f"losskit eval: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0
