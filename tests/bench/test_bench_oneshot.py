"""Omniglot one-shot options of the bench: the prototypical networks' conv4 encoder
(``--model conv4``), rotations as new classes (``--rotation-classes``) and training on every
background class with the one-shot runs held out (``--train-on all``).  Synthetic data only."""

from __future__ import annotations

import io
import os
import json
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from losskit.bench.config import BenchConfig, BenchConfigError
from losskit.bench.model import Conv4Embedder, build_model
from losskit.bench.store import cell_path
from losskit.cli import main
from losskit.data.omniglot import OneShotRun, load_oneshot_runs, train_on_background
from losskit.data.split import OpenSetSplit, with_rotation_classes


# ---------------------------------------------------------------- conv4


def test_conv4_is_four_protonet_blocks_then_a_linear_embedding():
    net = Conv4Embedder(1, (28, 28), embedding_dim=32)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == \
        [(1, 64, (3, 3), (1, 1))] + [(64, 64, (3, 3), (1, 1))] * 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 4
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 4
    x = torch.rand(5, 1, 28, 28)
    assert net.features(x).shape == (5, 64)  # 28 -> 14 -> 7 -> 3 -> 1: the protonets' 64-d embedding
    assert net(x).shape == (5, 32)
    assert Conv4Embedder(1, (32, 32), 16).head.in_features == 64 * 2 * 2


def test_conv4_from_the_bench_is_seeded_and_refuses_small_images():
    a = build_model("conv4", (1, 28, 28), 64, seed=3)
    b = build_model("conv4", (1, 28, 28), 64, seed=3)
    c = build_model("conv4", (1, 28, 28), 64, seed=4)
    assert isinstance(a, Conv4Embedder)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head.weight, c.head.weight)
    with pytest.raises(ValueError, match="needs at least 16x16 pixels; got 12x12"):
        build_model("conv4", (1, 12, 12), 64, seed=0)


# ---------------------------------------------------------------- rotations as new classes


def _split(n_classes=3, per_class=2, hw=5, seed=0) -> OpenSetSplit:
    g = torch.Generator().manual_seed(seed)
    tx = torch.rand(n_classes * per_class, 1, hw, hw, generator=g)
    ty = torch.arange(n_classes).repeat_interleave(per_class)
    vx = torch.rand(4, 1, hw, hw, generator=g)
    vy = torch.tensor([0, 0, 1, 1])
    return OpenSetSplit("synthetic", tx, ty, vx, vy, [f"a/c{i}" for i in range(n_classes)], ["b/c0", "b/c1"])


def _rot90_ccw(img: np.ndarray) -> np.ndarray:
    """Naive counter-clockwise quarter turn of an [H, W] array: out[i, j] = img[j, W - 1 - i]."""
    h, w = img.shape
    out = np.empty((w, h), dtype=img.dtype)
    for i in range(w):
        for j in range(h):
            out[i, j] = img[j, w - 1 - i]
    return out


def test_rotation_classes_add_three_rotated_copies_of_every_training_class():
    s = _split()
    r = with_rotation_classes(s)
    c = len(s.train_classes)
    assert len(r.train_classes) == 4 * c and r.train_x.shape[0] == 4 * s.train_x.shape[0]
    assert r.train_classes[:c] == s.train_classes
    assert r.train_classes[c:2 * c] == [f"{n} rot90" for n in s.train_classes]
    assert r.train_classes[3 * c] == "a/c0 rot270"
    n = s.train_x.shape[0]
    for i in range(n):
        img = s.train_x[i, 0].numpy()
        want = img
        for k in range(4):
            np.testing.assert_array_equal(r.train_x[i + k * n, 0].numpy(), want)
            assert int(r.train_y[i + k * n]) == int(s.train_y[i]) + k * c
            want = _rot90_ccw(want)
    # the held-out images are untouched
    assert torch.equal(r.test_x, s.test_x) and torch.equal(r.test_y, s.test_y)
    assert r.test_classes == s.test_classes


# ---------------------------------------------------------------- every background class trains


