"""Optimisers and schedules on a small character-level transformer language model.

Corpus (on every machine, no download): the docstrings of a fixed list of
Python standard-library modules (module, then every public class, function and
method in sorted order, ``inspect.getdoc``), ASCII printable characters and
newlines only.  The text depends on the Python version; the script prints its
length, its SHA-256 and the version.  90% train / 10% validation (contiguous).

Model: 2 pre-norm transformer blocks (d 64, 4 heads, MLP 256, context 64),
token and position embeddings, a separate output head; every q/k/v/o and MLP
weight is an ``nn.Linear`` (the 12 projectable matrices), embeddings, norms and
the head stay on AdamW under FRUGAL.  Batch 32, ``--steps`` steps (default 400),
linear warmup 20 then linear decay, the same initialisation and batches for
every optimiser.  Validation loss on 40 fixed batches at the end.

Contenders (``--contenders``): adamw (lr 3e-3, wd 0), frugal-block and
frugal-svd (rho 0.25, signSGD residual, lr 3e-3, update gap ``--update-gap``,
default 50), galore (pytorch-optimizer's GaLore at the same memory: rank 16 =
0.25 x 64 on the same matrices, scale 0.25, lr 1e-2 as in the FRUGAL
repository's GaLore baseline, ``pip install 'losskit[optim-compare]'``), sgd
(momentum 0.9, lr 0.3).  The schedule study (``--schedules``) trains AdamW
with cosine, linear decay and the refined schedule built from the linear-decay
run's recorded L1 gradient norms.

State bytes are measured from the optimiser's state tensors
(``losskit.optim.optimizer_state_bytes``, plus GaLore's projector matrices),
the maximum over the steps (blockwise FRUGAL's changes with the active blocks);
step time (the whole training step) and ``opt.step`` time (the optimiser's
step alone, where the optimisers differ) are means over all steps (so they
average over the update gap), as ratios to AdamW's in the same process; the contenders of a seed train in
lockstep (one step of each in turn), so that a busy machine slows them alike.
Each ``--threads`` value is one table; run one value per invocation to keep
each invocation short (about 2 minutes per value at the defaults on an idle
2-core machine).  ``--state-table`` prints the state bytes that
``losskit.optim.frugal_state_bytes`` gives from the parameter split for this
model and three larger ones (no training).

    PYTHONPATH=src python benchmarks/optim_charlm.py --threads 1 0
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import sys
import time

import torch
from torch import nn

MODULES = ("argparse", "collections", "difflib", "functools", "inspect", "json", "logging", "pathlib", "re",
           "shutil", "string", "textwrap", "typing", "unittest", "zipfile", "tarfile", "calendar", "fractions",
           "statistics", "heapq", "itertools", "operator", "pprint", "csv", "configparser", "datetime")
CTX, D, HEADS, LAYERS, MLP, BATCH, WARMUP = 64, 64, 4, 2, 256, 32, 20


def corpus() -> str:
    parts = []
    for name in MODULES:
        mod = importlib.import_module(name)
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr in sorted(n for n in dir(mod) if not n.startswith("_")):
            obj = getattr(mod, attr, None)
            if getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                d = inspect.getdoc(obj)
                if d:
                    parts.append(d)
                if inspect.isclass(obj):
                    for m in sorted(vars(obj)):
                        f = vars(obj)[m]
                        if not m.startswith("_") and inspect.isfunction(f) and f.__doc__:
                            parts.append(inspect.getdoc(f))
    text = "\n\n".join(parts)
    return "".join(c for c in text if c == "\n" or 32 <= ord(c) < 127)


class Block(nn.Module):
    def __init__(self, d=D, heads=HEADS, mlp=MLP):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.n1(x)
        q, k, v = (f(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.nn.functional.gelu(self.up(self.n2(x))))


class CharLM(nn.Module):
    def __init__(self, vocab, d=D, layers=LAYERS, mlp=MLP, heads=HEADS, ctx=CTX):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def batches(data, n, seed):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - CTX - 1, (n, BATCH), generator=g)
    for s in starts:
        idx = s[:, None] + torch.arange(CTX + 1)[None]
        yield data[idx]


def projected_linears(model):
    return [m.weight for b in model.blocks for m in (b.q, b.k, b.v, b.o, b.up, b.down)]


def make_optimizer(name, model, update_gap):
    from losskit.optim import FRUGAL, frugal_param_groups

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, foreach=False)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    if name.startswith("frugal"):
        proj = "blockwise" if name == "frugal-block" else "svd"
        return FRUGAL(frugal_param_groups(model), lr=3e-3, rho=0.25, projection=proj, update_gap=update_gap,
                      weight_decay=0.0)
    if name == "galore":
        try:
            from pytorch_optimizer import GaLore
        except ImportError:
            return None
        proj = {id(p) for p in projected_linears(model)}
        rest = [p for p in model.parameters() if id(p) not in proj]
        return GaLore([{"params": rest},
                       {"params": projected_linears(model), "rank": 16, "update_proj_gap": update_gap,
                        "scale": 0.25, "projection_type": "std"}], lr=1e-2, weight_decay=0.0, eps=1e-8)
    raise ValueError(name)


def state_bytes(opt):
    from losskit.optim import optimizer_state_bytes

    total = optimizer_state_bytes(opt)
    for s in opt.state.values():  # GaLore keeps its projection matrix on a Python object
        pr = s.get("projector") if isinstance(s, dict) else None
        if pr is not None and not isinstance(pr, torch.Tensor):
            for v in vars(pr).values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
    return total


class Run:
    """One contender's training: model, optimiser, schedule, batches; ``step()`` is timed by the caller."""

    def __init__(self, name, train_ids, vocab, steps, seed, update_gap, schedule="linear-decay", grad_norms=None):
        from losskit.optim import GradNormRecorder, LinearDecayLR, RefinedLR

        torch.manual_seed(seed)
        self.vocab, self.steps = vocab, steps
        self.model = CharLM(vocab)
        self.opt = opt = make_optimizer(name, self.model, update_gap)
        if opt is None:
            return
        if schedule == "linear-decay":
            self.sched = LinearDecayLR(opt, total_steps=steps, warmup_steps=WARMUP)
        elif schedule == "cosine":
            warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) / (WARMUP + 1) if t < WARMUP else 1.0)
            cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - WARMUP - 1)
            self.sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[WARMUP])
        else:
            self.sched = RefinedLR(opt, grad_norms, total_steps=steps, warmup_steps=WARMUP, base="adam")
        self.rec = GradNormRecorder(opt)
        self.batches = batches(train_ids, steps, seed + 1)
        self.lossf = nn.CrossEntropyLoss()
        self.t_step, self.t_opt, self.peak = 0.0, 0.0, 0

    def step(self):
        xy = next(self.batches)
        t0 = time.perf_counter()
        self.opt.zero_grad()
        logits = self.model(xy[:, :-1])
        loss = self.lossf(logits.reshape(-1, self.vocab), xy[:, 1:].reshape(-1))
        loss.backward()
        t1 = time.perf_counter()
        self.opt.step()
        self.t_opt += time.perf_counter() - t1
        self.sched.step()
        self.t_step += time.perf_counter() - t0
        self.peak = max(self.peak, state_bytes(self.opt))

    def result(self, val_ids):
        self.model.eval()
        with torch.no_grad():
            vals = [float(self.lossf(self.model(xy[:, :-1]).reshape(-1, self.vocab), xy[:, 1:].reshape(-1)))
                    for xy in batches(val_ids, 40, 12345)]
        return {"val_loss": sum(vals) / len(vals), "state_bytes": self.peak, "step_ms": 1e3 * self.t_step / self.steps,
                "opt_ms": 1e3 * self.t_opt / self.steps, "grad_norms_l1": self.rec.norms("l1")}


