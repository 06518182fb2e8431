import math

import pytest
import torch

import losskit


def naive_softmax_ce(x, W, b, y):
    # -log( exp(w_y.x + b_y) / sum_j exp(w_j.x + b_j) ), one sample at a time
    out = []
    for i in range(x.shape[0]):
        z = [float(W[j] @ x[i] + b[j]) for j in range(W.shape[0])]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        out.append(lse - z[int(y[i])])
    return torch.tensor(out, dtype=torch.float64)


def test_softmax_matches_naive_and_reductions():
    torch.manual_seed(0)
    m = losskit.get("softmax", num_classes=5, embedding_dim=7, reduction="none").double()
    x = torch.randn(6, 7, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    ref = naive_softmax_ce(x, m.linear.weight.detach(), m.linear.bias.detach(), y)
    torch.testing.assert_close(m(x, y), ref)
    w = torch.rand(6, dtype=torch.float64)
    m.reduction = "mean"
    torch.testing.assert_close(m(x, y, sample_weight=w), (ref * w).mean())


def test_softmax_gradcheck_and_bf16():
    torch.manual_seed(0)
    m = losskit.get("softmax", num_classes=4, embedding_dim=3).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    assert torch.autograd.gradcheck(lambda e: m(e, y), (x,))
    mb = losskit.get("softmax", num_classes=4, embedding_dim=3)
    out = mb(torch.randn(5, 3).bfloat16() * 1e3, y)
    assert torch.isfinite(out.float())


def test_softmax_bad_input():
    m = losskit.get("softmax", num_classes=4, embedding_dim=3)
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        m(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        m(torch.randn(2, 3), torch.tensor([0, 9]))
    out = m(torch.randn(0, 3, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert out.item() == 0.0