def _runs(n_runs=2, ways=3, hw=5) -> list[OneShotRun]:
    g = torch.Generator().manual_seed(7)
    runs = []
    for r in range(n_runs):
        train_x = torch.rand(ways, 1, hw, hw, generator=g)
        order = torch.randperm(ways, generator=g)
        runs.append(OneShotRun(f"run{r + 1:02d}", train_x, train_x[order] + 0.01, order))
    return runs


def test_train_on_background_pools_the_classes_and_holds_out_the_runs():
    s, runs = _split(), _runs()
    d = train_on_background(s, runs)
    assert d.train_classes == s.train_classes + s.test_classes
    assert torch.equal(d.train_x, torch.cat([s.train_x, s.test_x]))
    assert torch.equal(d.train_y, torch.cat([s.train_y, s.test_y + len(s.train_classes)]))
    assert d.test_classes == ["run01/class01", "run01/class02", "run01/class03",
                              "run02/class01", "run02/class02", "run02/class03"]
    assert d.test_x.shape[0] == 12
    # every test image shares its class with exactly its own run's training image
    for j, r in enumerate(runs):
        for q in range(3):
            label = int(d.test_y[6 * j + 3 + q])
            train_rows = (d.test_y == label).nonzero().flatten().tolist()
            assert len(train_rows) == 2
            assert torch.equal(d.test_x[train_rows[0]], r.train_x[int(r.test_y[q])])


# ---------------------------------------------------------------- validation and the CLI flow


def test_train_on_all_is_validated_before_training():
    with pytest.raises(BenchConfigError, match="--train-on all .* needs --dataset omniglot --oneshot"):
        BenchConfig(train_on="all").validate()
    with pytest.raises(BenchConfigError, match="needs --dataset omniglot --oneshot; got --dataset omniglot$"):
        BenchConfig(train_on="all", dataset="omniglot", data_dir="x").validate()
    with pytest.raises(BenchConfigError, match="no class split to repeat or seed; got --splits 2"):
        BenchConfig(train_on="all", dataset="omniglot", data_dir="x", oneshot=True, splits=2).validate()
    with pytest.raises(BenchConfigError, match="--train-on must be one of split, all"):
        BenchConfig(train_on="both").validate()


