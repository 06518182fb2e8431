"""Gathered pair losses on 2 gloo processes (CPU) against one process on the concatenated batch.

One start of two processes runs every case (module-scoped fixture); the
processes are joined with a deadline and killed if they hang.
"""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import losskit
from losskit.distributed.collectives import all_gather_with_grad
from losskit.distributed.gather import DistributedPairLoss

# per-anchor values and embedding gradients, unequal local batches
ROWS = [
    ("multi-similarity", {"lam": 0.5}),
    ("contrastive", {}),
    ("contrastive", {"pair_average": "all"}),
    ("triplet", {"mining": "all"}),
    ("triplet", {"mining": "hard"}),
    ("triplet", {"mining": "semi-hard"}),
    ("tcm", {}),
]
# one DDP optimiser step, equal local batches
STEPS = [
    ("contrastive", {}),
    ("triplet", {"mining": "all"}),
    ("triplet", {"mining": "hard"}),
    ("multi-similarity", {"lam": 0.5}),
    ("tcm", {}),
]
UNEQUAL, EQUAL = [6, 8], [7, 7]
LR = 0.5


def _data(n=14, d=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(6, 4).double()


def _local(sizes, rank):
    return slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))


def _sgd_step(model, loss, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = loss(model(x), y)
    out.backward()
    opt.step()
    return out.detach()


def _worker(rank, world, port, outdir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    x, y = _data()
    res = {}
    sl = _local(UNEQUAL, rank)
    for i, (name, kw) in enumerate(ROWS):
        for red in ("none", "mean"):
            xl = x[sl].clone().requires_grad_(True)
            out = DistributedPairLoss(losskit.get(name, reduction=red, **kw))(xl, y[sl])
            if red == "none":
                out.sum().backward()
                res["rows", i] = (out.detach(), xl.grad.clone())
            else:
                res["mean", i] = out.detach()
    sl = _local(EQUAL, rank)
    for i, (name, kw) in enumerate(STEPS):
        ddp = torch.nn.parallel.DistributedDataParallel(_model())
        out = _sgd_step(ddp, DistributedPairLoss(losskit.get(name, **kw)), x[sl], y[sl])
        res["step", i] = (out, [p.detach().clone() for p in ddp.module.parameters()])
    # the collective itself: d/dt of sum_r (r + 1) * sum(gathered) is 1 + 2 = 3 everywhere
    t = torch.full((UNEQUAL[rank], 2), float(rank + 1), requires_grad=True, dtype=torch.float64)
    g = all_gather_with_grad(t)
    (g * (rank + 1)).sum().backward()
    res["gather"] = (g.detach(), t.grad.clone())
    torch.save(res, os.path.join(outdir, f"r{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(run_gloo):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    return run_gloo(_worker, 2, timeout=180)


@pytest.mark.parametrize("i", range(len(ROWS)))
def test_rows_and_embedding_grads_match_one_process(ranks, i):
    name, kw = ROWS[i]
    x, y = _data()
    xf = x.clone().requires_grad_(True)
    full = losskit.get(name, reduction="none", **kw)(xf, y)
    full.sum().backward()
    (o0, g0), (o1, g1) = ranks[0]["rows", i], ranks[1]["rows", i]
    # each anchor's loss is its single-process value; grads of the summed rank losses are the full grads
    torch.testing.assert_close(torch.cat([o0, o1]), full.detach())
    torch.testing.assert_close(torch.cat([g0, g1]), xf.grad)
    # 'mean' is the mean over each rank's own anchors
    m0, m1 = ranks[0]["mean", i], ranks[1]["mean", i]
    torch.testing.assert_close(m0, full.detach()[:UNEQUAL[0]].mean())
    torch.testing.assert_close(m1, full.detach()[UNEQUAL[0]:].mean())


@pytest.mark.parametrize("i", range(len(STEPS)))
def test_ddp_step_equals_single_process_step(ranks, i):
    name, kw = STEPS[i]
    x, y = _data()
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    full = _sgd_step(model, losskit.get(name, **kw), x, y)
    (l0, p0), (l1, p1) = ranks[0]["step", i], ranks[1]["step", i]
    torch.testing.assert_close((l0 + l1) / 2, full)  # the average of the rank losses is the full loss
    for a, b, c, start in zip(p0, p1, model.parameters(), before):
        assert not torch.equal(c.detach(), start)  # the step moved the parameters
        torch.testing.assert_close(a, c.detach())
        torch.testing.assert_close(b, c.detach())


def test_all_gather_with_grad(ranks):
    for rank in range(2):
        g, grad = ranks[rank]["gather"]
        assert g.shape == (sum(UNEQUAL), 2)
        torch.testing.assert_close(g[: UNEQUAL[0]], torch.ones(UNEQUAL[0], 2, dtype=torch.float64))
        torch.testing.assert_close(grad, torch.full((UNEQUAL[rank], 2), 3.0, dtype=torch.float64))


def test_single_process_wrapper_is_identity_and_errors():
    x, y = _data()
    base = losskit.get("multi-similarity")
    torch.testing.assert_close(DistributedPairLoss(base)(x, y), base(x, y))
    with pytest.raises(TypeError, match="loss"):
        DistributedPairLoss(torch.nn.MSELoss())
    with pytest.raises(TypeError, match="scale_by_world_size: removed"):
        DistributedPairLoss(base, scale_by_world_size=True)
