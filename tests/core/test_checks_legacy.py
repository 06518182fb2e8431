import pytest
import torch

from losskit.core.checks import check_labels, check_sample_weight
from losskit.core.reduction import reduce_loss, zero_with_graph


def test_reduce_loss_rules():
    l = torch.tensor([1.0, 2.0, 3.0])
    w = torch.tensor([0.0, 1.0, 2.0])
    assert torch.equal(reduce_loss(l, "none"), l)
    assert reduce_loss(l, "sum").item() == 6.0
    assert reduce_loss(l, "mean").item() == 2.0
    # weighted mean is mean(w * l), as MADPO and GLOW define it
    assert reduce_loss(l, "mean", w).item() == pytest.approx((0 + 2 + 6) / 3)
    assert torch.equal(reduce_loss(l, "none", w), torch.tensor([0.0, 2.0, 6.0]))


def test_empty_batch_is_zero_not_nan():
    x = torch.zeros(0, requires_grad=True)
    out = reduce_loss(x * 2, "mean")
    assert out.item() == 0.0
    out.backward()
    assert x.grad.shape == (0,)


def test_errors_name_argument_shape_and_value():
    with pytest.raises(ValueError, match=r"reduction: expected one of"):
        reduce_loss(torch.ones(2), "avg")
    with pytest.raises(ValueError, match=r"labels: expected shape \[3\].*got \[2\]"):
        check_labels(torch.tensor([0, 1]), 3)
    with pytest.raises(TypeError, match="integer dtype"):
        check_labels(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match=r"values in \[0, 4\].*got 5"):
        check_labels(torch.tensor([0, 5]), 2, num_classes=5)
    with pytest.raises(ValueError, match=">= 0"):
        check_sample_weight(torch.tensor([1.0, -1.0]), 2, torch.ones(2))
    with pytest.raises(ValueError, match="finite"):
        check_sample_weight(torch.tensor([1.0, float("nan")]), 2, torch.ones(2))


def test_zero_with_graph_keeps_graph():
    a = torch.randn(3, requires_grad=True)
    z = zero_with_graph(a)
    z.backward()
    assert z.item() == 0.0 and torch.equal(a.grad, torch.zeros(3))
