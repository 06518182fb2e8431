"""The federated recipes without Flower: aggregation rules, local training variants,
FedLEx's scouts and guided step, partial participation, faults, resume."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import losskit
from losskit.data.partition import dirichlet_partition
from losskit.recipes.federated import (ClientUpdate, FedAvgAggregator, FedLDAggregator, LocalClient, LocalConfig,
                                       ServerMomentumAggregator, UpdateRejected, build_guidance, explore_scout,
                                       run_federated, state_of, train_local, validate_update)


def toy_data(n=240, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(c, d, generator=g)
    y = torch.arange(n) % c
    x = centers[y] + torch.randn(n, d, generator=g)
    return x, y


def toy_model(d=6, c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, c))


def toy_clients(k=4, alpha=0.5, seed=0):
    x, y = toy_data(seed=seed)
    return [(x[p], y[p]) for p in dirichlet_partition(y, k, alpha, seed=seed, min_size=8)], (x, y)


FAST = LocalConfig(epochs=1, batch_size=16, lr=0.05)


# ----------------------------------------------------------------------------- aggregation rules

def test_fedld_equals_fedavg_for_identical_updates():
    m = toy_model()
    g = state_of(m)
    moved = {k: (v + 0.1 * torch.randn_like(v)) if v.is_floating_point() else v + 1 for k, v in g.items()}
    states = [moved] * 4
    avg = FedAvgAggregator().aggregate(g, states, [10, 20, 30, 40])
    ld = FedLDAggregator()
    ld.aggregate(g, states, [1, 1, 1, 1])  # round 0: plain mean
    out = ld.aggregate(g, states, [1, 1, 1, 1])  # principal gradients from here on
    for k in g:
        assert torch.isfinite(out[k].float()).all()
        torch.testing.assert_close(out[k], avg[k], rtol=1e-5, atol=1e-6)


def test_fedld_partial_participation_and_history_state():
    m = toy_model()
    g = state_of(m)
    gen = torch.Generator().manual_seed(0)
    states = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
               for k, v in g.items()} for _ in range(3)]
    ld = FedLDAggregator()
    ld.aggregate(g, states, [1] * 3)
    for sub in (states[:1], states[:2], states):  # any number of participants, not the registered total
        out = ld.aggregate(g, sub, [1] * len(sub))
        assert all(torch.isfinite(v.float()).all() for v in out.values())
    again = FedLDAggregator()
    again.load_state_dict(ld.state_dict())
    assert again.rounds == ld.rounds == 4


def test_server_momentum_matches_hand_computation():
    g = {"w": torch.tensor([1.0, 1.0])}
    agg = ServerMomentumAggregator(0.9)
    s1 = agg.aggregate(g, [{"w": torch.tensor([0.0, 2.0])}], [1])  # d = [1, -1], v = 0.1 d
    torch.testing.assert_close(s1["w"], torch.tensor([0.9, 1.1]))
    s2 = agg.aggregate(s1, [{"w": torch.tensor([0.9, 1.1])}], [1])  # d = 0, v = 0.9 v
    torch.testing.assert_close(s2["w"], torch.tensor([0.9 - 0.09, 1.1 + 0.09]))
    assert ServerMomentumAggregator(0.0).aggregate(g, [{"w": torch.tensor([0.0, 2.0])}], [1])["w"].tolist() == [0, 2]


def test_validate_update_rejects_bad_arrays():
    g = state_of(toy_model())
    ok = state_of(toy_model(seed=1))
    validate_update(g, ok)
    bad_shape = dict(ok, **{"0.weight": torch.zeros(3, 3)})
    with pytest.raises(UpdateRejected, match="shape"):
        validate_update(g, bad_shape, who="client 7")
    nan = dict(ok, **{"0.bias": torch.full((8,), float("nan"))})
    with pytest.raises(UpdateRejected, match="non-finite"):
        validate_update(g, nan)
    with pytest.raises(UpdateRejected, match="missing"):
        validate_update(g, {k: v for k, v in ok.items() if k != "0.bias"})


# ----------------------------------------------------------------------------- local training

def test_fedprox_term_keeps_weights_close():
    (x, y), _ = toy_clients(1)[0][0], None
    dists = []
    for mu in (0.0, 10.0):
        m = toy_model()
        w0 = [p.detach().clone() for p in m.parameters()]
        train_local(m, x, y, LocalConfig(epochs=3, batch_size=16, lr=0.05, mu=mu),
                    generator=torch.Generator().manual_seed(0))
        dists.append(sum(float((p - q).pow(2).sum()) for p, q in zip(m.parameters(), w0)))
    assert dists[1] < 0.7 * dists[0]


def test_guided_step_masks_gradients_and_scouts_are_independent():
    x, y = toy_data()
    base = toy_model()
    before = state_of(base)
    s1 = explore_scout(base, x[:80], y[:80], FAST, generator=torch.Generator().manual_seed(0))
    s2 = explore_scout(base, x[80:160], y[80:160], FAST, generator=torch.Generator().manual_seed(0))
    for k, v in before.items():  # the base model is untouched by its scouts
        assert torch.equal(base.state_dict()[k], v)
    # each scout equals training its own copy of the base from scratch (no aliasing)
    ref = copy.deepcopy(base)
    train_local(ref, x[80:160], y[80:160], FAST, generator=torch.Generator().manual_seed(0))
    for n, p in ref.named_parameters():
        torch.testing.assert_close(s2[n], p.detach())
    assert any(not torch.equal(s1[n], s2[n]) for n in s1)
    M = build_guidance(before, [s1, s2])
    assert set(M) == {n for n, _ in base.named_parameters()}
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in M.values())
    # a zero guidance entry freezes that weight under Adam (no weight decay)
    M["0.weight"] = torch.zeros_like(M["0.weight"])
    m = copy.deepcopy(base)
    train_local(m, x, y, LocalConfig(epochs=1, batch_size=16, lr=0.01, optimizer="adam", weight_decay=0.0),
                generator=torch.Generator().manual_seed(0), guidance=M)
    assert torch.equal(m.state_dict()["0.weight"], before["0.weight"])
    assert not torch.equal(m.state_dict()["3.weight"], before["3.weight"])


# ----------------------------------------------------------------------------- the loop

@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedld", "fedlex"])
def test_registered_recipes_learn(name):
    clients, (x, y) = toy_clients(4)
    m = toy_model()
    opts = {"lr": 0.01} if name == "fedlex" else {}
    h = losskit.get(name, rounds=8, local_epochs=2, batch_size=16, eval_data=(x, y), **opts)(m, clients)
    acc = h.accuracy()
    assert len(acc) == 8 and acc[-1] > 0.7 and acc[-1] > acc[0] + 0.2, acc  # FedLD's steps are the shortest
    assert all(np.isfinite(r["train_loss"]) for r in h.rounds)
    if name == "fedlex":
        assert h.explored == [0, 1, 2, 3]


def test_partial_participation_samples_a_fraction():
    clients, _ = toy_clients(6)
    h = run_federated(toy_model(), clients, algorithm="fedld", rounds=3, fraction=0.5, local=FAST)
    assert [len(r["clients"]) for r in h.rounds] == [3, 3, 3]
    assert len({tuple(r["clients"]) for r in h.rounds}) > 1  # a different draw per round


class Crashing(LocalClient):
    def update(self, model, cfg, *, generator, guidance=None):
        raise RuntimeError("disk full")


class Poisoned(LocalClient):
    def __init__(self, x, y, how):
        super().__init__(x, y, name="poisoned")
        self.how = how

    def update(self, model, cfg, *, generator, guidance=None):
        st = state_of(model)
        if self.how == "nan":
            st["0.weight"] = st["0.weight"] * float("nan")
        else:
            st["0.weight"] = torch.zeros(2, 2)
        return ClientUpdate(self.name, st, 10)


def test_faulty_clients_are_recorded_and_never_aggregated(caplog):
    clients, _ = toy_clients(3)
    good = [LocalClient(x, y, name=i) for i, (x, y) in enumerate(clients)]
    x, y = clients[0]
    all_clients = good + [Crashing(x, y), Poisoned(x, y, "nan"), Poisoned(x, y, "shape")]
    m = toy_model()
    with caplog.at_level("WARNING", logger="losskit.federated"):
        h = run_federated(m, all_clients, algorithm="fedavg", rounds=2, local=FAST)
    ref = toy_model()
    run_federated(ref, good, algorithm="fedavg", rounds=2, local=FAST)
    for r in h.rounds:
        assert r["accepted"] == [0, 1, 2]
        assert [c for c, _ in r["failures"]] == [3] and "disk full" in r["failures"][0][1]
        assert [c for c, _ in r["rejected"]] == [4, 5]
        assert "non-finite" in r["rejected"][0][1] and "shape" in r["rejected"][1][1]
    assert "rejected update" in caplog.text and "failed" in caplog.text
    for k, v in ref.state_dict().items():  # exactly the run without the faulty clients
        assert torch.equal(m.state_dict()[k], v)


def test_resume_after_kill_gives_the_same_weights(tmp_path):
    clients, _ = toy_clients(4)
    for alg in ("fedld", "fedlex"):
        full = toy_model()
        run_federated(full, clients, algorithm=alg, rounds=4, fraction=0.75, local=FAST, server_momentum=0.9)
        ck = tmp_path / f"{alg}.pt"

        def kill_after_2(rec):
            if rec["round"] == 1:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_federated(toy_model(), clients, algorithm=alg, rounds=4, fraction=0.75, local=FAST,
                          server_momentum=0.9, checkpoint=ck, on_round=kill_after_2)
        resumed = toy_model(seed=5)  # whatever weights: the checkpoint rules
        h = run_federated(resumed, clients, algorithm=alg, rounds=4, fraction=0.75, local=FAST,
                          server_momentum=0.9, checkpoint=ck)
        assert [r["round"] for r in h.rounds] == [0, 1, 2, 3]
        for k, v in full.state_dict().items():
            torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)


def test_loop_bad_input():
    clients, _ = toy_clients(2)
    with pytest.raises(ValueError, match="algorithm"):
        run_federated(toy_model(), clients, algorithm="scaffold")
    with pytest.raises(ValueError, match="mu"):
        run_federated(toy_model(), clients, algorithm="fedprox")
    with pytest.raises(ValueError, match="fraction"):
        run_federated(toy_model(), clients, fraction=0.0)
    with pytest.raises(TypeError, match="clients"):
        run_federated(toy_model(), [object()])
    with pytest.raises(ValueError, match="optimizer"):
        LocalConfig(optimizer="lbfgs")
