"""A bench a reviewer can trust: baselines and paired significance in the leaderboard, class
splits, the held-out metric over training and the budget warning, validation before training
(exit 2, one line), the run-folder lock, file modes, data as users have it (corrupt files,
singleton classes), augmentation, user models and mixed precision."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from losskit.bench.config import BenchConfig, BenchConfigError
from losskit.bench.report import aggregate, budget_warnings, compare, format_leaderboard, paired, still_improving
from losskit.bench.runner import run_bench
from losskit.bench.store import RunLock, cell_path
from losskit.bench.tasks import get_task
from losskit.bench.tasks.embedding import RAW, UNTRAINED, affine
from losskit.cli import main
from bench_cfg import quiet, tiny_cfg


# ---------------------------------------------------------------- significance


def test_paired_interval_is_the_t_interval_of_the_differences():
    a = {"0/0": 0.90, "1/0": 0.80, "2/0": 0.85}
    b = {"0/0": 0.80, "1/0": 0.75, "2/0": 0.70}
    got = paired(a, b)
    d = np.array([0.10, 0.05, 0.15])
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)  # t(0.975, 2 dof), from a table
    assert got["n"] == 3 and math.isclose(got["mean"], d.mean())
    assert math.isclose(got["low"], d.mean() - half, rel_tol=1e-9) and math.isclose(got["high"], d.mean() + half)
    assert got["better"] == 0  # the interval [-0.024, 0.224] holds 0
    # consistent differences are significant; for a lower-is-better metric the sign flips
    b2 = {k: v - 0.1 + 0.001 * i for i, (k, v) in enumerate(a.items())}
    assert paired(a, b2)["better"] == 1 and paired(a, b2, lower_is_better=True)["better"] == -1
    # identical rows are within noise (a zero-width interval at 0), one pair is never tested
    assert paired(a, dict(a))["better"] == 0
    assert paired({"0/0": 1.0}, {"0/0": 0.0})["better"] == 0 and math.isnan(paired({"0/0": 1.0}, {"0/0": 0.0})["low"])
    # only shared, finite pairs count
    assert paired({"0/0": 1.0, "1/0": float("nan"), "2/0": 0.5}, {"0/0": 0.5, "2/0": 0.4, "3/0": 0.1})["n"] == 2


def _cell(obj, seed, r1, split=0, baseline=False):
    c = {"objective": obj, "seed": seed, "split": split, "metrics": {"recall@1": r1}}
    if baseline:
        c["baseline"] = True
    else:
        c.update(train_time_s=1.0, eval_time_s=0.1, peak_memory_mb=2.0, memory_kind="cpu_profiler_step",
                 epoch_loss=[1.0, 0.5])
    return c


def test_ranks_are_shared_within_noise_and_baselines_are_marked():
    g = np.random.default_rng(0)
    cells = []
    for s in range(5):
        shift = g.normal(0, 0.05)  # seed-to-seed variation shared by every objective (pairing removes it)
        cells += [_cell("a", s, 0.80 + shift + g.normal(0, 0.003)), _cell("b", s, 0.80 + shift + g.normal(0, 0.003)),
                  _cell("c", s, 0.70 + shift + g.normal(0, 0.003)), _cell(RAW, s, 0.75 + shift, baseline=True)]
    task = get_task("embedding")
    rows = aggregate(cells, ["a", "b", "c", RAW], task)
    compare(rows, task)
    ranks = {r["objective"]: r["rank"] for r in rows}
    assert ranks["a"] == ranks["b"] == 1 and ranks["c"] == 3 and ranks[RAW] is None
    text = format_leaderboard(rows, task)
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[2:6]] == ["1=", "1=", "base", "3"]
    assert "NOT better than (raw input) on R@1 within noise: c." in text
    assert "within noise of each other" in text and "over the 5 seeds" in text
    # the unpaired spread (std over seeds, about 5 points) is far larger than the paired one
    c_row = next(r for r in rows if r["objective"] == "c")
    assert c_row["vs_best"]["high"] < -0.09 and c_row["vs_best"]["better"] == -1


def test_budget_warning_names_objectives_still_improving():
    rising = {"objective": "a", "metric_epochs": [1, 2, 3, 4], "epoch_metric_mean": [0.5, 0.6, 0.7, 0.8]}
    flat = {"objective": "b", "metric_epochs": [1, 2, 3, 4], "epoch_metric_mean": [0.5, 0.8, 0.8, 0.801]}
    falling = {"objective": "c", "metric_epochs": [1, 2, 3, 4], "epoch_metric_mean": [0.9, 0.8, 0.7, 0.6]}
    assert still_improving(rising, False) == pytest.approx((0.1, 3, 4))
    assert still_improving(flat, False) is None and still_improving(falling, False) is None
    assert still_improving(falling, True) == pytest.approx((0.1, 3, 4)) and still_improving(rising, True) is None
    assert still_improving({"metric_epochs": [1, 2], "epoch_metric_mean": [0.1, 0.9]}, False) is None  # too short

    class Run:
        task = get_task("embedding")

    (line,) = budget_warnings(Run(), [rising, flat, falling])
    assert line.startswith("BUDGET: the held-out R@1 was still improving") and "1 of 3 objectives (a +10.0 points)" in line


# ---------------------------------------------------------------- baselines, curves, splits


def test_baselines_curves_and_the_leaderboard_of_a_run(tmp_path, tiny, fakes):
    out = tmp_path / "run"
    run = run_bench(tiny_cfg(["fake-pair", "softmax"], epochs=3), out, progress=False, plots=False, log=quiet, data=tiny)
    assert run.complete and len(run.computed) == 4  # baselines are not cells
    names = sorted({c["objective"] for c in run.baseline_cells})
    assert names == sorted([RAW, UNTRAINED]) and len(run.baseline_cells) == 4
    raw = [c for c in run.baseline_cells if c["objective"] == RAW]
    assert raw[0]["metrics"] == raw[1]["metrics"]  # the raw input does not depend on the seed
    res = json.loads((out / "results.json").read_text())
    assert sorted(r["objective"] for r in res["baselines"]) == names and len(res["summary"]) == 2
    assert {"rank", "vs_best", "vs_baselines"} <= set(res["summary"][0])
    assert [line.split()[0] for line in run.leaderboard.splitlines()[3:7]].count("base") == 2
    cell = json.loads(cell_path(out, "fake-pair", 0).read_text())
    assert [e for e, _ in cell["epoch_metric"]] == [1, 2, 3] and cell["tracked_metric"] == "recall@1"
    assert all(0 <= v <= 1 for _, v in cell["epoch_metric"])
    # tracking never changes the training: the same cell without it has the same losses and metrics
    run2 = run_bench(tiny_cfg(["fake-pair"], epochs=3, seeds=1, track_every=0, baselines=False), tmp_path / "b",
                     progress=False, plots=False, log=quiet, data=tiny)
    assert run2.cells[0]["epoch_loss"] == cell["epoch_loss"] and run2.cells[0]["metrics"] == cell["metrics"]
    assert "epoch_metric" not in run2.cells[0] and run2.baseline_cells == []


def test_class_splits_are_seeded_saved_and_compared(tmp_path, fakes):
    task = get_task("embedding")
    base = BenchConfig(device="cpu")
    assert task.load_split(base, 0).train_classes == ["0", "1", "2", "3", "4"]  # split seed 0: the documented split
    one = task.load_split(BenchConfig(split_seed=1), 0)
    assert one.train_classes != ["0", "1", "2", "3", "4"] and len(one.train_classes) == 5
    assert task.load_split(base, 1).train_classes == one.train_classes  # split s has seed split_seed + s
    out = tmp_path / "run"
    cfg = tiny_cfg(["fake-pair"], seeds=1, epochs=1, splits=2, batch_size=40, embedding_dim=8)
    run = run_bench(cfg, out, progress=False, plots=False, log=quiet)
    assert run.complete and run.computed == [("fake-pair", 0), ("fake-pair", 0, 1)]
    saved = [json.loads((out / "splits" / f"split{s}.json").read_text()) for s in (0, 1)]
    assert saved[0]["test_classes"] == ["5", "6", "7", "8", "9"] and saved[1]["test_classes"] == one.test_classes
    assert saved[1]["split_seed"] == 1
    assert cell_path(out, "fake-pair", 0, 1).name == "fake-pair__split1__seed0.json" and cell_path(out, "fake-pair",
                                                                                                     0, 1).exists()
    assert "x 2 class splits" in run.leaderboard.splitlines()[0] and " runs " in run.leaderboard.splitlines()[1]
    # resume knows the splits: remove split 1's cell, only it is retrained
    cell_path(out, "fake-pair", 0, 1).unlink()
    again = run_bench(cfg, out, resume=True, progress=False, plots=False, log=quiet)
    assert again.computed == [("fake-pair", 0, 1)] and again.complete


def test_a_run_folder_from_before_these_options_resumes(tmp_path, tiny, fakes):
    from losskit.bench.protocol import ADDED_FIELDS

    out = tmp_path / "old"
    cfg = dict(objectives=["fake-pair"], seeds=2, epochs=1, embedding_dim=8, batch_size=8, device="cpu")
    run_bench(BenchConfig(**cfg), out, progress=False, plots=False, log=quiet, data=tiny)
    for p in [out / "config.json", *(out / "cells").glob("*.json")]:
        d = json.loads(p.read_text())
        for k in ADDED_FIELDS:
            d["protocol"].pop(k, None)
        d.pop("split", None)
        p.write_text(json.dumps(d))
    cell_path(out, "fake-pair", 1).unlink()
    run = run_bench(BenchConfig(**cfg), out, resume=True, progress=False, plots=True, log=quiet, data=tiny)
    assert run.computed == [("fake-pair", 1)] and run.complete


# ---------------------------------------------------------------- validation before training, lock, modes


def _one_line_error(capsys, argv, *expect):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("losskit bench: error: "), err
    for e in expect:
        assert e in err[0], err[0]
    return err[0]


def test_user_errors_are_one_line_and_exit_2_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["bench", "--out", str(out), "--no-progress", "--no-plots", "--seeds", "1", "--epochs", "1"]
    _one_line_error(capsys, [*base, "--objectives", "arcface", "--set", "arcface.margin=abc"],
                    "objective 'arcface' with margin='abc'", "margin: expected a real number")
    _one_line_error(capsys, [*base, "--objectives", "softmax,arcface[margin=abc]"], "objective 'arcface[margin=abc]'")
    _one_line_error(capsys, [*base, "--batch-classes", "100"], "--batch-classes 100", "exceeds the 5 classes")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(capsys, ["bench", "--out", str(blocker / "run"), "--no-progress"], "cannot create the run folder")
    assert not out.exists()  # nothing was trained or written


def test_a_second_bench_into_the_same_folder_is_refused(tmp_path, tiny, fakes):
    out = tmp_path / "run"
    out.mkdir()
    held = RunLock(out).acquire()
    try:
        with pytest.raises(BenchConfigError, match=r"another bench \(pid \d+\) is writing into this run folder"):
            run_bench(tiny_cfg(["fake-pair"], seeds=1, epochs=1), out, progress=False, plots=False, log=quiet, data=tiny)
        assert not (out / "config.json").exists()
    finally:
        held.release()
    # a lock left by a process that is gone is taken over
    (out / ".lock").write_text(f"{2**22 + 12345} {os.uname().nodename}\n")
    run = run_bench(tiny_cfg(["fake-pair"], seeds=1, epochs=1), out, progress=False, plots=False, log=quiet, data=tiny)
    assert run.complete and not (out / ".lock").exists()
    # and a finished run folder is refused without --resume
    with pytest.raises(BenchConfigError, match="already holds a bench run"):
        run_bench(tiny_cfg(["fake-pair"], seeds=1, epochs=1), out, progress=False, plots=False, log=quiet, data=tiny)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert modes["results.json"] == modes["cells.csv"] == modes["config.json"] == modes["leaderboard.txt"]
    assert modes["results.json"] & 0o044  # readable by others like the CSVs (umask permitting)


# ---------------------------------------------------------------- data as users have it


def _image_folder(root, classes=6, per_class=4, corrupt=(), singleton=None):
    from PIL import Image

    g = np.random.default_rng(0)
    for c in range(classes):
        base = g.integers(0, 255, (12, 12))
        for i in range(per_class):
            img = np.clip(base + g.normal(0, 20, (12, 12)), 0, 255).astype(np.uint8)
            (root / f"person{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / f"person{c}" / f"{i}.png")
    for rel in corrupt:
        (root / rel).write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    if singleton:
        (root / singleton).mkdir()
        Image.fromarray(g.integers(0, 255, (12, 12)).astype(np.uint8)).save(root / singleton / "0.png")
    return root


def test_faces_style_folder_corrupt_files_singletons_and_undefined_metrics(tmp_path, capsys):
    root = _image_folder(tmp_path / "faces", classes=10, corrupt=["person0/bad.jpg", "person3/worse.jpg"], singleton="loner")
    base = ["bench", "--dataset", "folder", "--data-dir", str(root), "--image-size", "12", "--objectives",
            "contrastive", "--seeds", "1", "--epochs", "1", "--no-progress", "--no-plots", "--batch-size", "8"]
    # every unreadable file is listed, and nothing is written
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "2 image files could not be read" in err and "bad.jpg" in err and "worse.jpg" in err
    assert "--skip-bad-images" in err and not (tmp_path / "a").exists()
    # skipped: the run goes on; the skipped files and the lone class are warned about and saved
    assert main([*base, "--out", str(tmp_path / "b"), "--skip-bad-images", "--split-seed", "3"]) == 0
    captured = capsys.readouterr()
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    joined = " ".join(cfg["warnings"])
    assert "2 unreadable image files left out" in joined and "bad.jpg" in joined
    assert cfg["data_name"] == "folder faces"
    assert "WARNING (data)" in captured.out
    # a cap that leaves no held-out class with two images makes retrieval undefined: an error saying why
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "c"), "--skip-bad-images", "--max-per-class", "1"],
                    "no held-out class has 2 or more images", "--max-per-class 1")


def test_singleton_and_small_training_classes_leave_the_sampler(tiny):
    task = get_task("embedding")
    data = tiny
    keep = torch.ones(len(data.train_y), dtype=torch.bool)
    keep[(data.train_y == 2).nonzero().flatten()[1:]] = False  # class 2 keeps one image
    data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
    cfg = BenchConfig(batch_classes=3, batch_samples=4, device="cpu")
    (warning,) = task.check_data(cfg, data)
    assert "1 training class below K=4 images (1 with one image or none) left out" in warning and "2 (1)" in warning
    sampler = task._sampler(data.train_y, 3, 4, 0)
    drawn = np.concatenate([sampler.batch() for _ in range(30)])
    assert 2 not in set(data.train_y[torch.from_numpy(drawn)].tolist())
    assert set(data.train_y[torch.from_numpy(drawn)].tolist()) == {0, 1, 3}
    with pytest.raises(BenchConfigError, match="only 3 training classes have K=4 or more images"):
        task._sampler(data.train_y, 4, 4, 0)


# ---------------------------------------------------------------- augmentation, models, precision


def test_affine_augmentation_is_seeded_and_keeps_the_images():
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 8:20, 12:16] = 1.0
    a = affine(x, torch.Generator().manual_seed(0))
    b = affine(x, torch.Generator().manual_seed(0))
    c = affine(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    moved = (a - x).abs().flatten(1).sum(1)
    assert int((moved > 1e-6).sum()) >= 12  # most images are distorted (each of 4 parts has p = 0.5)
    # mass is roughly kept (scale 0.8-1.2 and shear change it a little, nothing is lost at the border)
    ratio = a.flatten(1).sum(1) / x.flatten(1).sum(1)
    assert float(ratio.min()) > 0.5 and float(ratio.max()) < 1.7
    # params override some of the paper's values: p = 0 leaves every image as it is (the identity grid
    # resamples exactly), p = 1 distorts every one; an unknown key is an error that lists the known ones
    torch.testing.assert_close(affine(x, torch.Generator().manual_seed(0), {"p": 0.0}), x, rtol=0, atol=1e-6)
    every = affine(x, torch.Generator().manual_seed(0), {"p": 1.0})
    assert int(((every - x).abs().flatten(1).sum(1) > 1e-6).sum()) == 16
    with pytest.raises(ValueError, match=r"params: unknown keys \['rotate'\]; expected some of \['p', 'rotate_deg'"):
        affine(x, torch.Generator(), {"rotate": 5.0})


def test_a_users_model_and_bf16_train_in_the_bench(tmp_path, tiny, fakes, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "def tiny_net(input_shape, embedding_dim):\n"
        "    c, h, w = input_shape\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, embedding_dim))\n"
        "def not_a_module(input_shape, embedding_dim):\n"
        "    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = run_bench(tiny_cfg(["fake-pair"], seeds=1, epochs=1, model="mynets:tiny_net", amp="bf16"), tmp_path / "r",
                    progress=False, plots=False, log=quiet, data=tiny)
    assert run.complete and run.cells[0]["model"] == "mynets:tiny_net"
    assert math.isfinite(run.cells[0]["metrics"]["recall@1"])
    with pytest.raises(BenchConfigError, match="returned int, expected an nn.Module"):
        run_bench(tiny_cfg(["fake-pair"], seeds=1, epochs=1, model="mynets:not_a_module"), tmp_path / "s",
                  progress=False, plots=False, log=quiet, data=tiny)
    with pytest.raises(BenchConfigError, match="module 'mynets' has no 'nothing'"):
        BenchConfig(model="mynets:nothing").validate()
    with pytest.raises(BenchConfigError, match="--amp fp16 needs CUDA"):
        BenchConfig(amp="fp16", device="cpu").validate()


# ---------------------------------------------------------------- saved models, losskit eval, one-shot

OMNIGLOT = os.environ.get("LOSSKIT_OMNIGLOT", "/work/shared/datasets/omniglot")


def test_saved_models_are_rebuilt_by_losskit_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bench", "--objectives", "softmax,contrastive", "--seeds", "1", "--epochs", "1", "--out", str(out),
                 "--no-progress", "--no-plots", "--save-models"]) == 0
    saved = sorted(p.name for p in (out / "models").iterdir())
    assert saved == ["contrastive__seed0.pt", "softmax__seed0.pt"]
    capsys.readouterr()
    assert main(["eval", str(out), "--task", "embedding", "--dataset", "digits"]) == 0
    text = capsys.readouterr().out
    res = json.loads((out / "eval_embedding.json").read_text())
    cells = {r["objective"]: r["cells"][0] for r in res["rows"]}
    # the rebuilt networks give back exactly what the bench measured on the same held-out digits
    for name in ("softmax", "contrastive"):
        cell = json.loads(cell_path(out, name, 0).read_text())
        assert cells[name]["recall@1"] == pytest.approx(cell["metrics"]["recall@1"], abs=1e-12)
    assert "R@1 %" in text
    # a run without saved networks, or a one-shot evaluation without its data, is a one-line error
    bare = tmp_path / "bare"
    assert main(["bench", "--objectives", "softmax", "--seeds", "1", "--epochs", "1", "--out", str(bare),
                 "--no-progress", "--no-plots"]) == 0
    capsys.readouterr()
    assert main(["eval", str(bare), "--task", "embedding"]) == 2
    assert "run the bench with --save-models" in capsys.readouterr().err
    assert main(["eval", str(out), "--task", "oneshot"]) == 2
    assert "--task oneshot needs --data-dir" in capsys.readouterr().err
    assert main(["eval", str(out), "--task", "embedding", "--tta", "shift"]) == 2
    assert "--tta shift is for --task oneshot; got --task embedding" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists(os.path.join(OMNIGLOT, "all_runs.zip")), reason="Omniglot zips not present")
def test_omniglot_one_shot_in_the_bench_and_in_eval(tmp_path, capsys):
    from losskit.data.omniglot import PUBLISHED_ONESHOT, load_oneshot_runs, oneshot_error

    runs = load_oneshot_runs(OMNIGLOT, 12)
    assert len(runs) == 20 and all(r.train_x.shape == (20, 1, 12, 12) and r.test_x.shape == (20, 1, 12, 12)
                                   for r in runs)
    assert all(sorted(r.test_y.tolist()) == list(range(20)) for r in runs)  # each class tested once
    # a test image against its own training image is found; shuffled embeddings are at chance level
    perfect = [type(r)(r.name, r.test_x[torch.argsort(r.test_y)], r.test_x, r.test_y) for r in runs]
    assert oneshot_error(lambda x: x.flatten(1), perfect)["oneshot_error"] == 0.0
    out = tmp_path / "run"
    argv = ["bench", "--dataset", "omniglot", "--data-dir", OMNIGLOT, "--oneshot", "--image-size", "12",
            "--max-per-class", "4", "--model", "mlp", "--objectives", "softmax", "--seeds", "1", "--epochs", "1",
            "--out", str(out), "--no-progress", "--no-plots", "--save-models"]
    assert main(argv) == 0
    board = capsys.readouterr().out
    assert "1-shot err %" in board
    cell = json.loads(cell_path(out, "softmax", 0).read_text())
    assert 0 <= cell["metrics"]["oneshot_error"] <= 1
    assert main(["eval", str(out), "--task", "oneshot"]) == 0  # --data-dir: the run's
    text = capsys.readouterr().out
    got = json.loads((out / "eval_oneshot.json").read_text())["rows"][0]["cells"][0]["oneshot_error"]
    assert got == pytest.approx(cell["metrics"]["oneshot_error"], abs=1e-12)
    assert f"Siamese convnet (Koch et al. 2015) {100 * PUBLISHED_ONESHOT['Siamese convnet (Koch et al. 2015)']:.1f}%" \
        in text
    # --tta shift: a second column, each network's error with the 9 shifted views, as oneshot_error computes it
    assert main(["eval", str(out), "--task", "oneshot", "--tta", "shift"]) == 0
    text = capsys.readouterr().out
    assert "shift-TTA error %" in text and "the published figures are without it" in text
    row = json.loads((out / "eval_oneshot.json").read_text())["rows"][0]
    assert row["cells"][0]["oneshot_error"] == pytest.approx(got, abs=1e-12)
    assert 0 <= row["cells"][0]["oneshot_error_shift"] <= 1 and row["mean_shift"] == row["cells"][0]["oneshot_error_shift"]
