"""head='sharded' over 2 gloo processes (CPU) against one process on the
concatenated batch: a DistributedDataParallel backbone with the sharded
head takes the same optimiser step (backbone and head weights, gradients
and updated parameters), with no multiply by the world size anywhere;
reduction='none' gives the rank's own rows (unequal row counts too)."""

import os

import pytest
import torch
import torch.distributed as dist

import losskit

C, D_IN, D = 11, 5, 6
EQUAL = [4, 4]
UNEQUAL = [3, 5]
LR = 0.5
CASES = [
    ("arcface", {}),
    ("cosface", {"scale": 16.0}),
    ("cfcd", {"alpha": 0.1}),
    ("unpg", {"whisker": 1.0, "scale": 16.0}),
    ("elastic-arcface", {"plus": True, "scale": 16.0}),
]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (8,), generator=g)
    y[3] = -1                                       # an ignored row on rank 0
    w = torch.rand(8, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    lin = torch.nn.Linear(D_IN, D).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(D, D_IN, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(D, generator=g, dtype=torch.float64))
    return x, y, w, W, lin


def _step(backbone, head, params, x, y, w):
    opt = torch.optim.SGD(params, lr=LR)
    opt.zero_grad()
    torch.manual_seed(123)                          # ElasticFace draws: same on both sides
    loss = head(backbone(x), y, sample_weight=w)
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    opt.step()
    return loss.detach(), grads, [p.detach().clone() for p in params]


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y, w, W, lin0 = _data()
    res = {}
    for name, kw in CASES:
        lo = sum(EQUAL[:rank])
        sl = slice(lo, lo + EQUAL[rank])
        backbone = torch.nn.parallel.DistributedDataParallel(_copy(lin0))
        head = losskit.get(name, num_classes=C, embedding_dim=D, head="sharded", chunk_size=3, **kw).double()
        head.weight.data.copy_(W[head.class_offset:head.class_offset + head.weight.shape[0]])
        params = list(backbone.parameters()) + [head.weight]
        res[name] = (*_step(backbone, head, params, x[sl], y[sl], w[sl]), head.class_offset)
        # reduction='none' with unequal rows per rank: the rank's own rows
        lo = sum(UNEQUAL[:rank])
        sl = slice(lo, lo + UNEQUAL[rank])
        head.weight.data.copy_(W[head.class_offset:head.class_offset + head.weight.shape[0]])
        torch.manual_seed(123)
        res[name + "/none"] = head(lin0(x[sl]).detach(), y[sl], reduction="none").detach()
    torch.save(res, os.path.join(out_dir, f"r{rank}.pt"))


def _copy(lin):
    out = torch.nn.Linear(D_IN, D).double()
    out.load_state_dict(lin.state_dict())
    return out


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_sharded_head_with_ddp_backbone_takes_the_single_process_step(run_gloo):
    r = run_gloo(_worker, 2, timeout=120)
    x, y, w, W, lin0 = _data()
    for name, kw in CASES:
        backbone = _copy(lin0)
        head = losskit.get(name, num_classes=C, embedding_dim=D, head="dense", **kw).double()
        head.weight.data.copy_(W)
        params = list(backbone.parameters()) + [head.weight]
        loss, grads, after = _step(backbone, head, params, x, y, w)
        # each rank's loss is the mean over its own rows; their average is the single-process mean
        torch.testing.assert_close((r[0][name][0] + r[1][name][0]) / 2, loss, msg=name)
        split = r[1][name][3]
        assert r[0][name][3] == 0 and split == r[0][name][2][-1].shape[0]
        for k in range(2):
            for a, b in zip(r[k][name][1][:2], grads[:2]):        # DDP-averaged backbone gradients
                torch.testing.assert_close(a, b, msg=f"{name} backbone grad rank {k}")
            for a, b in zip(r[k][name][2][:2], after[:2]):        # the same step
                torch.testing.assert_close(a, b, msg=f"{name} backbone step rank {k}")
        gw = torch.cat([r[0][name][1][2], r[1][name][1][2]])
        torch.testing.assert_close(gw, grads[2], msg=f"{name} head weight grad")
        wa = torch.cat([r[0][name][2][2], r[1][name][2][2]])
        torch.testing.assert_close(wa, after[2], msg=f"{name} head weight step")
        # reduction='none': [B_local] aligned with the rank's rows, 0 on the ignored row
        torch.manual_seed(123)
        head.weight.data.copy_(W)
        per = head(lin0(x).detach(), y, reduction="none").detach()
        torch.testing.assert_close(torch.cat([r[0][name + "/none"], r[1][name + "/none"]]), per, msg=name)
        assert r[0][name + "/none"].shape == (UNEQUAL[0],) and per[3] == 0
