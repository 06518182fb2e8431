"""core/context.py: PairReference and PreferenceBatch validation."""

from __future__ import annotations

import math

import pytest
import torch

from losskit.core.context import PairReference, PreferenceBatch


def _emb(b=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.tensor([0, 1, 0, 1][:b])


# ---------------------------------------------------------------- PairReference

def test_default_reference_is_the_batch_itself():
    e, y = _emb()
    r = PairReference().resolve(e, y)
    assert r.is_batch and r.embeddings is e and r.labels is y
    assert r.self_index.tolist() == [0, 1, 2, 3] and r.batch_size == 4
    assert r.count(torch.tensor(3)).item() == 3  # no count_reduce: identity


def test_reference_set_defaults_and_fields():
    e, y = _emb()
    m, my = _emb(6, seed=1)[0], torch.tensor([0, 0, 1, 1, 2, 2])
    r = PairReference(m, my, batch_size=10, count_reduce=lambda n: n * 2).resolve(e, y)
    assert not r.is_batch and r.embeddings is m and r.labels is my
    assert r.self_index.tolist() == [-1, -1, -1, -1] and r.self_index.dtype == torch.long
    assert r.batch_size == 10 and r.count(torch.tensor(3)).item() == 6
    si = torch.tensor([0, 5, -1, 2])
    assert torch.equal(PairReference(m, my, self_index=si).resolve(e, y).self_index, si)
    # self_index on the batch itself
    assert PairReference(self_index=torch.tensor([3, 2, 1, 0])).resolve(e, y).self_index.tolist() == [3, 2, 1, 0]


def test_pair_reference_messages():
    e, y = _emb()
    with pytest.raises(ValueError, match=r"^PairReference: embeddings given without labels; pass both or neither$"):
        PairReference(embeddings=e)
    with pytest.raises(ValueError, match=r"^PairReference: labels given without embeddings; pass both or neither$"):
        PairReference(labels=y)
    with pytest.raises(ValueError, match=r"^PairReference.batch_size: expected an integer >= 0, got -1$"):
        PairReference(batch_size=-1)
    with pytest.raises(ValueError, match=r"^PairReference.batch_size: expected an integer >= 0, got True$"):
        PairReference(batch_size=True)
    with pytest.raises(ValueError, match=r"^reference.embeddings: expected shape \[M, 3\] \(the anchors' D\), "
                                         r"got \[5, 2\]$"):
        PairReference(torch.randn(5, 2), torch.zeros(5, dtype=torch.long)).resolve(e, y)
    with pytest.raises(ValueError, match=r"^reference.embeddings: expected shape \[B, D\], got \[5\]$"):
        PairReference(torch.randn(5), torch.zeros(5, dtype=torch.long)).resolve(e, y)
    bad = torch.randn(5, 3)
    bad[4, 1] = math.nan
    with pytest.raises(ValueError, match=r"^reference.embeddings: expected finite values, got nan at index \(4, 1\)$"):
        PairReference(bad, torch.zeros(5, dtype=torch.long)).resolve(e, y)
    with pytest.raises(ValueError, match=r"^reference.labels: expected shape \[5\] \(one label per embedding\), "
                                         r"got \[4\]$"):
        PairReference(torch.randn(5, 3), torch.zeros(4, dtype=torch.long)).resolve(e, y)
    with pytest.raises(TypeError, match=r"^reference.labels: expected an integer dtype"):
        PairReference(torch.randn(5, 3), torch.zeros(5)).resolve(e, y)
    ref = (torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^reference.self_index: expected shape \[4\] \(one column per anchor\), "
                                         r"got \[3\]$"):
        PairReference(*ref, self_index=torch.tensor([0, 1, 2])).resolve(e, y)
    with pytest.raises(ValueError, match=r"^reference.self_index: expected shape \[4\].*got list$"):
        PairReference(*ref, self_index=[0, 1, 2, 3]).resolve(e, y)
    with pytest.raises(TypeError, match=r"^reference.self_index: expected an integer dtype, got torch.float32$"):
        PairReference(*ref, self_index=torch.zeros(4)).resolve(e, y)
    with pytest.raises(ValueError, match=r"^reference.self_index: expected values in \[-1, 4\], got 5$"):
        PairReference(*ref, self_index=torch.tensor([0, 1, 5, -1])).resolve(e, y)
    with pytest.raises(ValueError, match=r"^reference.self_index: expected values in \[-1, 4\], got -2$"):
        PairReference(*ref, self_index=torch.tensor([0, 1, -2, -1])).resolve(e, y)
    with pytest.raises(ValueError, match=r"^reference.self_index: expected shape \[4\]"):
        PairReference(self_index=torch.tensor([0])).resolve(e, y)


# ---------------------------------------------------------------- PreferenceBatch

def _logps(b=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(b, generator=g, dtype=torch.float64) * 5 + 0.1).to(dtype) for _ in range(4)]

NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def test_preference_batch_fields_and_compute_dtype():
    ts = _logps()
    pb = PreferenceBatch(*ts)
    assert pb.batch == 3 and not pb.has_lengths and pb.logps == tuple(ts)
    assert pb.out_dtype == torch.float32 and pb.compute_dtype == torch.float32
    for a, t in zip((pb.pc, pb.pr, pb.rc, pb.rr), ts):
        assert torch.equal(a, t)
    for dt, ct in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        pb = PreferenceBatch(*_logps(dtype=dt))
        assert pb.out_dtype == dt and pb.compute_dtype == ct and pb.pc.dtype == ct
    pb = PreferenceBatch(*_logps(dtype=torch.float64), [3, 4, 5], torch.tensor([1, 2, 3]))
    assert pb.has_lengths
    assert pb.chosen_lengths.dtype == torch.float64 and pb.chosen_lengths.tolist() == [3.0, 4.0, 5.0]
    assert pb.rejected_lengths.tolist() == [1.0, 2.0, 3.0]
    assert PreferenceBatch(*_logps(0)).batch == 0


@pytest.mark.parametrize("i", range(4))
def test_preference_batch_names_the_tensor(i):
    name = NAMES[i]
    ts = _logps()
    ts[i] = [-1.0, -2.0, -3.0]
    with pytest.raises(TypeError, match=rf"^{name}: expected a torch.Tensor of shape \[B\].*got list$"):
        PreferenceBatch(*ts)
    ts = _logps()
    ts[i] = ts[i][:, None]
    with pytest.raises(ValueError, match=rf"^{name}: expected shape \[B\].*got \[3, 1\]; sum the per-token"):
        PreferenceBatch(*ts)
    ts = _logps()
    ts[i] = torch.ones(3, dtype=torch.long)
    with pytest.raises(TypeError, match=rf"^{name}: expected a floating-point tensor, got dtype torch.int64$"):
        PreferenceBatch(*ts)
    for bad in (math.nan, math.inf, -math.inf):
        ts = _logps()
        ts[i][1] = bad
        with pytest.raises(ValueError, match=rf"^{name}: expected finite log-probabilities, got .* at index 1 "
                                             r"\(a -inf usually means"):
            PreferenceBatch(*ts)


@pytest.mark.parametrize("i", range(1, 4))
def test_preference_batch_shape_and_device_mismatch_names_the_second(i):
    ts = _logps()
    ts[i] = _logps(4)[i]
    with pytest.raises(ValueError, match=rf"^{NAMES[i]}: expected shape \[3\] \(the batch of policy_chosen_logps\), "
                                         r"got \[4\]$"):
        PreferenceBatch(*ts)
    ts = _logps()
    ts[i] = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match=rf"^{NAMES[i]}: expected device cpu \(policy_chosen_logps' device\), "
                                         r"got meta$"):
        PreferenceBatch(*ts)


def test_preference_batch_lengths():
    ts = _logps()
    with pytest.raises(ValueError, match=r"^chosen_lengths: given without rejected_lengths; pass the token counts of both"):
        PreferenceBatch(*ts, chosen_lengths=torch.ones(3))
    with pytest.raises(ValueError, match=r"^rejected_lengths: given without chosen_lengths"):
        PreferenceBatch(*ts, rejected_lengths=torch.ones(3))
    with pytest.raises(ValueError, match=r"^rejected_lengths: expected shape \[3\] \(completion length of each pair\), "
                                         r"got \[2\]$"):
        PreferenceBatch(*ts, torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match=r"^chosen_lengths: expected positive finite lengths \(token counts\), "
                                         r"got min 0\.0$"):
        PreferenceBatch(*ts, torch.tensor([1, 0, 2]), torch.ones(3))
    with pytest.raises(ValueError, match=r"^rejected_lengths: expected positive finite lengths.*got min -1\.0$"):
        PreferenceBatch(*ts, torch.ones(3), torch.tensor([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match=r"^chosen_lengths: expected positive finite lengths"):
        PreferenceBatch(*ts, torch.tensor([1.0, math.inf, 2.0]), torch.ones(3))
