"""The preference contracts: one validated PreferenceBatch, one forward, one reduction,
hyperparameters checked at construction (by message)."""

import math

import pytest
import torch

import losskit
from losskit import PreferenceBatch
from losskit.functional import preference as P
from losskit.losses.preference import PreferenceObjective

NAMES = ["dpo", "hinge", "ipo", "robust", "beta-dpo", "madpo"]


def pairs(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(b, generator=g, dtype=torch.float64) * 10) for _ in range(4)]


def extra(name, b):
    if name == "madpo":
        return {"reward_margin": torch.linspace(-2, 2, b, dtype=torch.float64)}
    if name == "beta-dpo":
        return {"generator": torch.Generator().manual_seed(0)}
    return {}


def build(name, **hp):
    loss = losskit.get(name, **hp)
    return loss.eval() if name == "beta-dpo" else loss  # eval: no state update between the two calls compared


# ---- ipo (and every loss) refuses one length without the other -------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_one_length_without_the_other_is_an_error_on_every_path(name):
    x = pairs()
    lc = torch.full((6,), 3.0, dtype=torch.float64)
    loss = build(name)
    with pytest.raises(ValueError, match="chosen_lengths: given without rejected_lengths; pass the token counts"):
        loss(*x, chosen_lengths=lc, **extra(name, 6))
    with pytest.raises(ValueError, match="rejected_lengths: given without chosen_lengths"):
        loss(*x, rejected_lengths=lc, **extra(name, 6))
    with pytest.raises(ValueError, match="chosen_lengths: given without rejected_lengths"):
        PreferenceBatch(*x, chosen_lengths=lc)


