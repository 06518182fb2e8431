"""The bench's classification task: closed-set data with noise and imbalance,
every default objective kind trains, the metrics, resume, the embedding
task's linear probes."""

from __future__ import annotations

import json

import pytest
import torch

from losskit.bench import BenchConfig, run_bench
from losskit.bench.errors import BenchConfigError
from losskit.bench.objectives import default_objectives
from losskit.bench.tasks.classification import closed_set, corrupt_labels, imbalance_indices


def test_closed_set_split_noise_and_imbalance(make_split):
    split = make_split(n_train_classes=3, n_test_classes=2, per_class=20)
    d = closed_set(split, 0.25)
    assert d.num_classes == 5 and len(d.test_y) == 25 and len(d.train_y) == 75
    assert torch.equal(torch.bincount(d.test_y), torch.full((5,), 5))
    assert torch.equal(d.train_y, d.clean_train_y)
    noisy = closed_set(split, 0.25, label_noise=0.4)
    flipped = noisy.train_y != noisy.clean_train_y
    assert int(flipped.sum()) == 30 and torch.equal(noisy.test_y, d.test_y)
    pair = closed_set(split, 0.25, label_noise=0.4, noise="pair")
    f = pair.train_y != pair.clean_train_y
    assert torch.equal(pair.train_y[f], (pair.clean_train_y[f] + 1) % 5)
    imb = closed_set(split, 0.25, imbalance=15.0)
    counts = torch.bincount(imb.clean_train_y, minlength=5)
    assert counts[0] == 15 and counts[-1] == 1 and (counts.diff() <= 0).all()
    assert torch.equal(torch.bincount(imb.test_y), torch.full((5,), 5))    # the test set stays balanced
    # the same draws every time
    assert torch.equal(closed_set(split, 0.25, label_noise=0.4).train_y, noisy.train_y)
    with pytest.raises(BenchConfigError, match="test-fraction"):
        closed_set(split, 0.01)


def test_noise_helpers():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(1000) % 10
    out = corrupt_labels(y, 0.2, "symmetric", 10, g)
    assert int((out != y).sum()) == 200
    assert len(imbalance_indices(y, 1.0, 10, g)) == 1000


def test_default_objectives():
    names = default_objectives("classification")
    assert names[0] == "cross-entropy"
    for n in ("sum-exponential", "gce", "mae", "adversarial-comp-sum", "reweighted",
              "reweighted[weighter=quadratic]", "reweighted[weighter=extremes]", "reweighted[weighter=glow]"):
        assert n in names
    assert "comp-sum" in names          # at its default tau = 1: cross-entropy's numbers again


def test_runs_every_kind_of_objective_and_resumes(tmp_path, make_split):
    split = make_split(n_train_classes=3, n_test_classes=2, per_class=12, side=8)
    data = closed_set(split, 0.25, label_noise=0.2)
    objs = ["cross-entropy", "comp-sum[tau=1.5]", "adversarial-comp-sum[steps=2]", "reweighted[weighter=glow]",
            "reweighted"]
    cfg = BenchConfig(task="classification", objectives=objs, seeds=1, epochs=3, batch_size=16, device="cpu",
                      pgd_steps=2, label_noise=0.2)
    run = run_bench(cfg, tmp_path / "run", progress=False, plots=False, log=lambda m: None, data=data)
    assert len(run.cells) == len(objs)
    for c in run.cells:
        m = c["metrics"]
        assert set(m) == {"accuracy", "macro-f1", "nll", "ece", "robust-accuracy"}, m
        assert 0 <= m["robust-accuracy"] <= 1 and m["nll"] > 0
        assert set(c["train_fit"]) == {"noisy_labels", "clean_labels"}
    rw = next(c for c in run.cells if c["objective"] == "reweighted")
    assert rw["burn_in"] == int(0.1 * 3 * 3)              # 10% of the cell's 9 steps
    board = (tmp_path / "run" / "leaderboard.txt").read_text()
    assert "robust acc" in board and "label noise" in board
    proto = json.loads((tmp_path / "run" / "config.json").read_text())["protocol"]
    assert proto["task"] == "classification" and proto["label_noise"] == 0.2
    again = run_bench(cfg, tmp_path / "run", resume=True, progress=False, plots=False, log=lambda m: None, data=data)
    assert len(again.cells) == len(objs)
    with pytest.raises(BenchConfigError, match="burn_in"):
        run_bench(BenchConfig(task="classification", objectives=["reweighted"], overrides={"reweighted": {"burn_in": 3}},
                              device="cpu"), tmp_path / "other", progress=False, plots=False, log=lambda m: None,
                  data=data)


