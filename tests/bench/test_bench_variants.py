"""Objective variants ``NAME[param=value,...]`` in ``losskit bench``."""

import csv
import json

import pytest

from losskit.bench.cli import config_from_args
from losskit.bench.config import BenchConfig, BenchConfigError
from losskit.bench.labels import (file_safe, normalize_label, parse_objective, parse_set, split_objectives,
                                  variant_params)
from losskit.bench.objectives import default_objectives, resolve_hparams, resolve_objectives
from losskit.bench.runner import run_bench
from losskit.bench.store import cell_path
from losskit.cli import build_parser, main
from bench_cfg import quiet, tiny_cfg


# ---------------------------------------------------------------- parsing


def test_split_respects_brackets_quotes_and_spaces():
    got = split_objectives(" softmax , arcface,arcface[head=chunked], arcface[head=sampled, sample_rate=0.5],"
                           "x[t=(1, 2),s='a, b'] ,")
    assert got == ["softmax", "arcface", "arcface[head=chunked]", "arcface[head=sampled, sample_rate=0.5]",
                   "x[t=(1, 2),s='a, b']"]


def test_label_is_normalised_without_spaces_in_the_order_given():
    assert normalize_label(" arcface [ sample_rate = 0.5 , head = sampled ] ") == \
        "arcface[sample_rate=0.5,head=sampled]"
    assert normalize_label("x[t=(1, 2), s='a b']") == "x[t=(1,2),s='a b']"  # spaces inside quotes kept
    assert normalize_label("softmax") == "softmax"
    assert parse_objective("arcface[head=chunked,margin=0.4]") == ("arcface", {"head": "chunked", "margin": "0.4"})


def test_variant_values_parse_like_set_values():
    got = variant_params("x[a=0.5,b=3,c=True,d=None,e=(1, 2),f=chunked,g='a, b',h=1e-3]")
    assert got == {"a": 0.5, "b": 3, "c": True, "d": None, "e": (1, 2), "f": "chunked", "g": "a, b", "h": 1e-3}
    assert isinstance(got["b"], int) and isinstance(got["a"], float)
    raw = parse_objective("x[a=0.5,b=3,c=True,d=None,e=(1, 2),f=chunked,g='a, b',h=1e-3]")[1]
    assert got == parse_set([f"x.{k}={v}" for k, v in raw.items()])["x"]


@pytest.mark.parametrize("bad, needle", [
    ("arcface[head=chunked", "missing ']'"),
    ("arcface]", "NAME[param=value"),
    ("[head=chunked]", "NAME[param=value"),
    ("arcface[head=chunked]x", "NAME[param=value"),
    ("arcface[head=chunked]]", "NAME[param=value"),
    ("arcface[]", "empty brackets"),
    ("arcface[head]", "param=value"),
    ("arcface[=chunked]", "param=value"),
    ("arcface[head=]", "param=value"),
    ("arcface[head=dense,head=chunked]", "given twice"),
    ("arcface[margin=(0.4]", "missing ']'"),
])
def test_malformed_brackets_name_the_string(bad, needle):
    with pytest.raises(BenchConfigError, match="arcface" if bad[0] != "[" else "head") as e:
        resolve_objectives([bad])
    assert needle in str(e.value) and repr(bad) in str(e.value)


def test_unbalanced_objectives_option_is_an_error():
    with pytest.raises(BenchConfigError, match=r"--objectives.*missing '\]'.*arcface\[head=chunked,softmax"):
        split_objectives("arcface[head=chunked,softmax")


def test_unknown_name_and_param_give_close_matches():
    with pytest.raises(BenchConfigError, match="unknown objective 'arcfce'.*Closest: arcface"):
        resolve_objectives(["arcfce[head=chunked]"])
    with pytest.raises(BenchConfigError, match=r"arcface\[marign=0.4\].*no hyperparameter 'marign'.*Closest: margin"):
        resolve_objectives(["arcface[marign=0.4]"])


@pytest.mark.parametrize("param", ["num_classes", "embedding_dim"])
def test_bench_filled_params_cannot_be_set_in_brackets(param):
    with pytest.raises(BenchConfigError, match=f"{param} is set by the bench"):
        resolve_objectives([f"arcface[{param}=3]"])


def test_duplicate_labels_are_dropped_after_normalising():
    assert resolve_objectives(["arcface", "arcface[head=chunked]", "arcface[ head = chunked ]", "arcface"]) == \
        ["arcface", "arcface[head=chunked]"]


def test_cli_splits_objectives_and_keeps_variant_set_keys(tmp_path):
    args = build_parser().parse_args([
        "bench", "--objectives", "softmax,arcface[head=sampled, sample_rate=0.5],arcface[head=chunked]",
        "--set", "arcface.margin=0.4", "--set", "arcface[ head=chunked ].scale=32", "--out", str(tmp_path / "r")])
    cfg, _, _ = config_from_args(args)
    assert cfg.objectives == ["softmax", "arcface[head=sampled, sample_rate=0.5]", "arcface[head=chunked]"]
    assert cfg.overrides == {"arcface": {"margin": 0.4}, "arcface[head=chunked]": {"scale": 32}}


