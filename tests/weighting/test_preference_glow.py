import io
import math

import pytest
import torch

from losskit.weighting.glow import GLOW


def naive_w(prev, cur, alpha=1.0, beta=20.0, lo=0.5, hi=5.0):
    d = prev - cur
    return min(max(alpha * (1 - 1 / (1 + math.exp(-beta * d))), lo), hi)


def test_first_epoch_uniform_then_gain_weights():
    g = GLOW(alpha=3.0, beta=10.0)
    l0 = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(g.weights(l0, [0, 1, 2]), torch.ones(3))
    g.end_epoch()
    l1 = torch.tensor([0.5, 2.0, 3.4], requires_grad=True)
    w = g.weights(l1, [0, 1, 2])
    exp = [naive_w(1.0, 0.5, 3, 10), naive_w(2.0, 2.0, 3, 10), naive_w(3.0, 3.4, 3, 10)]
    torch.testing.assert_close(w, torch.tensor(exp))
    assert w[1].item() == pytest.approx(1.5)  # D = 0 gives alpha / 2
    assert not w.requires_grad
    # loss = mean(w l); gradient only through l
    g2 = GLOW(alpha=3.0, beta=10.0)
    g2.load_state_dict(g.state_dict())
    g2.pending.clear()
    out = g2(l1, [0, 1, 2])
    out.backward()
    torch.testing.assert_close(l1.grad, torch.tensor(exp) / 3)


def test_unknown_id_falls_back_to_batch_mean():
    g = GLOW()
    g.weights(torch.tensor([1.0]), [0])
    g.end_epoch()
    cur = torch.tensor([0.9, 2.0, 4.0])
    w = g.weights(cur, [0, 7, 8])
    mean = float(cur.mean())
    torch.testing.assert_close(w, torch.tensor([naive_w(1.0, 0.9), naive_w(mean, 2.0), naive_w(mean, 4.0)]))


def test_gradient_accumulation_micro_batches_do_not_see_each_other():
    # sample 5 appears in two micro-batches of the same optimiser step (e.g. a repeat sampler)
    g = GLOW()
    g.weights(torch.tensor([2.0, 2.0, 2.0]), [5, 6, 7])
    g.end_epoch()
    w1 = g.weights(torch.tensor([1.0, 1.5]), [5, 6])
    w2 = g.weights(torch.tensor([1.2, 1.9]), [5, 7])
    # both micro-batches compare against the previous epoch's loss (2.0), not micro-batch 1's 1.0
    torch.testing.assert_close(w2, torch.tensor([naive_w(2.0, 1.2), naive_w(2.0, 1.9)]))
    # order does not matter
    h = GLOW()
    h.weights(torch.tensor([2.0, 2.0, 2.0]), [5, 6, 7])
    h.end_epoch()
    v2 = h.weights(torch.tensor([1.2, 1.9]), [5, 7])
    v1 = h.weights(torch.tensor([1.0, 1.5]), [5, 6])
    torch.testing.assert_close(v1, w1)
    torch.testing.assert_close(v2, w2)
    # after step() the newest staged loss becomes history
    g.step()
    assert g.history[5] == pytest.approx(1.2) and g.history[6] == pytest.approx(1.5)


def test_state_dict_resume_reproduces_weights():
    torch.manual_seed(0)
    a = GLOW(alpha=2.0, beta=5.0)
    ids = list(range(10))
    for _ in range(2):
        a.weights(torch.rand(10), ids)
        a.end_epoch()
    a.weights(torch.rand(5), ids[:5])  # staged, mid-step
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = GLOW()
    b.load_state_dict(torch.load(buf))
    assert (b.alpha, b.beta, b.epoch) == (2.0, 5.0, 2)
    cur = torch.rand(10)
    a.step(); b.step()
    torch.testing.assert_close(b.weights(cur, ids), a.weights(cur, ids))


def test_glow_bad_input():
    g = GLOW()
    with pytest.raises(ValueError, match="sample_ids"):
        g.weights(torch.rand(3), [1, 2])
    with pytest.raises(ValueError, match="losses"):
        g.weights(torch.rand(3, 2), [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        g.weights(torch.tensor([1.0, float("nan")]), [1, 2])
    with pytest.raises(ValueError, match="alpha"):
        GLOW(alpha=0)
    assert g(torch.zeros(0, requires_grad=True), []).item() == 0.0
