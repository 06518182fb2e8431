"""head='sharded' over 2 gloo processes matches one process (loss and gradients)."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import losskit

B_LOCAL, C, D = 4, 11, 6
CASES = [
    ("arcface", {}),
    ("cosface", {}),
    ("cfcd", {"alpha": 0.1}),
    ("unpg", {"whisker": 1.0}),
    ("elastic-arcface", {"plus": True}),
]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * B_LOCAL, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (2 * B_LOCAL,), generator=g)
    y[3] = -1
    w = torch.rand(2 * B_LOCAL, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    return x, y, w, W


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, y, w, W = _data()
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        res = {}
        for name, kw in CASES:
            m = losskit.get(name, num_classes=C, embedding_dim=D, head="sharded", chunk_size=3, **kw).double()
            lo = m.class_offset
            m.weight.data.copy_(W[lo:lo + m.weight.shape[0]])
            xl = x[sl].clone().requires_grad_(True)
            torch.manual_seed(123)
            loss = m(xl, y[sl], sample_weight=w[sl])
            loss.backward()
            res[name] = (loss.detach(), xl.grad, m.weight.grad, lo)
        torch.save(res, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_sharded_two_gloo_processes_match_single_process():
    with tempfile.TemporaryDirectory() as d:
        # fork: no re-import of torch in the children (spawn costs ~10 s on 2 shared cores)
        mp.start_processes(_worker, args=(2, _free_port(), d), nprocs=2, join=True, start_method="fork")
        r0, r1 = torch.load(os.path.join(d, "r0.pt")), torch.load(os.path.join(d, "r1.pt"))
    x, y, w, W = _data()
    for name, kw in CASES:
        m = losskit.get(name, num_classes=C, embedding_dim=D, head="dense", **kw).double()
        m.weight.data.copy_(W)
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(123)
        loss = m(xx, y, sample_weight=w)
        loss.backward()
        for r in (r0, r1):
            torch.testing.assert_close(r[name][0], loss.detach(), msg=name)
        gx = torch.cat([r0[name][1], r1[name][1]])
        torch.testing.assert_close(gx, xx.grad, msg=name)
        gw = torch.cat([r0[name][2], r1[name][2]])
        assert r0[name][3] == 0 and r1[name][3] == r0[name][2].shape[0]
        torch.testing.assert_close(gw, m.weight.grad, msg=name)
