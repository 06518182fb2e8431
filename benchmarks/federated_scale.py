"""100 clients in one process: seconds per round and peak memory of FedAvg, FedProx, FedLD, FedLEx.

The in-process loop (losskit.recipes.federated.run_federated) over N clients (default 100)
holding a Dirichlet(0.5) share of digits' 1437 training rows; MLP 64-H-10 (H = --hidden,
default 32; --hidden 512 makes the model ~40x larger so the server's cost shows);
1 local epoch, batch 32, every client every round.  Each (method, threads) runs in a
fresh child process: "s/round" is the median over rounds 2..R (round 1 of FedLEx also
pays nothing extra: its exploration happens before round 1 and is reported apart),
"peak MB" the child's ru_maxrss, "extra MB" that peak minus the resident size just before
the run (torch, scikit-learn and the data already loaded), "x fedavg" the ratio to FedAvg
in the same table.  "exploration s": the run's time outside its rounds (FedLEx's scouts).

    PYTHONPATH=src python benchmarks/federated_scale.py                  # --threads 1 0
    PYTHONPATH=src python benchmarks/federated_scale.py --clients 100 --hidden 512 --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time


def _child(method, clients, hidden, rounds, threads, out):
    import numpy as np
    import torch

    from losskit.data.partition import dirichlet_partition
    from losskit.integrations.flower.task import load_digits_classification, make_model
    from losskit.recipes.federated import LocalConfig, run_federated

    if threads:
        torch.set_num_threads(threads)
    x, y, xt, yt = load_digits_classification(0)
    parts = dirichlet_partition(y, clients, 0.5, seed=0, min_size=2)
    data = [(x[torch.as_tensor(p)], y[torch.as_tensor(p)]) for p in parts]
    alg = "fedlex" if method.startswith("fedlex") else method
    local = LocalConfig(epochs=1, batch_size=32, lr=0.05, mu=0.01 if method == "fedprox" else 0.0)
    model = make_model(hidden, 0)
    nparam = sum(p.numel() for p in model.parameters())
    with open("/proc/self/statm") as f:
        before_mb = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    t0 = time.perf_counter()
    h = run_federated(model, data, algorithm=alg, rounds=rounds, local=local, explore_epochs=1,
                      server_momentum=0.9 if alg == "fedlex" else 0.0, seed=0, eval_data=(xt, yt))
    total = time.perf_counter() - t0
    secs = [r["seconds"] for r in h.rounds]
    explore = total - sum(secs)
    out.put({"s_round": float(np.median(secs[1:] if len(secs) > 1 else secs)), "explore_s": explore,
             "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "params": nparam,
             "extra_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before_mb,
             "acc": h.accuracy()[-1], "threads": torch.get_num_threads()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="0: torch's default")
    ap.add_argument("--methods", nargs="+", default=["fedavg", "fedprox", "fedld", "fedlex"])
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    for th in a.threads:
        rows = {}
        for meth in a.methods:
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(meth, a.clients, a.hidden, a.rounds, th, q))
            p.start()
            while True:  # a child that dies must not leave the parent waiting
                try:
                    rows[meth] = q.get(timeout=5)
                    break
                except Exception:
                    if not p.is_alive():
                        raise RuntimeError(f"{meth}: the child process exited with code {p.exitcode}")
            p.join()
        base = rows[a.methods[0]]
        print(f"\n{a.clients} clients, MLP 64-{a.hidden}-10 ({base['params']} parameters), {a.rounds} rounds, "
              f"torch threads {base['threads']}\n")
        print(f"| method | s/round | x {a.methods[0]} | exploration s | peak MB | extra MB | x {a.methods[0]} | "
              f"accuracy after {a.rounds} |")
        print("|---|---|---|---|---|---|---|---|")
        for meth, r in rows.items():
            print(f"| {meth} | {r['s_round']:.2f} | {r['s_round'] / base['s_round']:.2f} | "
                  f"{r['explore_s']:.1f} | {r['peak_mb']:.0f} | {r['extra_mb']:.0f} | "
                  f"{r['extra_mb'] / max(base['extra_mb'], 1e-9):.2f} | "
                  f"{100 * r['acc']:.1f} |")


if __name__ == "__main__":
    main()
