"""Contracts of the other kinds: weighter, memory, miner, optimizer,
scheduler, recipe.  Parametrised over ``losskit.specs(kind=K)``: a kind with
no entry yet gives an empty parametrisation (reported as skipped), never an
error."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import Tensor

import losskit
from contract_cases import (ALT_HPARAMS, EXPECTED_ENTRIES, MARGIN_CLOSURE_OPTIMIZERS, RECIPE_RUNS,
                            balanced_labels, fail_no_case,
                            kind_hparams, specs_of)

WEIGHTERS = specs_of("weighter")
MEMORIES = specs_of("memory")
MINERS = specs_of("miner")
OPTIMIZERS = specs_of("optimizer")
SCHEDULERS = specs_of("scheduler")
RECIPES = specs_of("recipe")


def ids(specs):
    return [s.name for s in specs]


def _round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _emb(b, d=6, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype).to(device)
    return x, balanced_labels(b, g).to(device)


def test_the_issue_s_entries_are_registered_where_they_belong():
    have = {(s.kind, getattr(s.cls, "__name__", "")) for s in losskit.specs(kind=None)}
    missing = sorted(EXPECTED_ENTRIES - have)
    assert not missing, f"not registered under their kind: {missing}"


@pytest.mark.parametrize("s", WEIGHTERS + MEMORIES + MINERS + OPTIMIZERS + SCHEDULERS + RECIPES,
                         ids=ids(WEIGHTERS + MEMORIES + MINERS + OPTIMIZERS + SCHEDULERS + RECIPES))
def test_spec_is_complete(s):
    assert s.kind in losskit.KINDS and s.paper is not None and s.summary, f"{s.name}: paper and summary"
    assert s.name == s.name.lower() and "_" not in s.name


# ----------------------------------------------------------------------------- weighter

def _weighter_round(w, losses: Tensor, ids_: Tensor) -> Tensor:
    out = w.weights(losses, ids_)
    if hasattr(w, "step"):
        w.step()
    return out


def _weighter_history(w, device="cpu", rounds=3):
    """Three epochs over the same eight samples (GLOW-like weighters need a
    history and a finished warm-up epoch)."""
    g = torch.Generator().manual_seed(0)
    ids_ = torch.arange(8, device=device)
    for r in range(rounds):
        _weighter_round(w, (torch.rand(8, generator=g) * 3).to(device), ids_)
        if hasattr(w, "end_epoch"):
            w.end_epoch()


@pytest.mark.parametrize("s", WEIGHTERS, ids=ids(WEIGHTERS))
def test_weighter_call_contract(s, device):
    w = losskit.get(s.name, **kind_hparams(s))
    assert isinstance(getattr(w, "hparams", None), dict)
    _weighter_history(w, device)
    losses = torch.rand(8, device=device, requires_grad=True)
    out = w.weights(losses, torch.arange(8, device=device))
    assert out.shape == (8,) and torch.isfinite(out).all() and (out >= 0).all()
    assert not out.requires_grad, "weights are detached"
    bad = losses.detach().clone()
    bad[2] = math.nan
    with pytest.raises(ValueError, match="losses"):
        w.weights(bad, torch.arange(8, device=device))
    with pytest.raises(ValueError, match="sample_ids"):
        w.weights(losses, torch.arange(7, device=device))


@pytest.mark.parametrize("s", WEIGHTERS, ids=ids(WEIGHTERS))
def test_weighter_state_dict_round_trip(s, device):
    a = losskit.get(s.name, **kind_hparams(s))
    _weighter_history(a, device)
    _weighter_round(a, torch.rand(8, device=device), torch.arange(8, device=device))  # a staged step too
    b = losskit.get(s.name, **kind_hparams(s))
    b.load_state_dict(_round_trip(a.state_dict()))
    g = torch.Generator().manual_seed(9)
    for _ in range(2):
        losses = (torch.rand(8, generator=g) * 3).to(device)
        torch.testing.assert_close(_weighter_round(b, losses, torch.arange(8, device=device)),
                                   _weighter_round(a, losses, torch.arange(8, device=device)))


def _alt_hparams(s) -> dict:
    if s.name in ALT_HPARAMS:
        return ALT_HPARAMS[s.name]
    for k, v in s.hparams.items():  # the first float hyperparameter that accepts twice its value
        if type(v) is float and v:
            try:
                losskit.get(s.name, **kind_hparams(s, {k: 2 * v}))
            except (ValueError, TypeError):
                continue
            return {k: 2 * v}
    pytest.skip("no float hyperparameter to vary (add one to ALT_HPARAMS)")


@pytest.mark.parametrize("s", WEIGHTERS, ids=ids(WEIGHTERS))
def test_weighter_load_state_dict_keeps_the_constructor_hyperparameters(s, device):
    """Loading a state restores the history, not the hyperparameters: the
    object keeps what its constructor was given (or refuses a mismatch)."""
    alt = _alt_hparams(s)
    a = losskit.get(s.name, **kind_hparams(s))
    ref = losskit.get(s.name, **kind_hparams(s, alt))
    _weighter_history(a, device)
    _weighter_history(ref, device)
    b = losskit.get(s.name, **kind_hparams(s, alt))
    try:
        b.load_state_dict(_round_trip(a.state_dict()))
    except ValueError as e:
        assert any(k in str(e) for k in alt), f"a refused mismatch must name the hyperparameter: {e}"
        return
    assert b.hparams == ref.hparams
    losses = torch.rand(8, device=device) * 3
    torch.testing.assert_close(b.weights(losses, torch.arange(8, device=device)),
                               ref.weights(losses, torch.arange(8, device=device)),
                               msg=lambda m: f"load_state_dict changed the constructor's {alt}: {m}")


# ----------------------------------------------------------------------------- memory

def _memory(s, device, seed=0):
    torch.manual_seed(seed)
    m = losskit.get(s.name, **kind_hparams(s))
    return m.to(device) if isinstance(m, torch.nn.Module) else m


@pytest.mark.parametrize("s", MEMORIES, ids=ids(MEMORIES))
def test_memory_call_contract(s, device):
    m = _memory(s, device)
    m.train()
    for step in range(4):
        x, y = _emb(6, seed=step, device=device)
        x.requires_grad_(True)
        out = m(x, y)
        assert out.shape == () and torch.isfinite(out), f"step {step}: {out}"
        out.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    # zero weights: zero loss, zero gradient
    x, y = _emb(6, seed=9, device=device)
    x.requires_grad_(True)
    out = m(x, y, torch.zeros(6, device=device))
    out.backward()
    assert float(out) == 0.0 and bool((x.grad == 0).all())
    # empty batch: a finite zero connected to the graph
    x = torch.zeros(0, 6, device=device, requires_grad=True)
    out = m(x, torch.zeros(0, dtype=torch.long, device=device))
    assert out.shape == () and float(out) == 0.0 and out.requires_grad
    out.backward()
    # non-finite input
    for bad in (math.nan, math.inf):
        x, y = _emb(6, seed=3, device=device)
        x[1, 1] = bad
        with pytest.raises(ValueError, match="embeddings"):
            m(x, y)


@pytest.mark.parametrize("s", MEMORIES, ids=ids(MEMORIES))
def test_memory_state_dict_round_trip(s, device):
    """Fill (and wrap) the queue, save, load into a *fresh* module: the same
    losses afterwards (queue, pointer and warm-up count restored)."""
    a = _memory(s, device)
    a.train()
    for step in range(5):  # 2 warm-up steps, then 18 rows into a memory of 16: it wraps
        a(*_emb(6, seed=step, device=device))
    b = _memory(s, device, seed=1)
    b.train()
    b.load_state_dict(_round_trip(a.state_dict()))
    for step in range(5, 7):
        x, y = _emb(6, seed=step, device=device)
        torch.testing.assert_close(b(x, y), a(x, y), msg=lambda m: f"step {step}: {m}")


# ----------------------------------------------------------------------------- miner

@pytest.mark.parametrize("s", MINERS, ids=ids(MINERS))
def test_miner_call_contract(s, device):
    m = losskit.get(s.name, **kind_hparams(s))
    x, y = _emb(12, device=device)
    rx, ry = _emb(9, seed=1, device=device)
    for ref in (None, (rx, ry)):
        out = m(x, y) if ref is None else m(x, y, reference=losskit.PairReference(rx, ry))
        ref_y = y if ref is None else ry
        assert isinstance(out, tuple) and len(out) in (3, 4), "(a, p, n) or (a1, p, a2, n)"
        for t in out:
            assert t.dtype == torch.long and t.dim() == 1 and t.device == x.device
        groups = [(out[0], out[1], True), (out[2], out[3], False)] if len(out) == 4 else \
            [(out[0], out[1], True), (out[0], out[2], False)]
        assert len(out[0]) > 0, "a class-balanced batch has pairs to mine"
        for a, o, positive in groups:
            assert a.shape == o.shape
            assert bool(((a >= 0) & (a < 12)).all()) and bool(((o >= 0) & (o < len(ref_y))).all())
            same = y[a] == ref_y[o]
            assert bool(same.all()) if positive else not bool(same.any())
            if positive and ref is None:
                assert not bool((a == o).any()), "an anchor is never its own positive"
    empty = m(torch.zeros(0, 6, device=device), torch.zeros(0, dtype=torch.long, device=device))
    assert all(t.numel() == 0 for t in empty)
    x[2, 3] = math.nan
    with pytest.raises(ValueError, match="embeddings"):
        m(x, y)


# ----------------------------------------------------------------------------- optimizer / scheduler

def _problem(device, seed=0):
    """Two parameters and a least-squares loss of them."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=g).to(device)),
              torch.nn.Parameter(torch.zeros(3, device=device))]
    x = torch.randn(16, 4, generator=g).to(device)
    t = torch.randn(16, 3, generator=g).to(device)
    return params, lambda ps: ((x @ ps[0] + ps[1] - t) ** 2).mean()