def _png(rng: np.random.Generator, hw=20) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((rng.random((hw, hw)) > 0.8).astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _fake_omniglot(root):
    """Two background splits (3 characters of 4 drawings each; one shared) and 2 one-shot runs of 3 ways."""
    rng = np.random.default_rng(0)
    root.mkdir()
    layout = {"images_background_small1": ["A/character01", "A/character02", "S/character01"],
              "images_background_small2": ["B/character01", "B/character02", "S/character01"]}
    shared = [_png(rng) for _ in range(4)]
    for split, chars in layout.items():
        with zipfile.ZipFile(root / f"{split}.zip", "w") as zf:
            for c in chars:
                for i in range(4):
                    zf.writestr(f"{split}/{c}/{i:04d}_{i:02d}.png", shared[i] if c.startswith("S/") else _png(rng))
    with zipfile.ZipFile(root / "all_runs.zip", "w") as zf:
        for r in (1, 2):
            lines = []
            for k in range(1, 4):
                zf.writestr(f"run{r:02d}/training/class{k:02d}.png", _png(rng))
                zf.writestr(f"run{r:02d}/test/item{k:02d}.png", _png(rng))
                lines.append(f"run{r:02d}/test/item{k:02d}.png run{r:02d}/training/class{4 - k:02d}.png")
            zf.writestr(f"run{r:02d}/class_labels.txt", "\n".join(lines) + "\n")
    return root


def test_oneshot_flow_with_conv4_rotations_and_every_background_class(tmp_path, capsys):
    root = _fake_omniglot(tmp_path / "omni")
    runs = load_oneshot_runs(root, 16)
    assert [r.test_y.tolist() for r in runs] == [[2, 1, 0], [2, 1, 0]]
    out = tmp_path / "run"
    argv = ["bench", "--dataset", "omniglot", "--data-dir", str(root), "--oneshot", "--train-on", "all",
            "--rotation-classes", "--model", "conv4", "--image-size", "16", "--augment", "affine",
            "--objectives", "multi-similarity", "--seeds", "1", "--epochs", "1", "--batch-classes", "4",
            "--batch-samples", "2", "--out", str(out), "--no-progress", "--no-plots", "--save-models"]
    assert main(argv) == 0
    got = capsys.readouterr()
    text = got.out + got.err
    # 5 distinct background characters (the shared one read once) x 4 rotations; held out: 2 runs x 3 classes
    assert "20 train classes (80 images), 6 held-out test classes (12 images)" in text
    assert "1-shot err %" in text
    cell = json.loads(cell_path(out, "multi-similarity", 0).read_text())
    assert cell["model"] == "conv4" and cell["batch"] == {"P": 4, "K": 2}
    assert 0 <= cell["metrics"]["oneshot_error"] <= 1
    config = json.loads((out / "config.json").read_text())
    assert config["protocol"]["train_on"] == "all" and config["protocol"]["rotation_classes"] is True
    assert main(["eval", str(out), "--task", "oneshot"]) == 0
    got = json.loads((out / "eval_oneshot.json").read_text())["rows"][0]["cells"][0]["oneshot_error"]
    assert got == pytest.approx(cell["metrics"]["oneshot_error"], abs=1e-12)


# ---------------------------------------------------------------- the real data (slow)

OMNIGLOT = os.environ.get("LOSSKIT_OMNIGLOT", "/work/shared/datasets/omniglot")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(OMNIGLOT, "all_runs.zip")), reason="Omniglot zips not present")
def test_real_omniglot_every_background_class_and_the_runs_held_out():
    from losskit.bench.tasks import get_task

    cfg = BenchConfig(dataset="omniglot", data_dir=OMNIGLOT, oneshot=True, train_on="all", rotation_classes=True,
                      model="conv4").validate()
    d = get_task("embedding").load_data(cfg)
    # small1 (136) + small2 (156) share Greek and Latin (50 characters): 242 distinct characters, x 4 rotations
    assert len(d.train_classes) == 968 and d.train_x.shape == (19360, 1, 28, 28)
    assert len(d.test_classes) == 400 and d.test_x.shape == (800, 1, 28, 28)
    # same polarity and scale on both sides: white background (1), dark strokes, as stored
    for x in (d.train_x, d.test_x):
        assert x.min() == 0 and x.max() == 1 and 0.75 < float(x.mean()) < 0.95
    # no held-out image is a training image (the runs come from the evaluation alphabets)
    train = {hash(x.numpy().tobytes()) for x in d.train_x[:4840]}
    assert not any(hash(x.numpy().tobytes()) in train for x in d.test_x)


def test_eval_of_several_runs_gives_one_table_and_refuses_other_protocols(tmp_path, capsys):
    def bench(name, objective, epochs=1):
        out = tmp_path / name
        assert main(["bench", "--objectives", objective, "--seeds", "1", "--epochs", str(epochs), "--out", str(out),
                     "--no-progress", "--no-plots", "--save-models", "--no-baselines", "--track-every", "0"]) == 0
        return str(out)

    a, b = bench("a", "softmax"), bench("b", "contrastive")
    capsys.readouterr()
    assert main(["eval", a, b, "--task", "embedding", "--dataset", "digits"]) == 0
    res = json.loads((tmp_path / "a" / "eval_embedding.json").read_text())
    assert sorted(r["objective"] for r in res["rows"]) == ["contrastive", "softmax"] and res["runs"] == [a, b]
    for r in res["rows"]:  # each network scored as its own run folder scores it
        alone = json.loads(cell_path(tmp_path / ("a" if r["objective"] == "softmax" else "b"), r["objective"],
                                     0).read_text())
        assert r["cells"][0]["recall@1"] == pytest.approx(alone["metrics"]["recall@1"], abs=1e-12)
    c = bench("c", "triplet", epochs=2)
    capsys.readouterr()
    assert main(["eval", a, c, "--task", "embedding", "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "protocol differs from" in err and "in epochs;" in err
    assert main(["eval", a, a, "--task", "embedding", "--dataset", "digits"]) == 2
    assert "saved in two of the runs" in capsys.readouterr().err
