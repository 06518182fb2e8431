"""The habits of pytorch-metric-learning and TRL users: miners' index tuples and ``ref_emb=`` on
the pair losses, class names importable from ``losskit.losses``, default differences from PML's
same-named losses stated (and checked against PML), TRL's logged statistics, the output dtype
of margin heads, and a light command line."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

import losskit
from losskit.losses import (ArcFaceLoss, ContrastiveLoss, CosFaceLoss, DPOLoss, IPOLoss, MultiSimilarityLoss,
                            NormalizedSoftmaxLoss, TCMLoss, TripletLoss, trl_stats)
from losskit.mining import MultiSimilarityMiner, TripletMiner


def _batch(seed=0, b=24, d=8, classes=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, d, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.arange(classes).repeat(b // classes)
    return emb, labels


def _reference_mined(loss, emb, labels, pairs):
    """Naive: each anchor alone against a reference of its mined partners, summed, / B."""
    a1, p, a2, n = pairs
    total = emb.new_zeros(())
    for a in range(emb.shape[0]):
        cols = sorted(set(p[a1 == a].tolist()) | set(n[a2 == a].tolist()))
        if not cols:
            continue
        ref = losskit.PairReference(emb[cols], labels[cols], self_index=torch.tensor([-1]), batch_size=1)
        kept = loss.reduction
        loss.reduction = "sum"
        total = total + loss(emb[a:a + 1], labels[a:a + 1], reference=ref)
        loss.reduction = kept
    return total / emb.shape[0]


def test_miner_tuples_in_the_pml_call_shape():
    emb, labels = _batch()
    pairs = MultiSimilarityMiner()(emb, labels)
    ms = MultiSimilarityLoss(lam=0.5, mining=False)
    got = ms(emb, labels, pairs)
    assert torch.allclose(got, _reference_mined(ms, emb, labels, pairs))
    assert torch.allclose(ms(emb, labels, indices_tuple=pairs), got)
    # all pairs mined = no miner
    from losskit.mining import all_pairs_indices

    assert torch.allclose(ms(emb, labels, all_pairs_indices(labels)), ms(emb, labels))
    # triplets become the pairs (a, p) and (a, n)
    trip = TripletMiner(mining="all")(emb, labels)
    for loss in (ContrastiveLoss(), TripletLoss(mining="all"), TCMLoss()):
        val = loss(emb, labels, trip)
        assert torch.isfinite(val) and val.requires_grad
    grad, = torch.autograd.grad(ContrastiveLoss()(emb, labels, trip), emb)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # nothing mined: zero, connected to the graph
    e = torch.empty(0, dtype=torch.long)
    zero = ms(emb, labels, (e, e, e, e))
    assert zero.item() == 0 and zero.requires_grad
    per = MultiSimilarityLoss(reduction="none", mining=False)(emb, labels, pairs)
    assert per.shape == (emb.shape[0],)


def test_miner_tuples_are_checked():
    emb, labels = _batch()
    ms = MultiSimilarityLoss()
    ok = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="indices_tuple: expected a miner's"):
        ms(emb, labels, (ok, ok))
    with pytest.raises(TypeError, match=r"indices_tuple\[1\]: expected a 1-D integer tensor"):
        ms(emb, labels, (ok, ok.float(), ok, ok))
    with pytest.raises(ValueError, match="anchor/negative indices differ in length"):
        ms(emb, labels, (ok, ok, ok, torch.tensor([1])))
    with pytest.raises(ValueError, match=r"positive/negative indices must be in \[0, 23\], got \[0, 24\]"):
        ms(emb, labels, (ok, torch.tensor([0, 24]), ok, ok))
    with pytest.raises(TypeError, match="given twice"):
        ms(emb, labels, (ok, ok, ok), indices_tuple=(ok, ok, ok))


def test_ref_emb_is_a_reference():
    emb, labels = _batch()
    ref, ref_labels = _batch(seed=1, b=12)
    ref = ref.detach()
    for loss in (ContrastiveLoss(), MultiSimilarityLoss(), TripletLoss(mining="all")):
        got = loss(emb, labels, ref_emb=ref, ref_labels=ref_labels)
        want = loss(emb, labels, reference=losskit.PairReference(ref, ref_labels))
        assert torch.equal(got, want)
    with pytest.raises(TypeError, match="ref_emb and ref_labels go together"):
        ContrastiveLoss()(emb, labels, ref_emb=ref)
    with pytest.raises(TypeError, match="give one of them"):
        ContrastiveLoss()(emb, labels, ref_emb=ref, ref_labels=ref_labels, reference=losskit.PairReference())


def test_against_pml_call_shapes():
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as PL
    from pytorch_metric_learning import miners as PM

    emb, labels = _batch(dtype=torch.float32)
    pairs = PM.MultiSimilarityMiner(epsilon=0.1)(emb, labels)
    ours = MultiSimilarityLoss(lam=0.5, mining=False)(emb, labels, pairs)
    theirs = PL.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)(emb, labels, pairs)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (ours, theirs, pml.__version__)
    ref, ref_labels = _batch(seed=1, b=12, dtype=torch.float32)
    ours = ContrastiveLoss()(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    theirs = PL.ContrastiveLoss()(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


# the defaults each docstring states for PML's same-named loss; checked against PML's signature
PML_CLAIMS = {
    MultiSimilarityLoss: ("MultiSimilarityLoss", {"alpha": 2, "beta": 50, "base": 0.5}, ["base=0.5", "lam"]),
    TripletLoss: ("TripletMarginLoss", {"margin": 0.05, "triplets_per_anchor": "all"}, ["margin=0.05"]),
    ContrastiveLoss: ("ContrastiveLoss", {"pos_margin": 0, "neg_margin": 1}, ["pos_margin=0", "neg_margin=1"]),
    TCMLoss: ("ThresholdConsistentMarginLoss", {"lambda_plus": 1.0, "margin_plus": 0.9, "margin_minus": 0.5},
              ["regulariser alone"]),
    ArcFaceLoss: ("ArcFaceLoss", {"margin": 28.6, "scale": 64}, ["margin=28.6", "degrees"]),
    CosFaceLoss: ("CosFaceLoss", {"margin": 0.35, "scale": 64}, ["margin=0.35"]),
    NormalizedSoftmaxLoss: ("NormalizedSoftmaxLoss", {"temperature": 0.05}, ["temperature=0.05"]),
}


@pytest.mark.parametrize("cls", list(PML_CLAIMS), ids=lambda c: c.__name__)
def test_docstrings_state_pmls_defaults(cls):
    name, defaults, words = PML_CLAIMS[cls]
    doc = " ".join(cls.__doc__.split())
    assert "pytorch-metric-learning" in doc and f"``{name}``" in doc
    for w in words:
        assert w in doc, (cls.__name__, w)
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses as PL

    sig = inspect.signature(getattr(PL, name).__init__).parameters
    for k, v in defaults.items():
        assert sig[k].default == v, (name, k, sig[k].default)


# ---------------------------------------------------------------- TRL, dtype, start-up


def test_preference_losses_return_trls_statistics():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g) for _ in range(4))
    loss, stats = DPOLoss(beta=0.2)(pc, pr, rc, rr, return_stats=True)
    assert torch.equal(loss, DPOLoss(beta=0.2)(pc, pr, rc, rr))
    chosen, rejected = 0.2 * (pc - rc), 0.2 * (pr - rr)
    want = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    assert set(stats) == set(want)
    for k, v in want.items():
        assert torch.allclose(stats[k], v) and stats[k].dim() == 0 and not stats[k].requires_grad
    # the rewards are TRL's (summed log-probabilities) even where the loss normalises by length
    lengths = torch.full((16,), 4.0)
    _, ipo = IPOLoss()(pc, pr, rc, rr, chosen_lengths=lengths, rejected_lengths=lengths, return_stats=True)
    assert torch.allclose(ipo["rewards/chosen"], (0.1 * (pc - rc)).mean())
    assert trl_stats(losskit.PreferenceBatch.of(pc, pr, rc, rr), 0.2)["rewards/margins"] == stats["rewards/margins"]


@pytest.mark.parametrize("head", ["auto", "dense", "chunked", "sampled"])
def test_margin_heads_return_the_input_dtype(head):
    torch.manual_seed(0)
    loss = ArcFaceLoss(6, 8, head=head)
    emb, labels = _batch(dtype=torch.bfloat16)
    out = loss(emb, labels)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out)
    grad, = torch.autograd.grad(out, emb)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
    assert loss(emb.detach().float(), labels).dtype == torch.float32


def test_help_and_version_import_neither_torch_nor_the_registry():
    code = ("import sys, contextlib, io\n"
            "import losskit.cli\n"
            "for argv in (['--help'], ['--version']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try:\n"
            "            losskit.cli.main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "    print(out.getvalue().splitlines()[0])\n"
            "print('torch' in sys.modules, 'losskit.core.registry' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("usage: losskit") and lines[1] == f"losskit {losskit.__version__}"
    assert lines[2] == "False False"
    # and the package still gives everything on first use
    assert callable(losskit.get) and losskit.functional.__name__ == "losskit.functional"
