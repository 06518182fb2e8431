"""Why FedLD and FedLEx move slower than FedAvg here: one round's step from the same start.

From the same initial MLP, every client of a Dirichlet(alpha) partition trains 2 local epochs
(SGD lr --lr, momentum 0.5, batch 32).  For two weight tensors the script prints
||PGA(G)|| / ||mean(G)|| and the cosine between them (G: the clients' deltas; FedLD's step
against FedAvg's), and FedLEx's guidance M (each client's scout trained 2 epochs from the same
start: here the clients' own runs above, so the same kind of run as FedLEx's exploration in
benchmarks/federated_heterogeneity.py, other batch draws): its mean and the share of entries below 0.1.

    PYTHONPATH=src python benchmarks/federated_step_norms.py                         # digits, MLP 64-32-10
    PYTHONPATH=src python benchmarks/federated_step_norms.py --dataset omniglot --data-dir PATH \\
        --classes 100 --hidden 128 --lr 0.1
"""
import argparse

import torch

from losskit.data.partition import dirichlet_partition
from losskit.functional.federated import guidance_matrix, principal_gradient_aggregate
from losskit.integrations.flower.task import load_digits_classification, load_omniglot_classification, make_model
from losskit.recipes.federated import LocalConfig, state_of, train_local

ap = argparse.ArgumentParser()
ap.add_argument("--dataset", choices=["digits", "omniglot"], default="digits")
ap.add_argument("--data-dir", default=None, help="omniglot: a folder holding images_background_small1.zip")
ap.add_argument("--classes", type=int, default=100)
ap.add_argument("--class-seed", type=int, default=0)
ap.add_argument("--hidden", type=int, default=32)
ap.add_argument("--lr", type=float, default=0.05)
ap.add_argument("--guidance", action="store_true", help="also print FedLEx's guidance statistics")
a = ap.parse_args()
torch.set_num_threads(1)
if a.dataset == "digits":
    x, y, xt, yt = load_digits_classification(0)
else:
    if not a.data_dir:
        raise SystemExit("--dataset omniglot needs --data-dir PATH")
    x, y, xt, yt = load_omniglot_classification(a.data_dir, num_classes=a.classes, class_seed=a.class_seed)
C = int(y.max()) + 1


def model():
    return make_model(a.hidden, 0, in_features=x.shape[1], num_classes=C)


print(f"{a.dataset}, MLP {x.shape[1]}-{a.hidden}-{C}, lr {a.lr}\n")
rows, grows = [], []
for n in (10, 50):
    for al in (0.1, 1.0):
        parts = dirichlet_partition(y, n, al, seed=0, min_size=2)
        base = state_of(model())
        deltas = {k: [] for k in base}
        for i, p in enumerate(parts):
            m = model()
            m.load_state_dict(base)
            train_local(m, x[torch.as_tensor(p)], y[torch.as_tensor(p)],
                        LocalConfig(epochs=2, batch_size=32, lr=a.lr), generator=torch.Generator().manual_seed(i))
            for k, v in m.state_dict().items():
                deltas[k].append((v - base[k]).flatten().double())
        for k in ("0.weight", "2.weight"):
            G = torch.stack(deltas[k])
            avg = G.mean(0)
            pga = principal_gradient_aggregate(G)
            rows.append(f"| {n} | {al} | {k} | {float(pga.norm() / avg.norm()):.3f} | "
                        f"{float(pga @ avg / (pga.norm() * avg.norm())):.3f} |")
            if a.guidance:  # the scouts are the same local runs: base + delta
                M = guidance_matrix(base[k], base[k][None] + G.view(len(parts), *base[k].shape).to(base[k].dtype))
                grows.append(f"| {n} | {al} | {k} | {float(M.mean()):.3f} | {float((M < 0.1).double().mean()):.3f} |")
print("| clients | alpha | tensor | ||FedLD step|| / ||FedAvg step|| (unweighted mean) | cos(FedLD, FedAvg) |")
print("|---|---|---|---|---|")
print("\n".join(rows))
if a.guidance:
    print("\n| clients | alpha | tensor | FedLEx guidance: mean M | share of M < 0.1 |")
    print("|---|---|---|---|---|")
    print("\n".join(grows))