# ---------------------------------------------------------------- --set inheritance


def test_set_applies_to_the_objective_and_its_variants_own_params_win(fakes):
    labels = resolve_objectives(["fake-pair", "fake-pair[margin=0.2]", "fake-pair[scale=2.0]"])
    hp = resolve_hparams(labels, parse_set(["fake-pair.margin=0.7", "fake-pair.scale=3.0"]))
    assert hp["fake-pair"] == {"margin": 0.7, "scale": 3.0, "reduction": "mean"}
    assert hp["fake-pair[margin=0.2]"] == {"margin": 0.2, "scale": 3.0, "reduction": "mean"}
    assert hp["fake-pair[scale=2.0]"] == {"margin": 0.7, "scale": 2.0, "reduction": "mean"}


def test_set_can_target_one_variant(fakes):
    labels = resolve_objectives(["fake-pair", "fake-pair[margin=0.2]"])
    hp = resolve_hparams(labels, parse_set(["fake-pair.scale=3.0", "fake-pair[ margin=0.2 ].scale=5.0"]))
    assert hp["fake-pair"]["scale"] == 3.0 and hp["fake-pair[margin=0.2]"]["scale"] == 5.0
    # a variant's own bracket param is changed in the brackets, not by --set
    with pytest.raises(BenchConfigError, match="sets margin in its brackets"):
        resolve_hparams(labels, parse_set(["fake-pair[margin=0.2].margin=0.3"]))
    with pytest.raises(BenchConfigError, match=r"variant 'fake-pair\[margin=0.3\]' is not among the chosen"):
        resolve_hparams(labels, parse_set(["fake-pair[margin=0.3].scale=2"]))
    with pytest.raises(BenchConfigError, match="Closest: scale"):
        resolve_hparams(labels, parse_set(["fake-pair[margin=0.2].scal=2"]))


def test_set_on_a_base_name_chosen_only_as_a_variant(fakes):
    hp = resolve_hparams(["fake-pair[margin=0.2]"], parse_set(["fake-pair.scale=4.0"]))
    assert hp == {"fake-pair[margin=0.2]": {"margin": 0.2, "scale": 4.0, "reduction": "mean"}}


# ---------------------------------------------------------------- default list, sharded


def test_default_list_has_arcface_head_variants_but_not_sharded_or_sampled():
    names = default_objectives()
    i = names.index("arcface")
    assert names[i:i + 3] == ["arcface", "arcface[head=dense]", "arcface[head=chunked]"]
    # sampled is the full softmax whenever a batch holds every class (digits: P = 5 = C), so by default it
    # would only repeat arcface's row; it is one --objectives entry away on a data set with many classes
    assert not any("sharded" in n or "sampled" in n for n in names)
    assert resolve_objectives(names) == names  # already normalised, no repeats


def test_sharded_head_is_refused_without_a_process_group():
    import torch.distributed as dist

    assert not dist.is_initialized()
    for labels, sets in ((["arcface[head=sharded]"], []), (["arcface"], ["arcface.head=sharded"])):
        with pytest.raises(BenchConfigError, match="torch.distributed is not initialised.*head='chunked'"):
            resolve_hparams(resolve_objectives(labels), parse_set(sets))


# ---------------------------------------------------------------- files and runs


def test_file_names_are_safe_and_distinct():
    labels = ["arcface", "arcface[head=chunked]", "arcface[head=chunked,margin=0.4]", "x[s='a/b']", "x[s='a:b']",
              "arcface_head_chunked"]
    stems = [file_safe(lbl) for lbl in labels]
    assert stems[0] == "arcface" and stems[-1] == "arcface_head_chunked"  # plain names unchanged
    assert len(set(stems)) == len(stems)
    for s in stems:
        assert s and all(c.isalnum() or c in "._-" for c in s), s


def test_variants_get_their_own_labels_cells_and_files(tmp_path, tiny, fakes):
    labels = ["fake-pair", "fake-pair[margin=0.2]", "fake-pair[margin=0.9, scale=2.0]"]
    out = tmp_path / "run"
    run = run_bench(tiny_cfg(labels, seeds=1), out, progress=False, log=quiet, data=tiny)
    norm = ["fake-pair", "fake-pair[margin=0.2]", "fake-pair[margin=0.9,scale=2.0]"]
    assert run.complete and sorted(run.computed) == sorted((n, 0) for n in norm)
    proto = json.loads((out / "config.json").read_text())["protocol"]
    assert proto["objectives"] == norm
    assert proto["hparams"]["fake-pair[margin=0.9,scale=2.0]"] == {"margin": 0.9, "scale": 2.0, "reduction": "mean"}
    cells = {n: json.loads(cell_path(out, n, 0).read_text()) for n in norm}
    assert {n: c["objective"] for n, c in cells.items()} == {n: n for n in norm}  # label intact in the JSON
    assert all(c["name"] == "fake-pair" for c in cells.values())
    assert len(list((out / "cells").glob("*.json"))) == 3
    assert len({tuple(c["epoch_loss"]) for c in cells.values()}) == 3  # different hparams, different training
    res = json.loads((out / "results.json").read_text())
    assert sorted(r["objective"] for r in res["summary"]) == sorted(norm)
    with open(out / "summary.csv", newline="") as f:
        assert sorted(r["objective"] for r in csv.DictReader(f)) == sorted(norm)
    for n in norm:
        assert f" {n} " in run.leaderboard
    assert (out / "plots" / "metrics.png").stat().st_size > 0


