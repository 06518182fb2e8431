import pytest
import torch
from torch import nn

from losskit.recipes.drift import DSATRecord, SamplingPolicy, run_drift


class TabularPolicy(nn.Module):
    """pi(y | x) = softmax(logits[x]); with a refine context (x, y_dsat, feedback) it samples from
    softmax(logits[x] + feedback) without y_dsat: the feedback shifts it toward better responses."""

    def __init__(self, prompts=8, responses=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(0.1 * torch.randn(prompts, responses, generator=g))
        self.g = torch.Generator().manual_seed(seed + 1)

    def sample(self, contexts):
        out = []
        for x, dsat, fb in contexts:
            z = self.logits[x].detach().clone()
            if fb is not None:
                z = z + fb
            if dsat is not None:
                z[dsat] = -float("inf")
            out.append(int(torch.multinomial(torch.softmax(z, 0), 1, generator=self.g)))
        return out

    def logprobs(self, prompts, responses):
        lp = torch.log_softmax(self.logits[torch.as_tensor(prompts)], -1)
        return lp.gather(1, torch.as_tensor(responses)[:, None]).squeeze(1)

    def lengths(self, responses):
        return [1] * len(responses)


def test_drift_improves_toy_policy_and_keeps_margin():
    P, K = 8, 6
    quality = torch.arange(K, dtype=torch.float32).repeat(P, 1)  # response k has true reward k
    pol = TabularPolicy(P, K)
    assert isinstance(pol, SamplingPolicy)
    # DSAT: each prompt's worst two responses; feedback: a noisy hint towards higher quality
    g = torch.Generator().manual_seed(5)
    records = []
    for x in range(P):
        for y in (0, 1):
            records.append(DSATRecord(x, y, feedback=0.5 * quality[x] + 0.5 * torch.randn(K, generator=g)))

    def true_reward(policy):
        with torch.no_grad():
            return float((torch.softmax(policy.logits, -1) * quality).sum(-1).mean())

    def p_dsat(policy):
        with torch.no_grad():
            return float(torch.softmax(policy.logits, -1)[:, :2].sum(-1).mean())

    r0, d0 = true_reward(pol), p_dsat(pol)
    logs = run_drift(pol, records, iterations=3, steps_per_iteration=40, batch_size=16, beta=0.5,
                 callback=lambda t, m: {"reward": true_reward(m)}, seed=0)
    assert [lg.iteration for lg in logs] == [1, 2, 3]
    assert all(lg.pairs == len(records) for lg in logs)
    assert all(lg.margin_mean > 0 for lg in logs)  # anchored negatives: the margin does not vanish
    assert all(lg.loss_last < lg.loss_first for lg in logs)
    rewards = [lg.extra["reward"] for lg in logs]
    assert rewards[-1] > r0 + 1.0
    assert p_dsat(pol) < 0.5 * d0


def test_drift_reference_is_previous_iterate_and_seed_stage():
    pol = TabularPolicy(2, 4)
    init = pol.logits.detach().clone()
    seen, snaps = [], []
    orig = TabularPolicy.logprobs

    def spy(self, prompts, responses):
        if not self.training:  # the frozen reference copy is in eval mode
            seen.append(self.logits.detach().clone())
        return orig(self, prompts, responses)

    TabularPolicy.logprobs = spy
    try:
        recs = [DSATRecord(0, 0), DSATRecord(1, 0)]
        logs = run_drift(pol, recs, iterations=2, steps_per_iteration=5, batch_size=2,
                     seed_pairs=[(0, 3, 0), (1, 3, 0)],
                     callback=lambda t, m: snaps.append(m.logits.detach().clone()))
    finally:
        TabularPolicy.logprobs = orig
    assert [lg.iteration for lg in logs] == [0, 1, 2]
    assert len(seen) == 6 and len(snaps) == 3  # two reference calls (chosen, rejected) per stage
    torch.testing.assert_close(seen[0], init)  # seed stage: reference = initial policy
    torch.testing.assert_close(seen[2], snaps[0])  # iteration 1: reference = end of seed stage
    torch.testing.assert_close(seen[4], snaps[1])  # iteration 2: reference = pi_1
    assert not torch.equal(snaps[1], snaps[0])


def test_drift_rejects_non_policy():
    with pytest.raises(TypeError, match="sample"):
        run_drift(nn.Linear(2, 2), [DSATRecord(0, 0)])


def test_import_gives_the_module_and_the_registry_lists_the_recipe():
    import importlib
    import types

    import losskit
    import losskit.recipes
    import losskit.recipes.drift

    mod = importlib.import_module("losskit.recipes.drift")
    assert isinstance(mod, types.ModuleType) and mod.__name__ == "losskit.recipes.drift"
    assert losskit.recipes.drift is mod
    assert losskit.recipes.run_drift is mod.run_drift
    with pytest.raises(AttributeError, match="renamed run_drift"):
        mod.drift  # noqa: B018
    s = losskit.spec("drift")
    assert (s.kind, s.family, s.cls) == ("recipe", "preference", mod.run_drift)
    assert "drift" in losskit.names(kind="recipe") and "drift" not in losskit.names()
    assert s.hparams["iterations"] == 3 and s.hparams["nll_weight"] == 0.001


def test_registry_binds_the_options():
    import losskit

    recipe = losskit.get("drift", iterations=1, steps_per_iteration=3, batch_size=2, seed=1)
    pol = TabularPolicy(2, 4)
    logs = recipe(pol, [DSATRecord(0, 0), DSATRecord(1, 0)])
    assert [lg.iteration for lg in logs] == [1] and logs[0].pairs == 2
    with pytest.raises(TypeError, match="has no hyperparameter 'iteration'"):
        losskit.get("drift", iteration=1)


@pytest.mark.parametrize("kw,msg", [
    ({"iterations": -1}, r"iterations: expected an integer >= 0, got -1"),
    ({"steps_per_iteration": 0}, r"steps_per_iteration: expected an integer >= 1, got 0"),
    ({"batch_size": 0}, r"batch_size: expected an integer >= 1, got 0"),
    ({"beta": float("nan")}, r"beta: expected a finite number > 0.0, got nan"),
    ({"beta": 0.0}, r"beta: expected a value > 0.0, got 0.0"),
    ({"nll_weight": -0.1}, r"nll_weight: expected a value >= 0.0, got -0.1"),
])
def test_drift_options_are_checked(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        run_drift(TabularPolicy(2, 4), [DSATRecord(0, 0)], **kw)
