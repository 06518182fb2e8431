"""Gathered InfoNCE on 2 gloo processes (CPU) against one process on the concatenated batch:
per-row values, gradients of a, b and the learnable logit scale (unequal local batches), dense
and chunked; and one DistributedDataParallel step of two towers (equal local batches)."""

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist

import losskit

SIZES, EQUAL = [5, 7], [6, 6]
CASES = [{"chunk_size": None}, {"chunk_size": 2}, {"chunk_size": 3, "symmetric": False}]


def _data(n=12, d=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


def _towers():
    torch.manual_seed(1)
    return torch.nn.Linear(6, 4).double(), torch.nn.Linear(6, 4).double()


def _rows(loss, a, b):
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    out = loss(a, b)
    out.sum().backward()
    return out.detach(), a.grad, b.grad, loss.logit_scale.grad.clone()


class _TwoTowers(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.fa, self.fb = _towers()
        self.loss = loss

    def forward(self, a, b):
        return self.loss(self.fa(a), self.fb(b))


def _worker(rank, world, port, outdir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    a, b = _data()
    sl = slice(sum(SIZES[:rank]), sum(SIZES[:rank + 1]))
    res = {}
    for i, kw in enumerate(CASES):
        loss = losskit.get("info-nce", gather=True, reduction="none", **kw).double()
        res["rows", i] = _rows(loss, a[sl], b[sl])
    # DDP over both towers and the loss (its logit scale is averaged like any parameter)
    sl = slice(sum(EQUAL[:rank]), sum(EQUAL[:rank + 1]))
    model = _TwoTowers(losskit.get("info-nce", gather=True).double())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    out = ddp(a[sl], b[sl])
    out.backward()
    opt.step()
    res["step"] = (out.detach(), [p.detach().clone() for p in model.parameters()])
    torch.save(res, os.path.join(outdir, f"r{rank}.pt"))


def test_two_processes_equal_one_process(run_gloo):
    res = run_gloo(_worker)
    a, b = _data()
    for i, kw in enumerate(CASES):
        loss = losskit.get("info-nce", reduction="none", **kw).double()
        want = _rows(loss, a, b)
        got = [r["rows", i] for r in res]
        torch.testing.assert_close(torch.cat([g[0] for g in got]), want[0], msg=lambda m: f"{kw} values: {m}")
        torch.testing.assert_close(torch.cat([g[1] for g in got]), want[1], msg=lambda m: f"{kw} grad a: {m}")
        torch.testing.assert_close(torch.cat([g[2] for g in got]), want[2], msg=lambda m: f"{kw} grad b: {m}")
        torch.testing.assert_close(got[0][3] + got[1][3], want[3], msg=lambda m: f"{kw} grad scale: {m}")
    # one DDP step with equal local batches == one process on the concatenated batch
    model = _TwoTowers(losskit.get("info-nce").double())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = model(a, b)
    out.backward()
    opt.step()
    want_params = [p.detach() for p in model.parameters()]
    assert math.isclose(float(res[0]["step"][0] + res[1]["step"][0]) / 2, float(out), rel_tol=1e-10)
    for r in res:
        for p, q in zip(r["step"][1], want_params):
            torch.testing.assert_close(p, q)
