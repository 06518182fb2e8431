import io
import math

import pytest
import torch

from losskit.weighting.glow import GLOW


def naive_w(prev, cur, alpha=1.0, beta=20.0, lo=0.5, hi=5.0):
    d = prev - cur
    return min(max(alpha * (1 - 1 / (1 + math.exp(-beta * d))), lo), hi)


def test_first_epoch_uniform_then_gain_weights():
    g = GLOW(alpha=3.0, beta=10.0)
    l0 = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(g.weights(l0, [0, 1, 2]), torch.ones(3))
    g.end_epoch()
    l1 = torch.tensor([0.5, 2.0, 3.4], requires_grad=True)
    w = g.weights(l1, [0, 1, 2])
    exp = [naive_w(1.0, 0.5, 3, 10), naive_w(2.0, 2.0, 3, 10), naive_w(3.0, 3.4, 3, 10)]
    torch.testing.assert_close(w, torch.tensor(exp))
    assert w[1].item() == pytest.approx(1.5)  # D = 0 gives alpha / 2
    assert not w.requires_grad
    # loss = mean(w l); gradient only through l
    g2 = GLOW(alpha=3.0, beta=10.0)
    g2.load_state_dict(g.state_dict())
    g2.discard_staged()
    torch.testing.assert_close(g2(l1, [0, 1, 2]), torch.tensor(exp))   # calling it gives the weights
    g2.discard_staged()
    out = g2.loss(l1, [0, 1, 2])
    out.backward()
    torch.testing.assert_close(l1.grad, torch.tensor(exp) / 3)


def test_unknown_id_falls_back_to_batch_mean():
    g = GLOW()
    g.weights(torch.tensor([1.0]), [0])
    g.end_epoch()
    cur = torch.tensor([0.9, 2.0, 4.0])
    w = g.weights(cur, [0, 7, 8])
    mean = float(cur.mean())
    torch.testing.assert_close(w, torch.tensor([naive_w(1.0, 0.9), naive_w(mean, 2.0), naive_w(mean, 4.0)]))


def test_gradient_accumulation_micro_batches_do_not_see_each_other():
    # sample 5 appears in two micro-batches of the same optimiser step (e.g. a repeat sampler)
    g = GLOW()
    g.weights(torch.tensor([2.0, 2.0, 2.0]), [5, 6, 7])
    g.end_epoch()
    w1 = g.weights(torch.tensor([1.0, 1.5]), [5, 6])
    w2 = g.weights(torch.tensor([1.2, 1.9]), [5, 7])
    # both micro-batches compare against the previous epoch's loss (2.0), not micro-batch 1's 1.0
    torch.testing.assert_close(w2, torch.tensor([naive_w(2.0, 1.2), naive_w(2.0, 1.9)]))
    # order does not matter
    h = GLOW()
    h.weights(torch.tensor([2.0, 2.0, 2.0]), [5, 6, 7])
    h.end_epoch()
    v2 = h.weights(torch.tensor([1.2, 1.9]), [5, 7])
    v1 = h.weights(torch.tensor([1.0, 1.5]), [5, 6])
    torch.testing.assert_close(v1, w1)
    torch.testing.assert_close(v2, w2)
    # after step() the newest staged loss becomes history
    g.step()
    assert g.history[5] == pytest.approx(1.2) and g.history[6] == pytest.approx(1.5)


def test_state_dict_resume_reproduces_weights():
    torch.manual_seed(0)
    a = GLOW(alpha=2.0, beta=5.0)
    ids = list(range(10))
    for _ in range(2):
        a.weights(torch.rand(10), ids)
        a.end_epoch()
    a.weights(torch.rand(5), ids[:5])  # staged, mid-step
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    b = GLOW(**state["hparams"])
    b.load_state_dict(state)
    assert (b.alpha, b.beta, b.epoch) == (2.0, 5.0, 2)
    cur = torch.rand(10)
    a.step(); b.step()
    torch.testing.assert_close(b.weights(cur, ids), a.weights(cur, ids))