def test_ipo_one_length_used_to_skip_normalisation_silently():
    # the regression: ipo's default length_normalize=None with only chosen_lengths was the unnormalised loss
    x = pairs()
    with pytest.raises(ValueError, match="chosen_lengths: given without rejected_lengths"):
        losskit.get("ipo")(*x, chosen_lengths=torch.full((6,), 4.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="length_normalize=True needs chosen_lengths and rejected_lengths"):
        P.ipo_loss(PreferenceBatch(*x), length_normalize=True)


# ---- one value, one forward ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_batch_as_single_argument_equals_the_familiar_call(name):
    x = pairs()
    kw = dict(chosen_lengths=torch.arange(1, 7).double(), rejected_lengths=torch.arange(2, 8).double(),
              margin=torch.rand(6, dtype=torch.float64), chosen_nll=torch.rand(6, dtype=torch.float64))
    loss = build(name, nll_weight=0.3, reduction="none")
    a = loss(*x, **kw, **extra(name, 6))
    b = loss(PreferenceBatch(*x, **kw), **extra(name, 6))
    torch.testing.assert_close(a, b)
    assert a.shape == (6,)
    w = torch.rand(6, dtype=torch.float64)
    torch.testing.assert_close(loss(PreferenceBatch(*x, **kw), sample_weight=w, **extra(name, 6)), a * w)


def test_functional_forms_take_a_batch_and_match_the_modules():
    x = pairs()
    batch = PreferenceBatch(*x, margin=0.2)
    torch.testing.assert_close(P.dpo_loss(batch, beta=0.3), losskit.get("dpo", beta=0.3)(*x, margin=0.2))
    torch.testing.assert_close(P.robust_dpo_loss(batch, 0.3, 0.2, reduction="sum"),
                               losskit.get("robust", beta=0.3, epsilon=0.2, reduction="sum")(batch))
    # the plain formula, written out: -log sigma(beta h - margin)
    h = (x[0] - x[2]) - (x[1] - x[3])
    torch.testing.assert_close(P.dpo_loss(batch, beta=0.3, reduction="none"),
                               torch.log1p(torch.exp(-(0.3 * h - 0.2))))
    with pytest.raises(TypeError, match="batch: expected a losskit.PreferenceBatch"):
        P.dpo_loss(x[0], beta=0.1)


def test_batch_with_other_fields_or_missing_tensors_is_refused():
    x = pairs()
    loss = losskit.get("dpo")
    with pytest.raises(TypeError, match="together with chosen_lengths; set those fields on the PreferenceBatch"):
        loss(PreferenceBatch(*x), chosen_lengths=torch.ones(6))
    with pytest.raises(TypeError, match="together with policy_rejected_logps"):
        loss(PreferenceBatch(*x), x[1])
    with pytest.raises(TypeError, match="missing ref_chosen_logps, ref_rejected_logps"):
        loss(x[0], x[1])


def test_batch_validates_margin_and_chosen_nll():
    x = pairs()
    with pytest.raises(ValueError, match=r"margin: expected a float or shape \[6\].*\[2\]"):
        PreferenceBatch(*x, margin=torch.zeros(2))
    with pytest.raises(ValueError, match="margin: expected a finite float"):
        PreferenceBatch(*x, margin=float("nan"))
    with pytest.raises(ValueError, match="margin: expected finite"):
        PreferenceBatch(*x, margin=torch.full((6,), float("inf")))
    with pytest.raises(ValueError, match=r"chosen_nll: expected shape \[6\]"):
        PreferenceBatch(*x, chosen_nll=torch.zeros(()))
    with pytest.raises(ValueError, match="chosen_nll: expected finite"):
        PreferenceBatch(*x, chosen_nll=torch.full((6,), float("nan")))
    b = PreferenceBatch(*[t.float() for t in x], margin=1, chosen_lengths=[1, 2, 3, 4, 5, 6],
                        rejected_lengths=torch.ones(6, dtype=torch.long))
    assert b.margin.dtype == torch.float32 and b.margin.dim() == 0 and b.chosen_lengths.dtype == torch.float32


def test_unknown_and_missing_inputs():
    x = pairs()
    with pytest.raises(TypeError, match="dpo: unexpected keyword reward_margin; accepted: chosen_lengths"):
        losskit.get("dpo")(*x, reward_margin=torch.zeros(6))
    with pytest.raises(TypeError, match=r"madpo needs reward_margin= \(a \[B\] tensor"):
        losskit.get("madpo")(*x)
    assert "reward_margin" in losskit.get("madpo").input_names
    assert "reward_margin" not in losskit.get("dpo").input_names
    assert set(losskit.get("dpo").input_names) == {"chosen_lengths", "rejected_lengths", "margin", "chosen_nll",
                                                   "sample_weight"}


@pytest.mark.parametrize("name", NAMES)
def test_reduction_none_is_B_and_mean_sum_agree(name):
    x = pairs(b=5)
    per = build(name, reduction="none")(*x, **extra(name, 5))
    assert per.shape == (5,)
    if name != "beta-dpo":  # its mean divides by the kept pairs (tested in test_preference_losses)
        torch.testing.assert_close(build(name)(*x, **extra(name, 5)), per.mean())
    torch.testing.assert_close(build(name, reduction="sum")(*x, **extra(name, 5)), per.sum())
    empty = [torch.zeros(0, dtype=torch.float64) for _ in range(4)]
    assert build(name, reduction="none")(*empty, **extra(name, 0)).shape == (0,)


# ---- hyperparameters: checked once, at construction, named in the error ----------------------------------

COMMON = [("beta", 0.0, r"beta: expected a value > 0.0, got 0.0"),
          ("nll_weight", -1.0, r"nll_weight: expected a value >= 0.0, got -1.0")]
OWN = {
    "robust": [("epsilon", 0.5, r"epsilon: expected a value in \[0.0, 0.5\), got 0.5")],
    "madpo": [("c_max", 1.0, r"c_max: expected a value > 1.0, got 1.0"),
              ("c_min", 1.0, r"c_min: expected a value in \(0.0, 1.0\), got 1.0"),
              ("lam", 0.0, r"lam: expected a value > 0.0, got 0.0"),
              ("tau", -1.0, r"tau: expected a value > 0.0, got -1.0")],
    "beta-dpo": [("alpha", -0.1, r"alpha: expected a value >= 0.0, got -0.1"),
                 ("keep_ratio", 1.5, r"keep_ratio: expected a value in \(0.0, 1.0\], got 1.5"),
                 ("momentum", 0.0, r"momentum: expected a value in \(0.0, 1.0\], got 0.0"),
                 ("min_beta", 0.0, r"min_beta: expected a value > 0.0, got 0.0")],
}
CASES = [(n, hp, bad, msg) for n in NAMES for hp, bad, msg in COMMON + OWN.get(n, [])]


@pytest.mark.parametrize("name,hp,bad,msg", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_hparam_nan_and_out_of_range(name, hp, bad, msg):
    with pytest.raises(ValueError, match=msg):
        losskit.get(name, **{hp: bad})
    with pytest.raises(ValueError, match=rf"{hp}: expected a finite number.*got nan"):
        losskit.get(name, **{hp: float("nan")})
    with pytest.raises(ValueError, match=rf"{hp}: expected a finite number.*got inf"):
        losskit.get(name, **{hp: float("inf")})


@pytest.mark.parametrize("name", NAMES)
def test_choice_hparams(name):
    with pytest.raises(TypeError, match="length_normalize: expected True or False or None, got 'yes'"):
        losskit.get(name, length_normalize="yes")
    with pytest.raises(ValueError, match="reduction: expected one of"):
        losskit.get(name, reduction="avg")
    with pytest.raises(TypeError, match="beta: expected a real number"):
        losskit.get(name, beta="0.1")


def test_official_gap_is_a_bool_and_hparams_are_captured_once():
    with pytest.raises(TypeError, match="official_gap: expected True or False"):
        losskit.get("beta-dpo", official_gap=1)
    loss = losskit.get("robust", epsilon=0.2)
    assert loss.hparams == {"beta": 0.1, "epsilon": 0.2, "length_normalize": False, "nll_weight": 0.0,
                            "reduction": "mean"}
    assert loss.epsilon == 0.2 and "_hp" not in vars(loss)
    assert "epsilon=0.2" in repr(loss)


def test_functional_forms_check_their_hyperparameters_too():
    b = PreferenceBatch(*pairs())
    with pytest.raises(ValueError, match="beta: expected a finite number"):
        P.dpo_loss(b, beta=math.nan)
    with pytest.raises(ValueError, match="epsilon: expected a value"):
        P.robust_dpo_loss(b, epsilon=-0.1)
    with pytest.raises(ValueError, match="nll_weight: expected a value >= 0.0"):
        P.hinge_loss(b, nll_weight=-1)
    with pytest.raises(ValueError, match="c_min: expected a value"):
        P.madpo_weights(torch.zeros(2), c_min=0.0)


def test_a_new_loss_is_its_formula_plus_a_registration():
    from losskit.core import registry

    def squared(batch, beta=1.0, *, length_normalize=False, nll_weight=0.0, sample_weight=None, reduction="mean"):
        h = P.preference_logratio(batch, length_normalize)
        return P._reduce(batch, (beta * h) ** 2, nll_weight, sample_weight, reduction)

    @registry.register("test-squared-po", family="preference", task="preference")
    class Squared(PreferenceObjective):
        fn = staticmethod(squared)
        defaults = {"beta": 1.0}

    try:
        s = registry.spec("test-squared-po")
        assert s.hparams == {"beta": 1.0, "length_normalize": False, "nll_weight": 0.0, "reduction": "mean"}
        assert Squared(3.0).beta == 3.0 and Squared(reduction="sum").hparams["reduction"] == "sum"
        with pytest.raises(TypeError, match="Squared: got an unexpected keyword argument 'gamma'"):
            Squared(gamma=1.0)
        x = pairs()
        h = (x[0] - x[2]) - (x[1] - x[3])
        got = losskit.get("test-squared-po", beta=2.0, reduction="none")(*x)
        torch.testing.assert_close(got, (2 * h) ** 2)
        with pytest.raises(ValueError, match="beta: expected a value > 0.0"):
            losskit.get("test-squared-po", beta=-1.0)
    finally:
        registry._REGISTRY.pop("test-squared-po")


# ---- no host synchronisation with value checks off ---------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_forward_makes_no_host_sync_with_checks_off(name, monkeypatch):
    x = [t.clone().requires_grad_() for t in pairs()]
    lengths = dict(chosen_lengths=torch.arange(1, 7).double(), rejected_lengths=torch.arange(2, 8).double())
    loss = losskit.get(name, nll_weight=0.1)
    kw = extra(name, 6)

    def boom(*a, **k):
        raise AssertionError("host synchronisation")

    with losskit.tensor_checks(False):
        for attr in ("item", "tolist", "__bool__", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, attr, boom)
        out = loss(*x, **lengths, sample_weight=torch.ones(6, dtype=torch.float64), **kw)
        monkeypatch.undo()
    assert torch.isfinite(out)
    # and with checks on, the same call does synchronise (the patch can catch it)
    for attr in ("__bool__",):
        monkeypatch.setattr(torch.Tensor, attr, boom)
    with pytest.raises(AssertionError, match="host synchronisation"):
        loss(*x, **lengths, **kw)


def test_unregistered_subclass_with_explicit_init_and_plain_construction():
    class Plain(PreferenceObjective):
        fn = staticmethod(P.dpo_loss)

        def __init__(self, beta=0.5):
            super().__init__(beta=beta)

    p = Plain()
    assert p.hparams == {"beta": 0.5} and p.beta == 0.5
    x = pairs()
    torch.testing.assert_close(p(*x), P.dpo_loss(PreferenceBatch(*x), beta=0.5))
    with pytest.raises(ValueError, match="beta: expected a value > 0.0, got -1.0"):
        Plain(-1.0)
