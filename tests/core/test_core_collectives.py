"""distributed/collectives.py: identity in one process; with two gloo
processes, unequal row counts, all_gather_with_grad's forward and backward
and all_reduce_sum.  The processes are always joined (start_processes with
join=True terminates the others when one fails)."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from losskit.distributed import collectives as col

SIZES = [2, 3]  # unequal on purpose
D = 3


def _rows(rank: int) -> torch.Tensor:
    """Rank r's rows: values that say which rank and row they come from."""
    n = SIZES[rank]
    return (torch.arange(n * D, dtype=torch.float64).reshape(n, D) + 100 * (rank + 1))


def _coef(rank: int) -> torch.Tensor:
    """The coefficients rank r puts on the gathered rows in its loss."""
    g = torch.Generator().manual_seed(rank)
    return torch.randn(sum(SIZES), D, generator=g, dtype=torch.float64)


def test_single_process_is_the_identity():
    assert not dist.is_initialized()
    assert col.world() == (1, 0)
    with pytest.raises(RuntimeError, match=r"the sharded head needs torch.distributed initialised "
                                           r"\(dist.init_process_group\) first"):
        col.require_world(what="the sharded head")
    t = torch.randn(4, 2, requires_grad=True)
    assert col.gather_sizes(4, t.device) == [4]
    assert col.all_gather_no_grad(t) is t
    g = col.all_gather_with_grad(t)
    assert g is t
    r = col.all_reduce_sum(t)
    assert r is t
    (g * 3).sum().backward()
    assert torch.equal(t.grad, torch.full((4, 2), 3.0))


def _worker(rank, world, port, outdir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    out = {"world": col.world(), "require": col.require_world()}
    out["sizes"] = col.gather_sizes(SIZES[rank], torch.device("cpu"))
    t = _rows(rank).requires_grad_(True)
    ng = col.all_gather_no_grad(t)
    out["no_grad"] = (ng.detach().clone(), ng.requires_grad)
    g = col.all_gather_with_grad(t)
    (g * _coef(rank)).sum().backward()
    out["gather"] = (g.detach().clone(), t.grad.clone())
    # explicit sizes are used as given (no extra all-gather)
    t2 = _rows(rank).requires_grad_(True)
    g2 = col.all_gather_with_grad(t2, sizes=SIZES)
    out["gather_sizes_given"] = g2.detach().clone()
    x = torch.tensor([float(rank + 1), 10.0 * (rank + 1)], dtype=torch.float64, requires_grad=True)
    y = col.all_reduce_sum(x)
    (y * (rank + 1)).sum().backward()
    out["reduce"] = (y.detach().clone(), x.grad.clone(), x.detach().clone())
    torch.save(out, os.path.join(outdir, f"r{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(run_gloo):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return run_gloo(_worker, 2, timeout=120)


def test_world_and_sizes(two_ranks):
    for rank, out in enumerate(two_ranks):
        assert out["world"] == (2, rank) and out["require"] == (2, rank)
        assert out["sizes"] == SIZES


def test_all_gather_concatenates_unequal_row_counts(two_ranks):
    full = torch.cat([_rows(0), _rows(1)])
    for out in two_ranks:
        ng, needs_grad = out["no_grad"]
        torch.testing.assert_close(ng, full)
        assert not needs_grad
        torch.testing.assert_close(out["gather"][0], full)
        torch.testing.assert_close(out["gather_sizes_given"], full)


def test_all_gather_with_grad_backward_sums_over_ranks_and_returns_own_slice(two_ranks):
    total = _coef(0) + _coef(1)  # d/d(rows) of sum_r sum(gathered * coef_r)
    starts = [0, SIZES[0]]
    for rank, out in enumerate(two_ranks):
        grad = out["gather"][1]
        assert grad.shape == (SIZES[rank], D)
        torch.testing.assert_close(grad, total[starts[rank]:starts[rank] + SIZES[rank]])


def test_all_reduce_sum_forward_and_backward(two_ranks):
    for rank, out in enumerate(two_ranks):
        y, grad, x = out["reduce"]
        torch.testing.assert_close(y, torch.tensor([3.0, 30.0], dtype=torch.float64))
        # each rank's output feeds each rank's loss: grad = sum_r (r + 1) = 3
        torch.testing.assert_close(grad, torch.full((2,), 3.0, dtype=torch.float64))
        torch.testing.assert_close(x, torch.tensor([rank + 1.0, 10.0 * (rank + 1)], dtype=torch.float64))