def train_lockstep(specs, text_ids, vocab, steps, seed, update_gap):
    """Train every ``(name, schedule, grad_norms)`` of ``specs`` from the same initialisation and
    batches, one step of each in turn (so that the machine's load falls on every contender alike);
    returns their results (None for a contender that is not installed)."""
    n = len(text_ids)
    train_ids, val_ids = text_ids[: int(0.9 * n)], text_ids[int(0.9 * n):]
    runs = [Run(name, train_ids, vocab, steps, seed, update_gap, sched, norms) for name, sched, norms in specs]
    live = [r for r in runs if r.opt is not None]
    for _ in range(steps):
        for r in live:
            r.step()
    return [r.result(val_ids) if r.opt is not None else None for r in runs]


def state_table(vocab, rho=0.25):
    """State bytes from the parameter split alone (losskit.optim.frugal_state_bytes, meta tensors)."""
    from losskit.optim import frugal_param_groups, frugal_state_bytes

    print(f"optimizer-state bytes from the parameter split (frugal_state_bytes; rho {rho}; vocabulary {vocab}; "
          "blockwise peak and mean over the renewals of the descending order)")
    print("| model (d, layers, MLP) | params | projectable | AdamW bytes | rho x AdamW | blockwise peak / AdamW | "
          "blockwise mean / AdamW | SVD / AdamW | SVD goal (rho x AdamW + projectors) / AdamW |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d, layers, mlp in ((D, LAYERS, MLP), (256, 4, 1024), (512, 8, 2048), (1024, 16, 4096)):
        with torch.device("meta"):
            model = CharLM(vocab, d=d, layers=layers, mlp=mlp, heads=max(HEADS, d // 64))
        block = frugal_state_bytes(frugal_param_groups(model), rho=rho, projection="blockwise")
        svd = frugal_state_bytes(frugal_param_groups(model), rho=rho, projection="svd")
        a = block["adamw"]
        proj = svd["per_renewal"][0]["projectors"]
        total = block["projectable"] + block["other"]
        print(f"| {d}, {layers}, {mlp} | {total:,} | {block['projectable'] / total:.1%} | {a:,} | {rho * a:,.0f} | "
              f"{block['peak'] / a:.3f} | {block['mean'] / a:.3f} | {svd['peak'] / a:.3f} | "
              f"{(rho * a + proj) / a:.3f} |")
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--seed-start", type=int, default=0, help="seeds SEED_START .. SEED_START + SEEDS - 1 (to split a "
                    "run into shorter invocations: each gives its own table, ratios to its own AdamW)")
    ap.add_argument("--update-gap", type=int, default=50)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="torch threads; 0 = torch's default")
    ap.add_argument("--contenders", nargs="+", default=["adamw", "frugal-block", "frugal-svd", "galore", "sgd"])
    ap.add_argument("--schedules", action="store_true", help="also run the schedule study (AdamW)")
    ap.add_argument("--state-table", action="store_true",
                    help="only print the state bytes from the parameter split for larger models (no training)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if "adamw" not in args.contenders:  # every ratio is to AdamW in the same process
        args.contenders = ["adamw", *args.contenders]

    text = corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    print(f"corpus: docstrings of {len(MODULES)} stdlib modules, Python {sys.version.split()[0]}: "
          f"{len(text):,} characters, vocabulary {len(chars)}, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")
    print(f"model: {sum(p.numel() for p in CharLM(len(chars)).parameters()):,} parameters; {args.steps} steps, "
          f"batch {BATCH} x {CTX}, update gap {args.update_gap}")
    if args.state_table:
        state_table(len(chars))
        return
    seeds = range(args.seed_start, args.seed_start + args.seeds)
    default_threads = torch.get_num_threads()
    print(f"seeds {seeds.start}..{seeds.stop - 1}; load average at start {os.getloadavg()[0]:.2f} (1 min)")
    out = {"rows": [], "schedules": []}
    for th in args.threads:
        torch.set_num_threads(th or default_threads)
        label = f"{th}" if th else f"default ({default_threads})"
        res = {}
        per_seed = [train_lockstep([(name, "linear-decay", None) for name in args.contenders], ids, len(chars),
                                   args.steps, s, args.update_gap) for s in seeds]
        for i, name in enumerate(args.contenders):
            runs = [seed_runs[i] for seed_runs in per_seed]
            if runs[0] is None:
                print(f"{name}: skipped (pytorch-optimizer not installed: pip install 'losskit[optim-compare]')")
                continue
            res[name] = {k: sum(r[k] for r in runs) / len(runs)
                         for k in ("val_loss", "state_bytes", "step_ms", "opt_ms")}
            res[name]["val_losses"] = [r["val_loss"] for r in runs]
        base = res["adamw"]
        print(f"threads {label}")
        print("| optimizer | val loss (mean over seeds) | per seed | / AdamW | peak state bytes | / AdamW | "
              "step ms | / AdamW | opt.step ms | / AdamW |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, r in res.items():
            print(f"| {name} | {r['val_loss']:.4f} | {', '.join(f'{v:.4f}' for v in r['val_losses'])} | "
                  f"{r['val_loss'] / base['val_loss']:.3f} | {r['state_bytes']:,.0f} | "
                  f"{r['state_bytes'] / base['state_bytes']:.3f} | {r['step_ms']:.2f} | "
                  f"{r['step_ms'] / base['step_ms']:.2f} | {r['opt_ms']:.2f} | {r['opt_ms'] / base['opt_ms']:.2f} |")
            out["rows"].append({"threads": th, "optimizer": name, **r})
        print()
    if args.schedules:
        torch.set_num_threads(args.threads[0] or default_threads)
        rows = {}
        for s in seeds:
            lin, cos = train_lockstep([("adamw", "linear-decay", None), ("adamw", "cosine", None)], ids, len(chars),
                                      args.steps, s, args.update_gap)
            ref, = train_lockstep([("adamw", "refined", lin["grad_norms_l1"])], ids, len(chars), args.steps, s,
                                  args.update_gap)
            for k, r in (("cosine", cos), ("linear-decay", lin), ("refined (from linear-decay)", ref)):
                rows.setdefault(k, []).append(r["val_loss"])
        print("schedules (AdamW, lr 3e-3, warmup 20)")
        print("| schedule | val loss (mean) | per seed | / cosine |")
        print("|---|---|---|---|")
        c = sum(rows["cosine"]) / len(rows["cosine"])
        for k, v in rows.items():
            m = sum(v) / len(v)
            print(f"| {k} | {m:.4f} | {', '.join(f'{x:.4f}' for x in v)} | {m / c:.4f} |")
            out["schedules"].append({"schedule": k, "val_losses": v})
    print(f"load average at the end {os.getloadavg()[0]:.2f} (1 min)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