def test_glow_bad_input():
    g = GLOW()
    with pytest.raises(ValueError, match="sample_ids"):
        g.weights(torch.rand(3), [1, 2])
    with pytest.raises(ValueError, match="losses"):
        g.weights(torch.rand(3, 2), [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        g.weights(torch.tensor([1.0, float("nan")]), [1, 2])
    with pytest.raises(ValueError, match="alpha"):
        GLOW(alpha=0)
    assert g.loss(torch.zeros(0, requires_grad=True), []).item() == 0.0
    with pytest.raises(ValueError, match="sample_ids"):
        g(torch.rand(3))


def test_load_state_dict_never_overrides_constructor_arguments():
    a = GLOW(alpha=2.0, beta=5.0, warmup_epochs=0)
    a.weights(torch.tensor([1.0, 2.0]), [3, 4])
    a.end_epoch()
    state = a.state_dict()
    assert state["hparams"] == {"alpha": 2.0, "beta": 5.0, "w_min": 0.5, "w_max": 5.0, "warmup_epochs": 0}
    fresh = GLOW()
    with pytest.raises(ValueError, match=r"saved with alpha=2.0 \(constructed 1.0\), beta=5.0 \(constructed 20.0\), "
                                         r"warmup_epochs=0 \(constructed 1\); hyperparameters are not loaded"):
        fresh.load_state_dict(state)
    assert (fresh.alpha, fresh.beta, fresh.epoch, fresh.history) == (1.0, 20.0, 0, {})  # untouched by the failure
    fresh.load_state_dict(state, strict=False)
    assert (fresh.alpha, fresh.beta, fresh.warmup_epochs) == (1.0, 20.0, 1)  # constructor arguments kept
    assert fresh.epoch == 1 and fresh.history == {3: 1.0, 4: 2.0}
    # same hyperparameters: a fresh object continues exactly where the saved one stopped
    same = GLOW(alpha=2.0, beta=5.0, warmup_epochs=0)
    same.load_state_dict(state)
    cur = torch.tensor([0.5, 2.5])
    torch.testing.assert_close(same.weights(cur, [3, 4]), a.weights(cur, [3, 4]))
    torch.testing.assert_close(same.weights(cur, [3, 4]), torch.tensor([naive_w(1.0, 0.5, 2.0, 5.0),
                                                                        naive_w(2.0, 2.5, 2.0, 5.0)]))
    with pytest.raises(KeyError, match="the state has no history"):
        same.load_state_dict({"epoch": 0, "pending": state["pending"]})


def test_glow_is_a_registered_weighter():
    import losskit

    s = losskit.spec("glow")
    assert (s.kind, s.family, s.cls) == ("weighter", "robust", GLOW)
    assert "glow" in losskit.names(kind="weighter")
    g = losskit.get("glow", beta=5.0)
    assert isinstance(g, GLOW) and g.hparams["beta"] == 5.0 and g.beta == 5.0
    w = g.weights(torch.rand(4), torch.arange(4))
    assert w.shape == (4,)


@pytest.mark.parametrize("kw,msg", [
    ({"alpha": 0.0}, r"alpha: expected a value > 0.0, got 0.0"),
    ({"alpha": float("nan")}, r"alpha: expected a finite number > 0.0, got nan"),
    ({"beta": -1.0}, r"beta: expected a value > 0.0, got -1.0"),
    ({"beta": float("nan")}, r"beta: expected a finite number > 0.0, got nan"),
    ({"w_min": -0.1}, r"w_min: expected a value >= 0.0, got -0.1"),
    ({"w_min": float("nan")}, r"w_min: expected a finite number >= 0.0, got nan"),
    ({"w_max": 0.1}, r"w_max: expected a value >= 0.5, got 0.1"),
    ({"w_max": float("inf")}, r"w_max: expected a finite number >= 0.5, got inf"),
    ({"w_max": float("nan")}, r"w_max: expected a finite number >= 0.5, got nan"),
    ({"warmup_epochs": -1}, r"warmup_epochs: expected an integer >= 0, got -1"),
    ({"warmup_epochs": 1.5}, r"warmup_epochs: expected an integer >= 0, got float 1.5"),
])
def test_glow_hyperparameters_checked_at_construction(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        GLOW(**kw)


def test_history_table_ids_and_growth():
    g = GLOW(warmup_epochs=0)
    with pytest.raises(ValueError, match=r"sample_ids: expected ids in \[0, 2\^28\)"):
        g.weights(torch.rand(2), [3, -1])
    with pytest.raises(ValueError, match=r"sample_ids: expected ids in \[0, 2\^28\)"):
        g.weights(torch.rand(1), [1 << 28])
    with pytest.raises(ValueError, match="sample_ids: expected a \\[B\\] integer tensor"):
        g.weights(torch.rand(2), torch.tensor([0.0, 1.0]))
    assert g.history == {} and g.pending == {}
    # ids far apart: the table grows; every committed loss is history, a later loss of an id wins
    g.weights(torch.tensor([1.0, 2.0]), [0, 5000])
    g.weights(torch.tensor([3.0]), [0])               # a second micro-batch of the same step
    assert g.pending == {0: 3.0, 5000: 2.0}
    g.step()
    assert g.history == {0: 3.0, 5000: 2.0} and g.pending == {}
    w = g.weights(torch.tensor([3.0, 1.0, 7.0]), torch.tensor([0, 5000, 77]))
    torch.testing.assert_close(w, torch.tensor([naive_w(3.0, 3.0), naive_w(2.0, 1.0), naive_w(11 / 3, 7.0)]))
    g.discard_staged()
    g.step()
    assert g.history == {0: 3.0, 5000: 2.0}           # the discarded losses never became history


def test_staged_losses_are_copies():
    g = GLOW(warmup_epochs=0)
    l, ids = torch.tensor([1.0, 2.0]), torch.tensor([4, 6])
    g.weights(l, ids)
    l.add_(10.0)
    ids.add_(1)
    g.step()
    assert g.history == {4: 1.0, 6: 2.0}
