"""core/reduction.py: the one reduction, its row-coefficient twin and the
empty-batch zero."""

from __future__ import annotations

import pytest
import torch

from losskit.core.reduction import reduce_loss, row_coefficients, zero_with_graph


def _lw(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64) * 3, torch.rand(n, generator=g, dtype=torch.float64) * 2


def test_none_sum_mean_without_weights():
    l = torch.tensor([1.0, 2.0, 4.0])
    assert torch.equal(reduce_loss(l, "none"), l)
    assert reduce_loss(l, "sum").item() == 7.0
    assert reduce_loss(l, "mean").item() == pytest.approx(7.0 / 3)


def test_weights_multiply_rows_and_still_count_in_the_mean():
    l, w = _lw()
    w[1] = 0.0
    torch.testing.assert_close(reduce_loss(l, "none", w), w * l)
    torch.testing.assert_close(reduce_loss(l, "sum", w), (w * l).sum())
    torch.testing.assert_close(reduce_loss(l, "mean", w), (w * l).sum() / 5)  # N = B, zero weight counted


@pytest.mark.parametrize("den", [2, 2.5, torch.tensor(4.0, dtype=torch.float64)])
def test_mean_with_a_denominator(den):
    l, w = _lw()
    n = float(den)
    torch.testing.assert_close(reduce_loss(l, "mean", denominator=den), l.sum() / n)
    torch.testing.assert_close(reduce_loss(l, "mean", w, denominator=den), (w * l).sum() / n)
    # the denominator is only the mean's
    torch.testing.assert_close(reduce_loss(l, "sum", w, denominator=den), (w * l).sum())
    torch.testing.assert_close(reduce_loss(l, "none", w, denominator=den), w * l)


@pytest.mark.parametrize("den", [0, 0.25, torch.tensor(0.0)])
def test_denominators_below_one_count_as_one(den):
    l, _ = _lw()
    torch.testing.assert_close(reduce_loss(l, "mean", denominator=den), l.sum())


def test_mean_gradient_goes_through_a_tensor_denominator():
    l = torch.tensor([1.0, 3.0], requires_grad=True)
    n = torch.tensor(4.0, requires_grad=True)
    out = reduce_loss(l, "mean", denominator=n)
    out.backward()
    torch.testing.assert_close(l.grad, torch.full((2,), 0.25))
    torch.testing.assert_close(n.grad, torch.tensor(-4.0 / 16))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_is_a_zero_connected_to_the_graph(reduction):
    x = torch.zeros(0, 3, requires_grad=True)
    per = (x * 2).sum(1)
    out = reduce_loss(per, reduction, torch.zeros(0))
    assert out.shape == ((0,) if reduction == "none" else ())
    assert torch.isfinite(out).all() and out.requires_grad
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 3)


def test_weights_are_validated_unless_checked():
    l = torch.ones(3)
    with pytest.raises(ValueError, match=r"sample_weight: expected values >= 0"):
        reduce_loss(l, "mean", torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match=r"sample_weight: expected shape \[3\]"):
        reduce_loss(l, "sum", torch.ones(2))
    # checked=True: the caller validated already (once per call); nothing is read again
    assert reduce_loss(l, "sum", torch.tensor([1.0, -1.0, 1.0]), checked=True).item() == 1.0


def test_weights_are_cast_to_the_loss_dtype():
    l = torch.ones(2, dtype=torch.float64)
    out = reduce_loss(l, "none", torch.tensor([1, 2]))
    assert out.dtype == torch.float64 and out.tolist() == [1.0, 2.0]


def test_bad_reduction_and_shape():
    with pytest.raises(ValueError, match=r"reduction: expected one of \('mean', 'sum', 'none'\), got 'avg'"):
        reduce_loss(torch.ones(2), "avg")
    with pytest.raises(ValueError, match=r"loss: expected a per-row loss of shape \[B\], got \[2, 2\]"):
        reduce_loss(torch.ones(2, 2), "mean")
    with pytest.raises(ValueError, match="reduction: expected one of"):
        row_coefficients(3, "avg")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("den", [None, 3, torch.tensor(2.5, dtype=torch.float64)])
def test_row_coefficients_is_the_same_rule(reduction, weighted, den):
    l, w = _lw(6, seed=1)
    w = w if weighted else None
    c = row_coefficients(6, reduction, w, denominator=den, dtype=torch.float64)
    assert c.shape == (6,) and c.dtype == torch.float64
    torch.testing.assert_close((c * l).sum(), reduce_loss(l, reduction, w, denominator=den))


def test_row_coefficients_for_none_are_the_weights():
    _, w = _lw(4)
    torch.testing.assert_close(row_coefficients(4, "none", w, dtype=torch.float64), w)
    assert torch.equal(row_coefficients(4, "none"), torch.ones(4))
    assert row_coefficients(0, "mean").shape == (0,)
    c = row_coefficients(3, "mean", dtype=torch.float16, device="cpu")
    assert c.dtype == torch.float16 and c.device.type == "cpu"


def test_zero_with_graph():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, 2, requires_grad=True)
    z = zero_with_graph(a, None, b)
    assert z.shape == () and z.item() == 0.0 and z.requires_grad
    z.backward()
    assert torch.equal(a.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(2, 2))
    assert not zero_with_graph(torch.ones(2)).requires_grad
    with pytest.raises(ValueError, match="zero_with_graph: expected at least one tensor"):
        zero_with_graph(None)
    with pytest.raises(ValueError, match="zero_with_graph: expected at least one tensor"):
        zero_with_graph()
