"""FRUGAL under torch.distributed (2 gloo processes): every rank picks the same
subspace, and DDP training with FRUGAL equals one process on the whole batch."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from losskit.optim import FRUGAL, frugal_param_groups

PROJ = ("blockwise", "svd", "random", "randperm", "randk")
STEPS = 5
N = 16


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batch(t):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(N, 6, generator=g, dtype=torch.float64), torch.randn(N, 3, generator=g, dtype=torch.float64)


def _run(projection, rank=0, world=1):
    model = _model()
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = FRUGAL(frugal_param_groups(model, output_head=None), lr=1e-2, rho=0.5, projection=projection,
                 update_gap=2, block_order="random", seed=3)
    for t in range(STEPS):
        x, y = _batch(t)
        sl = slice(rank * N // world, (rank + 1) * N // world)
        opt.zero_grad()
        ((net(x[sl]) - y[sl]) ** 2).mean().backward()
        opt.step()
    subspaces = [opt.state[p].get("subspace", {}).get("basis", opt.state[p].get("subspace", {}).get("index"))
                 for p in model.parameters()]
    active = [opt.state[p].get("active") for p in model.parameters()]
    return [p.detach().clone() for p in model.parameters()], subspaces, active


def _local_grad_subspace(rank):
    """SVD subspaces from gradients that differ between ranks (no DDP): rank 0's wins."""
    torch.manual_seed(10 + rank)
    w = nn.Parameter(torch.randn(8, 6, dtype=torch.float64))
    opt = FRUGAL([w], rho=0.5, projection="svd")
    w.grad = torch.randn(8, 6, dtype=torch.float64)
    opt.step()
    return opt.state[w]["subspace"]["basis"].clone()


def _worker(rank, world, port, outdir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    res = {p: _run(p, rank, world) for p in PROJ}
    res["local"] = _local_grad_subspace(rank)
    torch.save(res, os.path.join(outdir, f"r{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(run_gloo):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    return run_gloo(_worker, 2, timeout=180)


@pytest.mark.parametrize("projection", PROJ)
def test_two_processes_equal_one_process(ranks, projection):
    single, sub1, act1 = _run(projection)
    for r in range(2):
        params, subs, active = ranks[r][projection]
        assert active == act1, "the same blocks are active on every rank"
        for s, s1 in zip(subs, sub1):
            assert (s is None) == (s1 is None)
            if s is not None:
                torch.testing.assert_close(s.double(), s1.double(), rtol=1e-9, atol=1e-9)
        for p, q in zip(params, single):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)
    for s0, s1 in zip(ranks[0][projection][1], ranks[1][projection][1]):
        if s0 is not None:
            assert torch.equal(s0, s1), "every rank holds the identical subspace"


def test_svd_subspace_is_rank_zero_s_even_when_gradients_differ(ranks):
    assert torch.equal(ranks[0]["local"], ranks[1]["local"])
    assert not torch.equal(ranks[0]["local"], _local_grad_subspace(1)), "rank 1's own SVD was different"
