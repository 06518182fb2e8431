import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import losskit
from losskit.distributed.gather import DistributedPairLoss, all_gather_with_grad

LOSSES = [
    ("multi-similarity", {"lam": 0.5}, "mean"),
    ("multi-similarity", {"lam": 0.5}, "none"),
    ("contrastive", {}, "mean"),
    ("triplet", {"mining": "hard"}, "mean"),
    ("triplet", {"mining": "semi-hard"}, "sum"),
    ("tcm", {}, "mean"),
]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(14, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (14,), generator=g)
    return x, y


def _sizes():
    return [6, 8]  # unequal local batches on purpose


def _worker(rank, world, port, outdir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y = _data()
    s = _sizes()
    lo, hi = sum(s[:rank]), sum(s[:rank + 1])
    results = {}
    for i, (name, kw, red) in enumerate(LOSSES):
        xl = x[lo:hi].clone().requires_grad_(True)
        loss = DistributedPairLoss(losskit.get(name, reduction=red, **kw))
        out = loss(xl, y[lo:hi])
        (out.sum() if red == "none" else out).backward()
        results[i] = (out.detach(), xl.grad.clone())
    # the raw gather: gradient of sum(gathered * c) for own slice is sum over ranks of c's slice
    t = torch.full((s[rank], 2), float(rank + 1), requires_grad=True, dtype=torch.float64)
    g = all_gather_with_grad(t)
    (g * (rank + 1)).sum().backward()
    results["gather"] = (g.detach(), t.grad.clone())
    torch.save(results, os.path.join(outdir, f"r{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results():
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    with tempfile.TemporaryDirectory() as d:
        # fork: no re-import of torch in the children (spawn takes several seconds per process)
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(_worker, args=(2, _free_port(), d), nprocs=2, join=True, start_method=method)
        return [torch.load(os.path.join(d, f"r{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("i", range(len(LOSSES)))
def test_two_gloo_ranks_match_one_process(two_rank_results, i):
    name, kw, red = LOSSES[i]
    x, y = _data()
    xf = x.clone().requires_grad_(True)
    full = losskit.get(name, reduction=red, **kw)(xf, y)
    (full.sum() if red == "none" else full).backward()
    r0, r1 = two_rank_results[0][i], two_rank_results[1][i]
    if red == "none":
        torch.testing.assert_close(torch.cat([r0[0], r1[0]]), full.detach())
    else:
        # each rank's loss is its true share: the shares add up to the full loss
        torch.testing.assert_close(r0[0] + r1[0], full.detach())
    torch.testing.assert_close(torch.cat([r0[1], r1[1]]), xf.grad)


def test_all_gather_with_grad(two_rank_results):
    s = _sizes()
    for rank in range(2):
        g, grad = two_rank_results[rank]["gather"]
        assert g.shape == (sum(s), 2)
        torch.testing.assert_close(g[: s[0]], torch.ones(s[0], 2, dtype=torch.float64))
        # d/dt of sum_r (r+1) * sum(gathered) = 1 + 2 = 3 for every element of every rank
        torch.testing.assert_close(grad, torch.full((s[rank], 2), 3.0, dtype=torch.float64))


def test_single_process_wrapper_is_identity():
    x, y = _data()
    base = losskit.get("multi-similarity")
    torch.testing.assert_close(DistributedPairLoss(base)(x, y), base(x, y))
    with pytest.raises(TypeError, match="loss"):
        DistributedPairLoss(torch.nn.MSELoss())
