"""Why FedLD moves slower than FedAvg here: one round's principal-gradient step against the plain mean.

From the same initial MLP 64-32-10, every client of a Dirichlet(alpha) digits partition trains
2 local epochs (SGD lr 0.05, momentum 0.5, batch 32); for two weight tensors the script prints
||PGA(G)|| / ||mean(G)|| and the cosine between them (G: the clients' deltas).

    PYTHONPATH=src python benchmarks/federated_step_norms.py
"""
import torch
from losskit.data.partition import dirichlet_partition
from losskit.integrations.flower.task import load_digits_classification, make_model
from losskit.recipes.federated import LocalConfig, train_local, state_of
from losskit.functional.federated import principal_gradient_aggregate
torch.set_num_threads(1)
x, y, xt, yt = load_digits_classification(0)
print("| clients | alpha | tensor | ||FedLD step|| / ||FedAvg step|| (unweighted mean) | cos(FedLD, FedAvg) |")
print("|---|---|---|---|---|")
for n in (10, 50):
    for al in (0.1, 1.0):
        parts = dirichlet_partition(y, n, al, seed=0, min_size=2)
        g = make_model(32, 0); base = state_of(g)
        deltas = {k: [] for k in base}
        for i, p in enumerate(parts):
            m = make_model(32, 0); m.load_state_dict(base)
            train_local(m, x[torch.as_tensor(p)], y[torch.as_tensor(p)], LocalConfig(epochs=2, batch_size=32, lr=0.05), generator=torch.Generator().manual_seed(i))
            for k, v in m.state_dict().items(): deltas[k].append((v - base[k]).flatten().double())
        for k in ("0.weight", "2.weight"):
            G = torch.stack(deltas[k]); avg = G.mean(0); pga = principal_gradient_aggregate(G)
            print(f"| {n} | {al} | {k} | {float(pga.norm()/avg.norm()):.3f} | {float(pga@avg/(pga.norm()*avg.norm())):.3f} |")