def _steps(opt, params, loss_fn, n):
    margins_fn = MARGIN_CLOSURE_OPTIMIZERS.get(getattr(opt, "_contract_name", None))
    for _ in range(n):
        opt.zero_grad()
        if margins_fn is not None:  # the optimizer differentiates what its closure returns
            opt.step(lambda: margins_fn(params))
            continue
        loss_fn(params).backward()
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("s", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_optimizer_contract_and_state_round_trip(s, device):
    """An optimizer kind is a torch.optim.Optimizer; after three steps its
    state loads into a fresh optimizer over copied parameters, and both take
    the same next two steps."""
    params, loss_fn = _problem(device)
    opt = losskit.get(s.name, params, **kind_hparams(s))
    opt._contract_name = s.name
    assert isinstance(opt, torch.optim.Optimizer), "an optimizer kind is a torch.optim.Optimizer"
    assert isinstance(getattr(opt, "hparams", None), dict)
    before = float(loss_fn(params))
    _steps(opt, params, loss_fn, 3)
    after = float(loss_fn(params))
    assert math.isfinite(after) and after != before
    p2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = losskit.get(s.name, p2, **kind_hparams(s))
    opt2._contract_name = s.name
    opt2.load_state_dict(_round_trip(opt.state_dict()))
    for a, b in zip(_steps(opt, params, loss_fn, 2), _steps(opt2, p2, loss_fn, 2)):
        torch.testing.assert_close(b, a)
    with pytest.raises(TypeError, match="params"):
        losskit.get(s.name, **kind_hparams(s))


@pytest.mark.parametrize("s", SCHEDULERS, ids=ids(SCHEDULERS))
def test_scheduler_contract_and_state_round_trip(s, device):
    params, loss_fn = _problem(device)
    opt = torch.optim.SGD(params, lr=0.1)
    sched = losskit.get(s.name, opt, **kind_hparams(s))
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler), "a scheduler kind is an LRScheduler"
    for _ in range(3):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.1)
    sched2 = losskit.get(s.name, opt2, **kind_hparams(s))
    sched2.load_state_dict(_round_trip(sched.state_dict()))
    opt2.load_state_dict(_round_trip(opt.state_dict()))
    for _ in range(3):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    with pytest.raises(TypeError, match="optimizer"):
        losskit.get(s.name, **kind_hparams(s))


# ----------------------------------------------------------------------------- recipe

@pytest.mark.parametrize("s", RECIPES, ids=ids(RECIPES))
def test_recipe_contract(s):
    if s.name not in RECIPE_RUNS:
        fail_no_case(s.name, "no toy run in RECIPE_RUNS")
    hp, run = RECIPE_RUNS[s.name]
    r = losskit.get(s.name, **hp)
    assert callable(r)
    run(r)
