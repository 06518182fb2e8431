import math

import pytest

from losskit.bench.config import BenchConfig, BenchConfigError
from losskit.bench.labels import parse_set
from losskit.bench.objectives import default_objectives, resolve_hparams, resolve_objectives
from losskit.bench.protocol import diff_protocol, protocol
from losskit.bench.report import aggregate, format_leaderboard
from losskit.bench.tasks import get_task
from losskit.cli import build_parser
from losskit.bench.cli import config_from_args


def test_parse_set_literals_and_bare_words():
    got = parse_set(["arcface.margin=0.4", "arcface.head=chunked", "x.flag=True", "x.t=(1, 2)", "x.s='a b'"])
    assert got == {"arcface": {"margin": 0.4, "head": "chunked"}, "x": {"flag": True, "t": (1, 2), "s": "a b"}}
    assert isinstance(got["arcface"]["margin"], float)


@pytest.mark.parametrize("bad", ["arcface.margin", "margin=0.4", ".margin=1", "arcface.=1"])
def test_parse_set_rejects_malformed(bad):
    with pytest.raises(BenchConfigError, match="OBJECTIVE.PARAM=VALUE"):
        parse_set([bad])


def test_unknown_objective_names_closest():
    with pytest.raises(BenchConfigError, match="softmax"):
        resolve_objectives(["sofmax"])


def test_unknown_hparam_names_closest(fakes):
    with pytest.raises(BenchConfigError, match=r"no hyperparameter 'margn'.*Closest: margin"):
        resolve_hparams(["fake-pair"], {"fake-pair": {"margn": 0.3}})


def test_set_for_unselected_or_unknown_objective(fakes):
    with pytest.raises(BenchConfigError, match="not among the chosen"):
        resolve_hparams(["softmax"], {"fake-pair": {"margin": 0.3}})
    with pytest.raises(BenchConfigError, match="fake-pair"):
        resolve_hparams(["fake-pair"], {"fake-pai": {"margin": 0.3}})


def test_bench_filled_args_cannot_be_set(fakes):
    with pytest.raises(BenchConfigError, match="set by the bench"):
        resolve_hparams(["fake-proxy"], {"fake-proxy": {"num_classes": 3}})


def test_hparams_are_defaults_plus_overrides(fakes):
    hp = resolve_hparams(["softmax", "fake-pair", "fake-proxy"], {"fake-pair": {"margin": 0.2}})
    assert hp == {"softmax": {"reduction": "mean"}, "fake-pair": {"margin": 0.2, "scale": 1.0, "reduction": "mean"},
                  "fake-proxy": {"temperature": 0.1}}


def test_default_objectives_softmax_first_then_every_embedding_objective(fakes):
    names = default_objectives()
    assert names[0] == "softmax"
    assert {"fake-pair", "fake-proxy", "fake-trap"} <= set(names)


def test_protocol_diff_names_the_field(fakes):
    cfg = BenchConfig(objectives=["fake-pair"])
    a = protocol(cfg, resolve_hparams(["fake-pair"], {}), "cpu")
    b = protocol(BenchConfig(objectives=["fake-pair"], epochs=3), resolve_hparams(["fake-pair"], {"fake-pair": {"margin": 0.1}}), "cpu")
    d = diff_protocol(a, b)
    assert any(line.startswith("epochs:") for line in d)
    assert any("hparams[fake-pair]" in line for line in d)
    assert diff_protocol(a, a) == []


def test_cli_parsing_builds_config(tmp_path):
    args = build_parser().parse_args([
        "bench", "--objectives", "softmax,fake-pair", "--seeds", "2", "--epochs", "4", "--set", "fake-pair.margin=0.3",
        "--dataset", "folder", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cpu",
        "--batch-classes", "3", "--batch-samples", "4", "--augment", "shift", "--lr", "0.01"])
    cfg, out, resume = config_from_args(args)
    assert not resume and out == tmp_path / "run"
    assert cfg.objectives == ["softmax", "fake-pair"] and cfg.seeds == 2 and cfg.epochs == 4
    assert cfg.overrides == {"fake-pair": {"margin": 0.3}}
    assert (cfg.dataset, cfg.data_dir, cfg.device) == ("folder", str(tmp_path), "cpu")
    assert (cfg.batch_classes, cfg.batch_samples, cfg.augment, cfg.lr) == (3, 4, "shift", 0.01)


def test_cli_defaults_are_the_documented_default_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, out, resume = config_from_args(build_parser().parse_args(["bench"]))
    assert cfg == BenchConfig() and cfg.dataset == "digits" and cfg.seeds == 3
    assert out.parent.name == "runs" and not resume


def test_validate_errors():
    with pytest.raises(BenchConfigError, match="--data-dir"):
        BenchConfig(dataset="folder").validate()
    with pytest.raises(BenchConfigError, match="--seeds"):
        BenchConfig(seeds=0).validate()


def _cell(obj, seed, r1, t=1.0):
    return {"objective": obj, "seed": seed, "metrics": {"recall@1": r1, "eer": 0.2, "opis": 0.001},
            "train_time_s": t, "eval_time_s": 0.1, "peak_memory_mb": 2.0, "memory_kind": "cpu_profiler_step",
            "epoch_loss": [2.0, 1.0]}


def test_leaderboard_sorted_by_recall_with_mean_and_std():
    cells = [_cell("a", 0, 0.5), _cell("a", 1, 0.7), _cell("b", 0, 0.9), _cell("b", 1, 0.8), _cell("c", 0, float("nan"))]
    rows = aggregate(cells, ["a", "b", "c"], get_task("embedding"))
    assert [r["objective"] for r in rows] == ["b", "a", "c"]
    a = rows[1]["metrics"]["recall@1"]
    assert math.isclose(a["mean"], 0.6) and math.isclose(a["std"], 0.1414213562, rel_tol=1e-6) and a["n"] == 2
    text = format_leaderboard(rows, get_task("embedding"), "title")
    lines = text.splitlines()
    assert lines[0] == "title"
    assert "R@1 %" in lines[1] and "EER %" in lines[1] and "OPIS" in lines[1] and "mem MB" in lines[1]
    body = lines[3:6]
    # two seeds: b - a is +0.4 and +0.1, within noise (paired 95% t-interval), so they share rank 1
    assert body[0].split()[:3] == ["1=", "b", "2"] and "85.0±7.1" in body[0]
    assert "60.0±14.1" in body[1]
    assert body[2].split()[1] == "c" and " - " in body[2] + " "
    assert "profiler" in text  # the memory measure is labelled
    # columns line up
    assert len({len(l) for l in lines[1:6]}) == 1


def test_default_list_leaves_out_objectives_the_bench_cannot_build(fakes):
    from losskit.core import registry
    from losskit.bench.objectives import unbenchable_objectives

    class NeedsQueue:
        def __init__(self, queue_size: int, margin: float = 0.1):
            pass

    registry.register("fake-needs-queue", family="pair", task="embedding")(NeedsQueue)
    try:
        assert "fake-needs-queue" not in default_objectives()
        assert unbenchable_objectives()["fake-needs-queue"] == ["queue_size"]
        with pytest.raises(BenchConfigError, match="queue_size"):  # asked for explicitly: a clear error
            resolve_hparams(["fake-needs-queue"], {})
    finally:
        registry._REGISTRY.pop("fake-needs-queue")
