"""Hyperparameters are refused at construction, non-finite inputs at the call, each by name."""

import math

import pytest
import torch

import losskit
from losskit.core.context import PairReference
from losskit.losses.xbm import CrossBatchMemory
from losskit.mining import MultiSimilarityMiner, TripletMiner

LOSSES = [("contrastive", {}), ("triplet", {"mining": "all"}), ("triplet", {"mining": "hard"}),
          ("triplet", {"mining": "semi-hard"}), ("multi-similarity", {}), ("multi-similarity", {"reduction": "none"}),
          ("tcm", {}), ("tcm", {"base": None})]

BAD_HPARAMS = [
    ("multi-similarity", {"lam": math.nan}, "lam: expected a finite number"),
    ("multi-similarity", {"alpha": 0.0}, r"alpha: expected a value > 0"),
    ("multi-similarity", {"beta": -1.0}, r"beta: expected a value > 0"),
    ("multi-similarity", {"epsilon": -0.1}, r"epsilon: expected a value >= 0"),
    ("multi-similarity", {"epsilon": math.inf}, "epsilon: expected a finite number"),
    ("multi-similarity", {"mining": "yes"}, "mining: expected True or False"),
    ("multi-similarity", {"official_positive_filter": 1}, "official_positive_filter: expected True or False"),
    ("multi-similarity", {"chunk_size": 0}, "chunk_size: expected an integer >= 1"),
    ("multi-similarity", {"distance": "euclidean"}, "distance: Multi-Similarity needs a similarity"),
    ("contrastive", {"neg_margin": math.nan}, "neg_margin: expected a finite number"),
    ("contrastive", {"pos_margin": math.inf}, "pos_margin: expected a finite number"),
    ("contrastive", {"pair_average": "median"}, "pair_average: expected one of"),
    ("contrastive", {"squared_hinge": None}, "squared_hinge: expected True or False"),
    ("contrastive", {"normalize": "no"}, "normalize: expected True or False"),
    ("contrastive", {"distance": "manhattan"}, "distance: expected one of"),
    ("triplet", {"margin": -1.0}, r"margin: expected a value >= 0, got -1.0"),
    ("triplet", {"margin": math.nan}, "margin: expected a finite number"),
    ("triplet", {"mining": "hardest"}, "mining: expected one of"),
    ("triplet", {"smooth": 0}, "smooth: expected True or False"),
    ("tcm", {"lambda_plus": -1.0}, r"lambda_plus: expected a value >= 0"),
    ("tcm", {"lambda_minus": math.nan}, "lambda_minus: expected a finite number"),
    ("tcm", {"margin_plus": 2.0}, r"margin_plus: expected a value in \[-1, 1\]"),
    ("tcm", {"margin_minus": -1.5}, r"margin_minus: expected a value in \[-1, 1\]"),
    ("tcm", {"base_kwargs": {"lam": math.nan}}, "lam: expected a finite number"),
]


@pytest.mark.parametrize("name,kw,match", BAD_HPARAMS)
def test_bad_hyperparameter_refused_at_construction(name, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        losskit.get(name, **kw)


@pytest.mark.parametrize("name,kw", LOSSES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_embeddings_refused(name, kw, bad):
    m = losskit.get(name, **kw)
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    x[3, 1] = bad
    with pytest.raises(ValueError, match=r"embeddings: expected finite values, got .* at index \(3, 1\)"):
        m(x, y)
    r = torch.randn(5, 4)
    r[0, 0] = bad
    with pytest.raises(ValueError, match="reference.embeddings: expected finite values"):
        m(torch.randn(6, 4), y, reference=PairReference(r, torch.zeros(5, dtype=torch.long)))
    # with value checks off the check (a host sync) is skipped: the NaN/inf goes through
    with losskit.tensor_checks(False):
        m(x, y)


def test_reference_is_validated():
    m = losskit.get("contrastive")
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"reference.embeddings: expected shape \[M, 4\]"):
        m(x, y, reference=PairReference(torch.randn(5, 3), torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"reference.labels: expected shape \[5\]"):
        m(x, y, reference=PairReference(torch.randn(5, 4), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"reference.self_index: expected values in \[-1, 4\]"):
        m(x, y, reference=PairReference(torch.randn(5, 4), torch.zeros(5, dtype=torch.long),
                                        self_index=torch.full((6,), 5)))
    with pytest.raises(TypeError, match="reference: expected a losskit.core.PairReference"):
        m(x, y, reference={"embeddings": x})


@pytest.mark.parametrize("build,match", [
    (lambda: MultiSimilarityMiner(epsilon=-1.0), "epsilon: expected a value >= 0"),
    (lambda: MultiSimilarityMiner(chunk_size=0), "chunk_size: expected an integer >= 1"),
    (lambda: MultiSimilarityMiner(official_positive_filter="x"), "official_positive_filter"),
    (lambda: TripletMiner("easy"), "mining: expected one of"),
    (lambda: TripletMiner(normalize=None), "normalize: expected True or False"),
    (lambda: CrossBatchMemory(memory_size=0), "memory_size: expected an integer >= 1"),
    (lambda: CrossBatchMemory(weight=-1.0), "weight: expected a value >= 0"),
    (lambda: CrossBatchMemory(weight=math.nan), "weight: expected a finite number"),
    (lambda: CrossBatchMemory(start_iteration=-1), "start_iteration: expected an integer >= 0"),
    (lambda: CrossBatchMemory(include_batch_loss="yes"), "include_batch_loss: expected True or False"),
    (lambda: CrossBatchMemory(losskit.get("contrastive"), loss_kwargs={"margin": 1}), "loss_kwargs"),
])
def test_miner_and_memory_hyperparameters(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_miners_and_memory_are_registered_by_kind():
    assert {"multi-similarity-miner", "triplet-miner"} <= set(losskit.names(kind="miner"))
    assert "cross-batch-memory" in losskit.names(kind="memory")
    for name in ("multi-similarity-miner", "triplet-miner", "cross-batch-memory"):
        s = losskit.spec(name)
        assert s.family == "pair" and s.paper is not None
    assert isinstance(losskit.get("multi-similarity-miner", epsilon=0.2), MultiSimilarityMiner)
    assert losskit.get("triplet-miner", mining="hard").hparams["mining"] == "hard"
    xbm = losskit.get("cross-batch-memory", loss="contrastive", memory_size=16)
    assert isinstance(xbm, CrossBatchMemory) and xbm.hparams["memory_size"] == 16
    # the pair losses carry their hyperparameters once: the registry's capture
    m = losskit.get("triplet", margin=0.3)
    assert m.hparams["margin"] == 0.3 and not hasattr(m, "_hp")
