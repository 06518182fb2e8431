"""Tasks behind one interface: a second task plugs in and shares the runner, run folder,
resume, leaderboard and plots; the config's fields are the CLI's options."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losskit.core import registry
from losskit.bench.cli import config_from_args
from losskit.bench.config import BenchConfig, BenchConfigError, cli_fields, flag_of
from losskit.bench.objectives import default_objectives
from losskit.bench.protocol import diff_protocol
from losskit.bench.runner import run_bench
from losskit.bench.store import cell_path
from losskit.bench.tasks import TASKS, CellTrainer, Evaluation, Metric, Task, get_task, register_task
from losskit.cli import build_parser, main


class FakeCE(nn.Module):
    """Cross-entropy on logits (test double of a ``logits`` objective)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits, labels, sample_weight=None):
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


class ToyClassification(Task):
    """Linear classifier on the tiny split's training images; scored on the same images."""

    name = "toy-classification"
    objective_task = "logits"
    metrics = (Metric("error", "err", lower_is_better=True), Metric("nll", "NLL", percent=False,
                                                                      lower_is_better=True))
    primary = "error"
    leaderboard_note = "on the training images"

    def load_data(self, cfg):
        raise AssertionError("the tests pass the data")

    def describe_data(self, data) -> str:
        return f"{data.name}: {len(data.train_y)} images"

    def steps_per_epoch(self, cfg, data) -> int:
        return 2

    def setup(self, cfg, data, objective, hparams, seed, device) -> CellTrainer:
        x = data.train_x.flatten(1)
        y = data.train_y
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = nn.Linear(x.shape[1], int(y.max()) + 1)
        loss_fn = self.build_objective(objective.partition("[")[0], dict(hparams), seed)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        g = torch.Generator().manual_seed(seed)

        def step():
            idx = torch.randperm(len(y), generator=g)[: len(y) // 2]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.detach()

        return CellTrainer(step, 2, [model], model=model, info={"classes": int(y.max()) + 1})

    def evaluate(self, cfg, data, trainer, device) -> Evaluation:
        with torch.no_grad():
            logits = trainer.model(data.train_x.flatten(1))
        err = float((logits.argmax(1) != data.train_y).float().mean())
        return Evaluation({"error": err, "nll": float(F.cross_entropy(logits, data.train_y))})


@pytest.fixture
def toy():
    registry._load_all()
    registry.register("fake-ce", family="baseline", task="logits")(FakeCE)
    task = register_task(ToyClassification())
    try:
        yield task
    finally:
        registry._REGISTRY.pop("fake-ce", None)
        TASKS.pop(task.name, None)


def _toy_cfg(objectives, **kw):
    return BenchConfig(task="toy-classification", objectives=objectives, seeds=2, epochs=3, lr=0.5, device="cpu",
                       **kw)


def test_a_second_task_shares_runner_folder_resume_leaderboard_and_plots(tmp_path, tiny, toy):
    labels = ["fake-ce", "fake-ce[label_smoothing=0.9]"]
    out = tmp_path / "run"
    run = run_bench(_toy_cfg(labels), out, progress=False, log=lambda s: None, data=tiny)
    assert run.complete and not run.failed and len(run.computed) == 4
    proto = json.loads((out / "config.json").read_text())["protocol"]
    assert proto["task"] == "toy-classification" and proto["hparams"]["fake-ce"] == {"label_smoothing": 0.0}
    cell = json.loads(cell_path(out, "fake-ce", 1).read_text())
    assert set(cell["metrics"]) == {"error", "nll"} and cell["classes"] == 4 and "hist" not in cell
    assert len(cell["epoch_loss"]) == 3 and cell["steps"] == 6
    # the leaderboard: the task's columns and primary metric (lower is better: ascending)
    lines = run.leaderboard.splitlines()
    assert lines[0] == "losskit bench: toy-classification, 2 objectives x 2 seeds"
    assert lines[1].split()[3:5] == ["err", "%"] and "NLL" in lines[1] and "R@1" not in run.leaderboard
    res = json.loads((out / "results.json").read_text())
    errors = [r["metrics"]["error"]["mean"] for r in res["summary"]]
    nll = {r["objective"]: r["metrics"]["nll"]["mean"] for r in res["summary"]}
    assert errors == sorted(errors)
    assert nll["fake-ce[label_smoothing=0.9]"] > nll["fake-ce"]  # smoothing keeps the logits soft
    assert ("sorted by err; on the training images; err and NLL: lower is better.") in run.leaderboard
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["cost.png", "metrics.png", "training_curves.png"]
    # resume: nothing left; a cell removed is retrained identically
    before = cell_path(out, "fake-ce", 1).read_text()
    cell_path(out, "fake-ce", 1).unlink()
    run2 = run_bench(_toy_cfg(labels), out, resume=True, progress=False, plots=False, log=lambda s: None, data=tiny)
    assert run2.computed == [("fake-ce", 1)] and run2.complete
    again = json.loads(cell_path(out, "fake-ce", 1).read_text())
    assert again["epoch_loss"] == json.loads(before)["epoch_loss"] and again["metrics"] == json.loads(before)["metrics"]


def test_objectives_are_the_tasks_kind(toy):
    assert "fake-ce" in default_objectives(toy) and "softmax" not in default_objectives(toy)
    assert "fake-ce" not in default_objectives("embedding")
    with pytest.raises(BenchConfigError, match="'embedding' objective; the bench's 'toy-classification' task "
                                               "trains 'logits' objectives"):
        run_bench(_toy_cfg(["softmax"]), "unused", log=lambda s: None, data=object())


def test_protocol_names_a_task_change(tmp_path):
    a = {"task": "embedding", "epochs": 1}
    assert diff_protocol(a, {**a, "task": "other"}) == ["task: run has 'embedding', now 'other'"]
    # a run folder written before tasks existed has no "task": it was an embedding run
    assert diff_protocol({"epochs": 1}, a) == []
    assert diff_protocol({"epochs": 1}, {**a, "task": "other"}) == ["task: run has 'embedding', now 'other'"]


def test_unknown_task_is_clear(capsys, tmp_path):
    with pytest.raises(BenchConfigError, match="unknown task 'embeding'. Closest: embedding"):
        get_task("embeding")
    with pytest.raises(BenchConfigError, match="--task must be one of embedding(, [a-z-]+)*; got 'embeding'"):
        BenchConfig(task="embeding").validate()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--task", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_old_run_folder_without_task_resumes(tmp_path, tiny, fakes):
    # a run folder written before tasks existed: neither config.json nor the cells have "task"
    out = tmp_path / "old"
    cfg = dict(objectives=["fake-pair", "softmax"], seeds=1, epochs=1, embedding_dim=8, batch_size=8, device="cpu")
    run_bench(BenchConfig(**cfg), out, progress=False, plots=False, log=lambda s: None, data=tiny)
    for p in [out / "config.json", *(out / "cells").glob("*.json")]:
        d = json.loads(p.read_text())
        del d["protocol"]["task"]
        p.write_text(json.dumps(d))
    before = json.loads(cell_path(out, "softmax", 0).read_text())
    cell_path(out, "softmax", 0).unlink()
    run = run_bench(BenchConfig(**cfg), out, resume=True, progress=False, plots=False, log=lambda s: None, data=tiny)
    assert run.computed == [("softmax", 0)] and run.complete
    assert run.cells[-1]["epoch_loss"] == before["epoch_loss"] and run.cells[-1]["metrics"] == before["metrics"]
    # and from the command line (the saved config is the base), now with old and new cells mixed
    assert main(["bench", "--resume", str(out), "--no-progress", "--no-plots"]) == 0


# ---------------------------------------------------------------- options from the config's fields


def _value_for(f):
    """A non-default value for a CLI field, as (command-line text, expected config value)."""
    if f.name == "objectives":
        return "softmax, arcface[head=chunked]", ["softmax", "arcface[head=chunked]"]
    if f.name == "overrides":
        return "arcface.margin=0.4", {"arcface": {"margin": 0.4}}
    if isinstance(f.default, bool):  # --flag / --no-flag
        return None, not f.default
    choices = f.metadata.get("choices")
    choices = choices() if callable(choices) else choices
    if choices:
        return choices[-1], choices[-1]
    kind = f.metadata.get("type") or type(f.default)
    if kind is int:
        return "7", 7
    if kind is float:
        return "0.25", 0.25
    return "some-text", "some-text"


def test_every_config_field_is_one_option():
    parser = build_parser()
    bench = parser._subparsers._group_actions[0].choices["bench"]
    flags = {s for a in bench._actions for s in a.option_strings}
    run_control = {"-h", "--help", "--out", "--resume", "--no-plots", "--no-progress"}
    run_control |= {"--save-models"}
    negations = {"--no-" + flag_of(f)[2:] for f in cli_fields() if isinstance(f.default, bool)}
    assert flags - run_control == {flag_of(f) for f in cli_fields()} | negations
    assert {f.name for f in cli_fields()} == {f.name for f in dataclasses.fields(BenchConfig)} - {"ks", "fars",
                                                                                                     "hist_bins"}
    argv, expected = ["bench"], {}
    for f in cli_fields():
        text, value = _value_for(f)
        if text is None:
            argv.append(("--no-" + flag_of(f)[2:]) if f.default else flag_of(f))
        else:
            argv += [flag_of(f), text]
        expected[f.name] = value
    cfg, _, _ = config_from_args(parser.parse_args(argv))
    assert {k: getattr(cfg, k) for k in expected} == expected
    helps = {a.dest: a.help for a in bench._actions}
    assert helps["seeds"].endswith("(default: 3)") and helps["lr"].endswith("(default: 0.001)")


@pytest.mark.parametrize("field, value, message", [
    ("model", "resnet", "--model must be one of auto, mlp, cnn, cnn-large, conv4 or MODULE:FUNCTION; got 'resnet'"),
    ("model", "nosuchmodule_xyz:net", "--model 'nosuchmodule_xyz:net': cannot import module 'nosuchmodule_xyz' "
                                      "(ModuleNotFoundError: No module named 'nosuchmodule_xyz')"),
    ("augment", "flip", "--augment must be one of none, shift, affine; got 'flip'"),
    ("splits", 0, "--splits must be >= 1; got 0"),
    ("epochs", "3", "--epochs must be an integer; got '3'"),
    ("lr", "abc", "--lr must be a number; got 'abc'"),
    ("dataset", "mnist", "--dataset must be one of digits, folder, omniglot; got 'mnist'"),
    ("lr", 0.0, "--lr must be > 0; got 0.0"),
    ("lr", float("nan"), "--lr must be > 0; got nan"),
    ("weight_decay", -0.1, "--weight-decay must be >= 0; got -0.1"),
    ("batch_classes", -1, "--batch-classes must be >= 0; got -1"),
    ("threads", -1, "--threads must be >= 0; got -1"),
    ("epochs", 0, "--epochs must be >= 1; got 0"),
])
def test_validation_is_read_from_the_fields(field, value, message):
    with pytest.raises(BenchConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        BenchConfig(**{field: value}).validate()


def test_leaderboard_sorts_a_lower_is_better_primary_ascending_undefined_last():
    from losskit.bench.report import aggregate, format_leaderboard

    def cell(obj, err):
        return {"objective": obj, "seed": 0, "metrics": {"error": err, "nll": 1.0}, "train_time_s": 1.0,
                "eval_time_s": 0.1, "peak_memory_mb": 2.0, "memory_kind": "cpu_profiler_step", "epoch_loss": [1.0]}

    task = ToyClassification()
    rows = aggregate([cell("a", 0.5), cell("b", 0.2), cell("c", float("nan")), cell("d", 0.9)], list("abcd"), task)
    assert [r["objective"] for r in rows] == ["b", "a", "d", "c"]
    body = format_leaderboard(rows, task).splitlines()[2:6]
    assert [line.split()[1] for line in body] == ["b", "a", "d", "c"]
    assert body[0].split()[3:5] == ["20.0", "1"]  # err in percent, NLL with 3 significant digits