def test_resume_with_variant_labels(tmp_path, tiny, fakes):
    trap = fakes
    trap.exc, trap.after = KeyboardInterrupt(), 2  # the trap variant's seed-1 cell is "Ctrl-C"
    labels = ["fake-pair[margin=0.2]", "fake-trap[margin=0.3]"]
    out = tmp_path / "run"
    run = run_bench(tiny_cfg(labels), out, progress=False, plots=False, log=quiet, data=tiny)
    assert run.interrupted and run.computed == [("fake-pair[margin=0.2]", 0), ("fake-trap[margin=0.3]", 0),
                                                ("fake-pair[margin=0.2]", 1)]
    trap.exc = None
    with pytest.raises(BenchConfigError, match=r"hparams\[fake-trap\[margin=0.4\]\]: run has None"):
        run_bench(tiny_cfg(["fake-pair[margin=0.2]", "fake-trap[margin=0.4]"]), out, resume=True, log=quiet,
                  data=tiny)
    run2 = run_bench(tiny_cfg([" fake-pair[ margin=0.2 ]", "fake-trap[margin = 0.3]"]), out, resume=True,
                     progress=False, plots=False, log=quiet, data=tiny)
    assert run2.computed == [("fake-trap[margin=0.3]", 1)] and run2.complete
    assert len(list((out / "cells").glob("*.json"))) == 4


def test_cli_resume_reads_variant_labels_back(tmp_path, monkeypatch, capsys, fakes):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--objectives", "fake-pair[margin=0.2],fake-pair", "--seeds", "1", "--epochs", "1",
            "--no-progress", "--no-plots", "--out", "r"]
    assert main(argv) == 0
    assert " fake-pair[margin=0.2] " in capsys.readouterr().out
    assert main(["bench", "--resume", "r", "--no-progress", "--no-plots"]) == 0
    assert "0 cells trained" in capsys.readouterr().out
    assert main(["bench", "--resume", "r", "--objectives", "fake-pair[margin=0.3],fake-pair"]) == 2
    assert "objectives: run has" in capsys.readouterr().err


def test_chunked_and_sampled_heads_train_like_dense_on_digits(tmp_path):
    # The heads compute the same loss (docs/margin.md: dense vs chunked/fused agree to ~1e-5
    # relative in fp32), so one epoch (12 steps) from the same initialisation and batches
    # ends with the same mean loss up to float rounding (1e-4 relative allows 12 Adam steps of
    # amplified rounding), and at most one test query may change its nearest neighbour
    # (R@1 within 1/N_test). sampled keeps every class on digits (5 classes, P = 5, so
    # ceil(0.1 * 5) <= 5 positives) and then runs the same fused kernel as plain arcface
    # (head='auto'): bitwise equal.
    labels = ["arcface[head=dense]", "arcface[head=chunked]", "arcface", "arcface[head=sampled]"]
    run = run_bench(BenchConfig(objectives=labels, seeds=1, epochs=1, device="cpu"), tmp_path / "r",
                    progress=False, plots=False, log=quiet)
    assert run.complete
    cells = {c["objective"]: c for c in run.cells}
    dense = cells["arcface[head=dense]"]
    n_test = sum(dense["hist"]["genuine"]) + sum(dense["hist"]["impostor"])
    n_test = int(round((1 + (1 + 8 * n_test) ** 0.5) / 2))  # pairs -> images
    for other in ("arcface[head=chunked]", "arcface"):
        c = cells[other]
        assert c["epoch_loss"][0] == pytest.approx(dense["epoch_loss"][0], rel=1e-4)
        assert abs(c["metrics"]["recall@1"] - dense["metrics"]["recall@1"]) <= 1 / n_test + 1e-12
        assert c["metrics"]["map@r"] == pytest.approx(dense["metrics"]["map@r"], abs=1e-3)
    assert cells["arcface[head=sampled]"]["epoch_loss"] == cells["arcface"]["epoch_loss"]
    assert cells["arcface[head=sampled]"]["metrics"] == cells["arcface"]["metrics"]


def test_sharded_head_runs_inside_an_initialised_process_group(tmp_path, tiny):
    # one gloo rank owns every class: the sharded head then trains like the single-process heads
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        labels = ["arcface[head=sharded]", "arcface[head=dense]"]
        run = run_bench(tiny_cfg(labels, seeds=1, epochs=1), tmp_path / "r", progress=False, plots=False, log=quiet,
                        data=tiny)
    finally:
        dist.destroy_process_group()
    assert run.complete and not run.failed
    sharded, dense = (next(c for c in run.cells if c["objective"] == lbl) for lbl in labels)
    assert sharded["epoch_loss"][0] == pytest.approx(dense["epoch_loss"][0], rel=1e-4)
