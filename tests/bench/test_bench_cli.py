import json

import pytest

from losskit.cli import main


def test_cli_bench_on_digits_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "--objectives", "softmax", "--seeds", "1", "--epochs", "1", "--no-progress", "--no-plots"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "softmax" in out and "R@1" in out and "total wall time" in out
    (run,) = (tmp_path / "runs").iterdir()
    proto = json.loads((run / "config.json").read_text())["protocol"]
    assert proto["dataset"] == "digits" and proto["objectives"] == ["softmax"]
    # --resume with no folder picks the newest run; nothing left to do
    rc = main(["bench", "--resume", "--no-progress", "--no-plots"])
    assert rc == 0 and "0 cells trained" in capsys.readouterr().out
    # resuming with a different budget is refused with the difference named
    rc = main(["bench", "--resume", str(run), "--epochs", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "epochs: run has 1, now 2" in err


@pytest.mark.parametrize("argv, needle", [
    (["--objectives", "sofmax"], "Closest: softmax"),
    (["--objectives", "softmax", "--set", "softmax.reductin=sum"], "Closest: reduction"),
    (["--objectives", "softmax", "--set", "softmax.num_classes=3"], "set by the bench"),
    (["--set", "bad"], "OBJECTIVE.PARAM=VALUE"),
    (["--dataset", "folder"], "--data-dir"),
])
def test_cli_errors_are_clear(tmp_path, capsys, argv, needle):
    rc = main(["bench", "--out", str(tmp_path / "r"), *argv])
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_folder_missing_path_is_clear(tmp_path, capsys):
    rc = main(["bench", "--dataset", "folder", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "r"),
               "--no-progress"])
    assert rc == 2 and "nope" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("ext", ["png", "pgm"])
def test_cli_bench_on_an_image_folder(tmp_path, capsys, ext):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(6):
        (root / f"class{c}").mkdir(parents=True)
        base = rng.integers(0, 256, (12, 12))
        for i in range(6):
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img, mode="L").save(root / f"class{c}" / f"{i}.{ext}")
    out = tmp_path / "run"
    rc = main(["bench", "--dataset", "folder", "--data-dir", str(root), "--objectives", "softmax", "--seeds", "1",
               "--epochs", "1", "--image-size", "16", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "softmax" in text
    proto = json.loads((out / "config.json").read_text())["protocol"]
    assert proto["dataset"] == "folder" and proto["image_size"] == 16
    cell = json.loads((out / "cells" / "softmax__seed0.json").read_text())
    assert cell["model"] == "mlp" and 0 <= cell["metrics"]["recall@1"] <= 1
    assert (out / "plots" / "metrics.png").exists()
    # the CNN path (images above 16x16)
    out2 = tmp_path / "run2"
    rc = main(["bench", "--dataset", "folder", "--data-dir", str(root), "--objectives", "softmax", "--seeds", "1",
               "--epochs", "1", "--image-size", "20", "--out", str(out2), "--no-progress", "--no-plots"])
    assert rc == 0
    assert json.loads((out2 / "cells" / "softmax__seed0.json").read_text())["model"] == "cnn"