def test_bad_options_are_refused(tmp_path):
    for kw, msg in (({"test_fraction": 1.0}, "test-fraction"), ({"label_noise": 1.0}, "label-noise"),
                    ({"imbalance": 0.5}, "imbalance"), ({"noise": "asym"}, "noise")):
        with pytest.raises(BenchConfigError, match=msg):
            BenchConfig(task="classification", **kw).validate()
    with pytest.raises(BenchConfigError, match="'embedding' objective"):
        run_bench(BenchConfig(task="classification", objectives=["arcface"], device="cpu"), tmp_path / "x",
                  progress=False, plots=False, log=lambda m: None)


def test_embedding_task_reports_the_linear_probes(tmp_path, fakes, tiny):
    split = tiny
    cfg = BenchConfig(objectives=["fake-pair"], seeds=1, epochs=1, device="cpu", embedding_dim=8)
    run = run_bench(cfg, tmp_path / "emb", progress=False, plots=False, log=lambda m: None, data=split)
    m = run.cells[0]["metrics"]
    for k in ("logistic@1", "naive-bayes@1", "logistic@5", "naive-bayes@5", "logistic@all", "naive-bayes@all"):
        assert 0 <= m[k] <= 1, k


def _cls_run(tmp_path, name, data, objectives=("cross-entropy",), **kw):
    from bench_cfg import quiet, tiny_cfg
    from losskit.bench.store import cell_path

    cfg = tiny_cfg(list(objectives), task="classification", seeds=1, epochs=3, batch_size=16, pgd_radius=0.0, **kw)
    out = tmp_path / name
    run = run_bench(cfg, out, progress=False, plots=False, log=quiet, data=data)
    assert run.complete and not run.failed, run.failed
    return out, {o: json.loads(cell_path(out, o, 0).read_text()) for o in objectives}


def test_classification_trains_on_the_optimiser_axis(tmp_path, make_split):
    data = closed_set(make_split(n_train_classes=3, n_test_classes=2, per_class=12, side=8), 0.25)
    losses = {}
    for opt in ("adam", "sgd", "frugal"):
        out, cells = _cls_run(tmp_path, opt, data, ("cross-entropy", "reweighted"), optimizer=opt,
                              schedule="linear-decay", lr=1e-2)
        for c in cells.values():
            assert c["optimizer"] == opt and c["schedule"] == "linear-decay"
            assert len(c["grad_norms_l1"]) == c["steps"] == len(c["grad_norms_l2"]) == 9
        assert cells["reweighted"]["burn_in"] == 0      # the task's own info survives beside the axis'
        protocol = json.loads((out / "config.json").read_text())["protocol"]
        assert protocol["optimizer"] == opt and protocol["schedule"] == "linear-decay"
        losses[opt] = cells["cross-entropy"]["epoch_loss"]
    assert losses["adam"] != losses["sgd"] != losses["frugal"] != losses["adam"], "the optimiser changes training"
    _, const = _cls_run(tmp_path, "const", data, lr=1e-2)
    assert const["cross-entropy"]["schedule"] == "constant" and "grad_norms_l1" not in const["cross-entropy"]
    assert const["cross-entropy"]["epoch_loss"] != losses["adam"], "the schedule changes training"
    _, refined = _cls_run(tmp_path, "refined", data, schedule="refined", refine_from=str(tmp_path / "adam"),
                          lr=1e-2)
    assert refined["cross-entropy"]["schedule"] == "refined"
    assert refined["cross-entropy"]["epoch_loss"] != losses["adam"]


def test_classification_applies_each_augmentation(tmp_path, make_split):
    data = closed_set(make_split(n_train_classes=3, n_test_classes=2, per_class=12, side=8), 0.25)
    loss = {a: _cls_run(tmp_path, a, data, augment=a)[1]["cross-entropy"]["epoch_loss"]
            for a in ("none", "shift", "affine")}
    assert len({tuple(v) for v in loss.values()}) == 3, loss
