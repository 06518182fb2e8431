"""``losskit bench --task paired``: the two-tower task trains info-nce and cement (with its hard
negatives) behind the shared runner; its retrieval metrics both ways."""

from __future__ import annotations

import pytest
import torch

from losskit.bench.config import BenchConfig
from losskit.bench.runner import run_bench
from losskit.bench.tasks import get_task
from losskit.bench.tasks.paired import _caption_digits, _recall, _required_inputs

NORMS = {"a": 1.46, "of": 1.67, "left": 3.7, "right": 3.47, "zero": 2.86, "one": 3.97, "two": 4.18,
         "three": 3.62, "four": 3.37, "five": 3.87, "six": 3.43, "seven": 3.72, "eight": 4.04, "nine": 4.04}


def test_caption_digits_and_recall():
    from losskit.data.two_digits import VOCAB

    ids = lambda ws: [VOCAB.index(w) for w in ws]  # noqa: E731
    caps = torch.tensor([ids("a three left of a seven".split()), ids("a seven right of a three".split()),
                         ids("a seven left of a three".split())])
    assert _caption_digits(caps).tolist() == [[3, 7], [3, 7], [7, 3]]
    s = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    truth = torch.tensor([[True, False], [True, False]])
    assert _recall(s, truth, 1) == 0.5 and _recall(s, truth, 2) == 1.0


def test_paired_task_trains_its_objectives(tmp_path):
    pytest.importorskip("sklearn")
    from losskit.data.two_digits import make_two_digit_pairs

    data = {"train": make_two_digit_pairs(240, NORMS, split="train"),
            "test": make_two_digit_pairs(120, NORMS, split="test")}
    cfg = BenchConfig(task="paired", objectives=["info-nce", "cement"], seeds=1, epochs=1,
                      batch_size=120, embedding_dim=16)
    run = run_bench(cfg, tmp_path / "run", progress=False, plots=False, log=lambda s: None, data=data)
    cells = {c["objective"]: c for c in run.cells}
    assert set(cells) == {"info-nce", "cement"}
    for c in cells.values():
        assert c["steps"] == 2
        for k in ("i2t_recall@1", "t2i_recall@1", "i2t_recall@5", "beats_word_order", "beats_concrete_plant"):
            assert 0.0 <= c["metrics"][k] <= 1.0
        assert c["metrics"]["i2t_recall@5"] >= c["metrics"]["i2t_recall@1"]
    assert cells["cement"]["hard_negatives"] == ["concreteness", "hard_negatives"]
    assert cells["info-nce"]["hard_negatives"] == []
    assert "i->t R@1" in run.leaderboard and "t->i R@1" in run.leaderboard


def test_paired_task_refuses_other_datasets_and_embedding_objectives():
    from losskit.bench.errors import BenchConfigError

    with pytest.raises(BenchConfigError, match="paired"):
        get_task("paired").validate(BenchConfig(task="paired", dataset="folder", data_dir="x"))
    import losskit

    assert _required_inputs(losskit.get("cement")) == {"hard_negatives", "concreteness"}
    with pytest.raises(BenchConfigError, match="paired"):
        run_bench(BenchConfig(task="paired", objectives=["triplet"]), "unused", log=lambda s: None, data=object())


def test_paired_task_trains_on_the_optimiser_axis(tmp_path):
    """``--optimizer`` / ``--schedule`` / ``--refine-from`` reach the two towers as in the other tasks."""
    pytest.importorskip("sklearn")
    import json

    from losskit.bench.store import cell_path
    from losskit.data.two_digits import make_two_digit_pairs

    data = {"train": make_two_digit_pairs(240, NORMS, split="train"),
            "test": make_two_digit_pairs(120, NORMS, split="test")}

    def run(name, **kw):
        cfg = BenchConfig(task="paired", objectives=["info-nce"], seeds=1, epochs=2, batch_size=60,
                          embedding_dim=16, lr=1e-2, **kw)
        out = tmp_path / name
        r = run_bench(cfg, out, progress=False, plots=False, log=lambda s: None, data=data)
        assert r.complete and not r.failed, r.failed
        return json.loads(cell_path(out, "info-nce", 0).read_text())

    losses = {}
    for opt in ("adam", "sgd", "frugal"):
        c = run(opt, optimizer=opt, schedule="linear-decay")
        assert c["optimizer"] == opt and c["schedule"] == "linear-decay"
        assert len(c["grad_norms_l1"]) == c["steps"] == len(c["grad_norms_l2"]) == 8
        assert c["hard_negatives"] == []                  # the task's own info survives beside the axis'
        losses[opt] = c["epoch_loss"]
    assert losses["adam"] != losses["sgd"] != losses["frugal"] != losses["adam"], "the optimiser changes training"
    const = run("const")
    assert const["optimizer"] == "adam" and const["schedule"] == "constant" and "grad_norms_l1" not in const
    assert const["epoch_loss"] != losses["adam"], "the schedule changes training"
    refined = run("refined", schedule="refined", refine_from=str(tmp_path / "adam"))
    assert refined["schedule"] == "refined" and refined["refined_from_steps"] == 8
    assert refined["epoch_loss"] != losses["adam"]
