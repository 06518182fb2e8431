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
