from pathlib import Path

import pytest

from losskit.core import registry
from losskit.docs import family_table, render, update_docs
from losskit.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_docs_in_repo_are_up_to_date():
    # regenerating the registry tables must change nothing; if this fails, run `losskit docs`
    assert DOCS.is_dir()
    assert update_docs(DOCS, check=True) == []


def test_every_family_page_with_a_marker_exists_for_baseline():
    assert "<!-- registry-table: baseline -->" in (DOCS / "baseline.md").read_text()


def test_render_replaces_blocks_and_is_idempotent():
    text = "intro\n<!-- registry-table: baseline -->\nstale junk\n<!-- /registry-table -->\noutro\n"
    once = render(text)
    assert "stale junk" not in once and "`softmax`" in once and once.startswith("intro\n")
    assert once.endswith("<!-- /registry-table -->\noutro\n")
    assert render(once) == once


def test_table_has_paper_link_year_and_defaults():
    class _Fake:
        def __init__(self, num_classes: int, margin: float = 0.5, head: str = "dense"):
            pass

    registry.register("fake-doc-loss", family="margin", task="embedding",
                      paper=registry.Paper("A | fake title", 2019, "1801.07698"), summary="fake")(_Fake)
    try:
        table = family_table("margin")
    finally:
        registry._REGISTRY.pop("fake-doc-loss")
    row = next(line for line in table.splitlines() if "fake-doc-loss" in line)
    assert "[arXiv:1801.07698](https://arxiv.org/abs/1801.07698)" in row and "(2019)" in row
    assert "A \\| fake title" in row  # pipes escaped
    assert "`num_classes` (required)" in row and "`margin=0.5`" in row and "`head='dense'`" in row


def test_unknown_family_and_empty_family():
    with pytest.raises(ValueError, match="unknown family"):
        render("<!-- registry-table: nosuch -->\n<!-- /registry-table -->")
    empty = [f for f in registry.FAMILIES if not registry.specs(family=f, kind=None)]
    if empty:
        assert "Nothing is registered" in family_table(empty[0])


def test_cli_docs_check_and_write(tmp_path, capsys):
    (tmp_path / "p.md").write_text("<!-- registry-table: baseline -->\n<!-- /registry-table -->\n")
    assert main(["docs", "--docs-dir", str(tmp_path), "--check"]) == 1
    assert "stale" in capsys.readouterr().out
    assert main(["docs", "--docs-dir", str(tmp_path)]) == 0
    assert "`softmax`" in (tmp_path / "p.md").read_text()
    assert main(["docs", "--docs-dir", str(tmp_path), "--check"]) == 0


def test_marker_quoted_inside_a_line_is_left_alone():
    text = "write `<!-- registry-table: FAMILY -->` and `<!-- /registry-table -->` in a page\n"
    assert render(text) == text
