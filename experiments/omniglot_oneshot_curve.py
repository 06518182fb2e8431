"""Learning curve of Omniglot 20-way one-shot error for one objective (docs/bench.md, "How close
the objectives get"): the bench's data for ``--train-on all --rotation-classes`` (968 classes, 19,360
images at 28x28), the ``conv4`` network, ``--augment affine``, P x K batches, Adam (1e-3) with a
cosine schedule over STEPS, and the one-shot error on the 20 runs every STEPS/8 steps.

The curve watches the test runs: it shows where training stops paying and which factor helps (one
at a time, one seed: exploration); it is not used to pick a published number.

    PYTHONPATH=src chrt -i 0 python experiments/omniglot_oneshot_curve.py multi-similarity 1600 20 4 \\
        --data-dir ../shared/datasets/omniglot

Options, one factor each: ``--invert`` (strokes = 1, background = 0, as the protonets' loader; the
runs inverted the same way), ``--schedule step`` (the rate halved every ``--halve-every`` steps, as
protonets halve it every 2,000 episodes) or ``constant``, ``--lr``, ``--set NAME=VALUE`` (an
objective hyperparameter), ``--no-affine``, ``--embedding-dim``, ``--image-size`` (28; the
images and the runs resized alike), ``--affine KEY=VALUE`` (a value of the bench's affine
augmentation, e.g. ``p=1.0`` or ``translate_px_at_105=7.5``).  OBJECTIVE ``proto-episode`` (not a
registered objective; defined here) is the prototypical networks' episode loss (Snell et al. 2017,
eq. 2): each P x K batch is a P-way episode, the first K/2 images of a class its support (their mean
embedding the prototype), the other K/2 its queries, cross-entropy over minus the squared
euclidean distances from each query to the P prototypes.  Every evaluation prints the error
of the embedding (``oneshot_err``) and of the pre-projection features (``feat_err``: conv4's
flattened 64 values before its linear layer).  The last line gives the final network's error
three ways: ``plain`` (as above), ``shift`` (test-time augmentation: the mean normalised
embedding of the 9 one-pixel shifts, ``oneshot_error(tta="shift")``) and ``affine16`` (the mean
over the image and 15 random affine views of the bench's augmentation, drawn from a fixed seed).
``--save PATH`` keeps the network's state_dict.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from losskit.bench.labels import parse_literal
from losskit.bench.model import build_model
from losskit.bench.tasks.embedding import affine, embed
from losskit.core import registry
from losskit.data.omniglot import load_omniglot, load_oneshot_runs, oneshot_error, train_on_background
from losskit.data.samplers import PKSampler
from losskit.data.split import with_rotation_classes


def proto_episode(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Prototypical-networks episode loss on a P x K batch (K >= 2; see the module docstring)."""
    classes, inv = torch.unique(y, return_inverse=True)
    order = torch.argsort(inv, stable=True)
    p = len(classes)
    k = len(y) // p
    zc = z[order].view(p, k, -1)
    s = k // 2
    protos = zc[:, :s].mean(1)
    queries = zc[:, s:].reshape(-1, z.shape[1])
    target = torch.arange(p).repeat_interleave(k - s)
    return torch.nn.functional.cross_entropy(-torch.cdist(queries, protos).pow(2), target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("objective")
    ap.add_argument("steps", type=int)
    ap.add_argument("p", type=int, help="classes per batch")
    ap.add_argument("k", type=int, help="images per class in a batch")
    ap.add_argument("--data-dir", default="../shared/datasets/omniglot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--invert", action="store_true", help="strokes = 1, background = 0 (train and runs)")
    ap.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine")
    ap.add_argument("--halve-every", type=int, default=0, help="--schedule step: steps between halvings "
                    "(default STEPS/4)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--no-affine", action="store_true")
    ap.add_argument("--embedding-dim", type=int, default=64)
    ap.add_argument("--evals", type=int, default=8, help="evaluations over the run")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--affine", action="append", default=[], metavar="KEY=VALUE",
                    help="a value of the affine augmentation (keys of bench.tasks.embedding.AFFINE)")
    ap.add_argument("--save", default="", help="write the final network's state_dict here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    size = args.image_size
    aff = {k: parse_literal(v) for k, v in (s.split("=", 1) for s in args.affine)}
    runs = load_oneshot_runs(args.data_dir, size)
    data = with_rotation_classes(train_on_background(load_omniglot(args.data_dir, size), runs))
    x, y, c = data.train_x, data.train_y, len(data.train_classes)
    if args.invert:
        x = 1.0 - x
        for r in runs:
            r.train_x, r.test_x = 1.0 - r.train_x, 1.0 - r.test_x
    print(f"{c} classes, {len(y)} images, mean pixel {float(x.mean()):.3f}; {vars(args)}", flush=True)
    net = build_model("conv4", (1, size, size), args.embedding_dim, args.seed)
    if args.objective == "proto-episode":
        loss_fn = proto_episode
    else:
        spec = registry.spec(args.objective, kind="objective")
        kw = {k: parse_literal(v) for k, v in (s.split("=", 1) for s in args.set)}
        if spec.needs_classes:
            kw["num_classes"] = c
        if "embedding_dim" in spec.required or "embedding_dim" in spec.hparams:
            kw["embedding_dim"] = args.embedding_dim
        loss_fn = registry.get(args.objective, **kw)
    params = list(net.parameters()) + (list(loss_fn.parameters()) if isinstance(loss_fn, nn.Module) else [])
    opt = torch.optim.Adam(params, args.lr)
    if args.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    elif args.schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, args.halve_every or max(1, args.steps // 4), 0.5)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    sampler = PKSampler(y, args.p, args.k, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    cpu = torch.device("cpu")
    t0 = time.process_time()
    for i in range(1, args.steps + 1):
        net.train()
        idx = torch.from_numpy(sampler.batch())
        xb = x[idx] if args.no_affine else affine(x[idx], gen, aff)
        loss = loss_fn(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if i % max(1, args.steps // args.evals) == 0 or i == args.steps:
            e = oneshot_error(lambda z: embed(net, z, cpu), runs)
            f = oneshot_error(lambda z: embed(net.features, z, cpu), runs)
            print(f"step {i} loss {loss.item():.3f} oneshot_err {100 * e['oneshot_error']:.1f} "
                  f"feat_err {100 * f['oneshot_error']:.1f} cpu {time.process_time() - t0:.0f}s", flush=True)
    if args.save:
        torch.save(net.state_dict(), args.save)
    views = torch.Generator().manual_seed(123)

    def affine16(z: torch.Tensor) -> torch.Tensor:
        zs = [nn.functional.normalize(embed(net, z, cpu), dim=1)]
        zs += [nn.functional.normalize(embed(net, affine(z, views, aff), cpu), dim=1) for _ in range(15)]
        return torch.stack(zs).mean(0)

    final = {"plain": oneshot_error(lambda z: embed(net, z, cpu), runs),
             "shift": oneshot_error(lambda z: embed(net, z, cpu), runs, tta="shift"),
             "affine16": oneshot_error(affine16, runs)}
    print("final " + " ".join(f"{k} {100 * v['oneshot_error']:.1f}" for k, v in final.items()), flush=True)


if __name__ == "__main__":
    main()
