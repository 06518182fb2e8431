import json

import pytest

import losskit
from losskit.core import registry
from losskit.cli import main


def test_get_builds_module_with_defaults():
    loss = losskit.get("softmax", num_classes=3, embedding_dim=4)
    assert loss.weight.shape == (3, 4)
    s = losskit.spec("softmax")
    assert s.required == ("num_classes", "embedding_dim")
    assert s.hparams == {"reduction": "mean"}
    assert s.needs_classes


def test_unknown_name_suggests_closest():
    with pytest.raises(KeyError, match="softmax"):
        losskit.get("sofmax")


def test_unknown_hparam_suggests_closest():
    with pytest.raises(TypeError, match="reduction"):
        losskit.get("softmax", num_classes=3, embedding_dim=4, reductin="sum")


def test_missing_required_is_named():
    with pytest.raises(TypeError, match="num_classes"):
        losskit.get("softmax", embedding_dim=4)


def test_names_are_kebab_case_and_papers_complete():
    for s in losskit.specs():
        assert s.name == s.name.lower() and "_" not in s.name and " " not in s.name
        assert s.family in registry.FAMILIES and s.task in registry.TASKS
        if s.family != "baseline":
            assert s.paper is not None and s.paper.year > 1990, s.name


def test_register_rejects_bad_names():
    with pytest.raises(ValueError, match="kebab"):
        registry.register("Bad_Name", family="baseline")


def test_cli_list_and_json(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "softmax" in out
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by = {r["name"]: r for r in rows}
    assert by["softmax"]["family"] == "baseline"
    assert by["softmax"]["required"] == ["num_classes", "embedding_dim"]
