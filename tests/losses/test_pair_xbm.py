import pytest
import torch

import losskit
from losskit.core.context import PairReference
from losskit.functional.multi_similarity import multi_similarity_loss
from losskit.losses.xbm import CrossBatchMemory


def _batch(seed, B=8, D=6, C=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=torch.float64), torch.randint(0, C, (B,), generator=g)


def test_xbm_matches_loss_against_queue():
    xbm = CrossBatchMemory(losskit.get("multi-similarity", lam=0.5), memory_size=12)
    x1, y1 = _batch(0)
    out1 = xbm(x1, y1)
    # first step: the memory holds only this batch (detached), so both terms have the same value
    torch.testing.assert_close(out1, 2 * multi_similarity_loss(x1, y1, lam=0.5))
    x2, y2 = _batch(1)
    x2.requires_grad_(True)
    out2 = xbm(x2, y2)
    # 8 + 8 = 16 > 12 slots: x2[:4] fills slots 8..11, x2[4:] wraps to slots 0..3
    mem = torch.cat([x2[4:].detach(), x1[4:], x2[:4].detach()])
    mem_labels = torch.cat([y2[4:], y1[4:], y2[:4]])
    self_index = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3])
    want = multi_similarity_loss(x2, y2, lam=0.5) + multi_similarity_loss(
        x2, y2, lam=0.5, reference=PairReference(mem, mem_labels, self_index=self_index))
    torch.testing.assert_close(out2, want)
    torch.testing.assert_close(xbm.memory, mem)
    assert xbm.filled == 12 and xbm.ptr == 4
    out2.backward()
    assert torch.isfinite(x2.grad).all() and not xbm.memory.requires_grad


def test_xbm_matches_pml_cross_batch_memory():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses, miners

    ref = losses.CrossBatchMemory(losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), embedding_size=6,
                                  memory_size=20, miner=miners.MultiSimilarityMiner(0.1))
    ours = CrossBatchMemory(losskit.get("multi-similarity", lam=0.5), memory_size=20, include_batch_loss=False)
    for seed in range(4):
        x, y = _batch(seed)
        x = x.float()
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        lo, lp = ours(xa, y), ref(xb, y)
        lo.backward()
        lp.backward()
        torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)


def test_xbm_warmup_eval_and_errors():
    xbm = CrossBatchMemory("contrastive", memory_size=16, start_iteration=1)
    x, y = _batch(2)
    torch.testing.assert_close(xbm(x, y), losskit.get("contrastive")(x, y))  # warm-up: no memory term
    assert xbm.filled == 0
    xbm(x, y)
    assert xbm.filled == 8
    xbm.eval()
    xbm(x, y)
    assert xbm.filled == 8  # eval mode leaves the queue alone
    with pytest.raises(ValueError, match="memory_size"):
        CrossBatchMemory("triplet", memory_size=0)
    with pytest.raises(TypeError, match="loss"):
        CrossBatchMemory(torch.nn.MSELoss())
    xbm.train()
    with pytest.raises(ValueError, match="memory_size"):
        CrossBatchMemory("triplet", memory_size=4)(*_batch(3))
    # one sample per class in an empty queue: zero loss, graph alive
    xz = torch.randn(3, 6, requires_grad=True)
    out = CrossBatchMemory("multi-similarity", memory_size=8)(xz, torch.arange(3))
    out.backward()
    assert out.item() == 0.0


@pytest.mark.parametrize("wrapped", [False, True])
def test_xbm_state_dict_round_trip_into_a_fresh_module(wrapped):
    def build():
        return CrossBatchMemory("multi-similarity", memory_size=12, start_iteration=1, loss_kwargs={"lam": 0.5})

    trained = build()
    for seed in range(3):  # warm-up step, then fill and wrap the ring (8 + 8 > 12)
        trained(*_batch(seed))
    assert (trained.ptr, trained.filled, trained.iteration) == (4, 12, 3)
    state = trained.state_dict()
    fresh = build()
    if wrapped:  # inside a model: the prefix is handled too
        outer_t, outer_f = torch.nn.ModuleDict({"xbm": trained}), torch.nn.ModuleDict({"xbm": build()})
        outer_f.load_state_dict(outer_t.state_dict())
        fresh = outer_f["xbm"]
    else:
        fresh.load_state_dict(state)
    assert (fresh.ptr, fresh.filled, fresh.iteration) == (4, 12, 3)
    torch.testing.assert_close(fresh.memory, trained.memory)
    torch.testing.assert_close(fresh.memory_labels, trained.memory_labels)
    for seed in range(3, 6):  # continuing gives identical outputs and state
        x, y = _batch(seed)
        torch.testing.assert_close(fresh(x, y), trained(x, y))
    torch.testing.assert_close(fresh.memory, trained.memory)
    assert (fresh.ptr, fresh.filled, fresh.iteration) == (trained.ptr, trained.filled, trained.iteration)


def test_xbm_state_dict_errors():
    trained = CrossBatchMemory("contrastive", memory_size=12)
    trained(*_batch(0))
    with pytest.raises(ValueError, match=r"memory: expected a saved queue of shape \[8, D\]"):
        CrossBatchMemory("contrastive", memory_size=8).load_state_dict(trained.state_dict())
    bad = trained.state_dict()
    bad["_extra_state"] = {"ptr": 99, "filled": 8, "iteration": 1}
    with pytest.raises(ValueError, match="ptr: expected an integer in"):
        CrossBatchMemory("contrastive", memory_size=12).load_state_dict(bad)
    # an untrained memory round-trips too (empty queue)
    fresh = CrossBatchMemory("contrastive", memory_size=12)
    fresh.load_state_dict(CrossBatchMemory("contrastive", memory_size=12).state_dict())
    assert fresh.memory.numel() == 0 and fresh.filled == 0
