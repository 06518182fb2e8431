"""Learning curve of Omniglot 20-way one-shot error for one objective (docs/bench.md, "How close
the objectives get"): the bench's data for ``--train-on all --rotation-classes`` (968 classes, 19,360
images at 28x28), the ``conv4`` network, ``--augment affine``, P x K batches, Adam 1e-3 with a
cosine schedule over STEPS, and the one-shot error on the 20 runs every STEPS/8 steps.

The curve watches the test runs: it shows where training stops paying, and is not used to pick
a step count (the table's budget was fixed by the CPU time this machine has).

    PYTHONPATH=src chrt -i 0 python experiments/omniglot_oneshot_curve.py multi-similarity 1600 20 4 \\
        --data-dir ../shared/datasets/omniglot
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from losskit.bench.model import build_model
from losskit.bench.tasks.embedding import affine, embed
from losskit.core import registry
from losskit.data.omniglot import load_omniglot, load_oneshot_runs, oneshot_error, train_on_background
from losskit.data.samplers import PKSampler
from losskit.data.split import with_rotation_classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("objective")
    ap.add_argument("steps", type=int)
    ap.add_argument("p", type=int, help="classes per batch")
    ap.add_argument("k", type=int, help="images per class in a batch")
    ap.add_argument("--data-dir", default="../shared/datasets/omniglot")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = load_oneshot_runs(args.data_dir, 28)
    data = with_rotation_classes(train_on_background(load_omniglot(args.data_dir, 28), runs))
    x, y, c = data.train_x, data.train_y, len(data.train_classes)
    print(f"{c} classes, {len(y)} images", flush=True)
    net = build_model("conv4", (1, 28, 28), 64, args.seed)
    spec = registry.spec(args.objective, kind="objective")
    kw = {}
    if spec.needs_classes:
        kw["num_classes"] = c
    if "embedding_dim" in spec.required or "embedding_dim" in spec.hparams:
        kw["embedding_dim"] = 64
    loss_fn = registry.get(args.objective, **kw)
    params = list(net.parameters()) + (list(loss_fn.parameters()) if isinstance(loss_fn, nn.Module) else [])
    opt = torch.optim.Adam(params, 1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    sampler = PKSampler(y, args.p, args.k, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.process_time()
    for i in range(1, args.steps + 1):
        net.train()
        idx = torch.from_numpy(sampler.batch())
        loss = loss_fn(net(affine(x[idx], gen)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if i % max(1, args.steps // 8) == 0 or i == args.steps:
            e = oneshot_error(lambda z: embed(net, z, torch.device("cpu")), runs)
            print(f"step {i} loss {loss.item():.3f} oneshot_err {100 * e['oneshot_error']:.1f} "
                  f"cpu {time.process_time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
