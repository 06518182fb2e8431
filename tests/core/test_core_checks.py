"""core/checks.py: every validator, messages that name the argument, and the
tensor_checks switch (with checks off: no host synchronisation)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import losskit
from losskit.core import checks as C
from losskit.core.context import PairReference, PreferenceBatch


# ---------------------------------------------------------------- hyperparameters

def test_check_hparam_ranges_and_messages():
    assert C.check_hparam("scale", 64) == 64.0 and isinstance(C.check_hparam("scale", 64), float)
    assert C.check_hparam("m", 0.0, low=0.0) == 0.0  # inclusive by default
    assert C.check_hparam("m", 1.0, high=1.0) == 1.0
    assert C.check_hparam("m", torch.tensor(0.5), low=0, high=1) == 0.5  # a scalar tensor
    with pytest.raises(ValueError, match=r"^m: expected a value > 0\.0, got 0\.0$"):
        C.check_hparam("m", 0.0, low=0.0, low_open=True)
    with pytest.raises(ValueError, match=r"^m: expected a value in \[0, 3\.14\), got 3\.14$"):
        C.check_hparam("m", 3.14, low=0, high=3.14, high_open=True)
    with pytest.raises(ValueError, match=r"^m1: expected a value >= 0, got -1\.0$"):
        C.check_hparam("m1", -1, low=0)
    with pytest.raises(ValueError, match=r"^beta: expected a value <= 1, got 2\.0$"):
        C.check_hparam("beta", 2, high=1)
    with pytest.raises(ValueError, match=r"^lam: expected a finite number in \(0, 1\], got nan$"):
        C.check_hparam("lam", float("nan"), low=0, high=1, low_open=True)
    with pytest.raises(ValueError, match=r"^tau: expected a finite number, got inf$"):
        C.check_hparam("tau", math.inf)
    assert C.check_hparam("tau", math.inf, finite=False) == math.inf
    with pytest.raises(ValueError, match="tau: expected a finite number, got nan"):
        C.check_hparam("tau", math.nan, finite=False)  # NaN is always refused
    assert C.check_hparam("std", None, allow_none=True) is None
    with pytest.raises(TypeError, match=r"^std: expected a real number >= 0, got NoneType None$"):
        C.check_hparam("std", None, low=0)
    with pytest.raises(TypeError, match=r"^flag: expected a real number, got bool True$"):
        C.check_hparam("flag", True)
    with pytest.raises(TypeError, match="margin: expected a real number, got str '0.5'"):
        C.check_hparam("margin", "0.5")


def test_check_int_choice_bool_reduction():
    assert C.check_int("k", 4, low=1) == 4
    assert C.check_int("k", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"^k: expected an integer in \[1, 8\], got 9$"):
        C.check_int("k", 9, low=1, high=8)
    with pytest.raises(TypeError, match=r"^k: expected an integer >= 1, got float 2\.0$"):
        C.check_int("k", 2.0, low=1)
    with pytest.raises(TypeError, match=r"^k: expected an integer or None, got bool True$"):
        C.check_int("k", True, allow_none=True)
    assert C.check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"^mode: expected one of \('a', 'b'\), got 'c'$"):
        C.check_choice("mode", "c", ["a", "b"])
    assert C.check_bool("plus", False) is False
    assert C.check_bool("plus", None, allow_none=True) is None
    with pytest.raises(TypeError, match=r"^plus: expected True or False, got 1$"):
        C.check_bool("plus", 1)
    for r in ("mean", "sum", "none"):
        assert C.check_reduction(r) == r
    with pytest.raises(ValueError, match=r"^reduction: expected one of \('mean', 'sum', 'none'\), got 'avg'$"):
        C.check_reduction("avg")


# ---------------------------------------------------------------- tensors

def test_check_finite_names_the_argument_value_and_index():
    x = torch.zeros(3, 4)
    assert C.check_finite(x, "x") is x
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^x: expected finite values, got nan at index \(1, 2\)$"):
        C.check_finite(x, "x")
    v = torch.tensor([0.0, 0.0, -math.inf])
    with pytest.raises(ValueError, match=r"^logps: expected finite log-probabilities, got -inf at index 2$"):
        C.check_finite(v, "logps", "log-probabilities")
    C.check_finite(torch.zeros(0), "empty")
    C.check_finite(torch.full((2,), math.nan, device="meta"), "meta")  # no data to read


def test_check_embeddings():
    e = torch.randn(3, 2)
    assert C.check_embeddings(e) is e
    assert C.check_embeddings(torch.zeros(0, 5)).shape == (0, 5)
    with pytest.raises(TypeError, match=r"^embeddings: expected a torch.Tensor of shape \[B, D\], got list$"):
        C.check_embeddings([[1.0]])
    with pytest.raises(ValueError, match=r"^queries: expected shape \[B, D\], got \[3\]$"):
        C.check_embeddings(torch.randn(3), "queries")
    with pytest.raises(TypeError, match=r"^embeddings: expected a floating-point tensor, got dtype torch.int64$"):
        C.check_embeddings(torch.ones(2, 2, dtype=torch.long))
    for bad in (math.nan, math.inf, -math.inf):
        e = torch.randn(3, 2)
        e[2, 1] = bad
        with pytest.raises(ValueError, match=r"^embeddings: expected finite values, got .* at index \(2, 1\)$"):
            C.check_embeddings(e)
        assert C.check_embeddings(e, finite=False) is e


def test_check_vector():
    like = torch.zeros(3)
    v = torch.ones(3)
    assert C.check_vector(v, "margin", 3, like) is v
    with pytest.raises(TypeError, match=r"^margin: expected a torch.Tensor of shape \[3\] \(one value per row\), "
                                        r"got float$"):
        C.check_vector(1.0, "margin", 3)
    with pytest.raises(ValueError, match=r"^margin: expected shape \[3\] \(one value per row\), got \[2\]$"):
        C.check_vector(torch.ones(2), "margin", 3)
    with pytest.raises(ValueError, match=r"^margin: expected shape \[B\] \(pair offsets\), got \[3, 1\]$"):
        C.check_vector(torch.ones(3, 1), "margin", what="pair offsets")
    with pytest.raises(TypeError, match=r"^margin: expected a floating-point tensor, got dtype torch.int64$"):
        C.check_vector(torch.ones(3, dtype=torch.long), "margin", 3)
    assert C.check_vector(torch.ones(3, dtype=torch.long), "n", 3, floating=False).dtype == torch.long
    with pytest.raises(ValueError, match=r"^margin: expected finite values, got nan at index 1$"):
        C.check_vector(torch.tensor([0.0, math.nan, 0.0]), "margin", 3)
    assert C.check_vector(torch.tensor([math.inf]), "m", 1, finite=False).shape == (1,)
    with pytest.raises(ValueError, match=r"^margin: expected device meta, got cpu$"):
        C.check_vector(v, "margin", 3, torch.zeros(3, device="meta"))


def test_check_labels():
    y = torch.tensor([0, 2, 1])
    assert C.check_labels(y, 3, num_classes=3) is y
    with pytest.raises(TypeError, match=r"^labels: expected an integer torch.Tensor of shape \[3\], got list$"):
        C.check_labels([0, 1, 2], 3)
    with pytest.raises(ValueError, match=r"^labels: expected shape \[4\] \(one label per embedding\), got \[3\]$"):
        C.check_labels(y, 4)
    with pytest.raises(ValueError, match=r"got \[3, 1\]"):
        C.check_labels(y[:, None], 3)
    for dt in (torch.float32, torch.bool):
        with pytest.raises(TypeError, match=rf"^ref_labels: expected an integer dtype \(torch.long\), got {dt}$"):
            C.check_labels(y.to(dt), 3, "ref_labels")
    with pytest.raises(ValueError, match=r"^labels: expected values in \[0, 2\] \(num_classes=3\), got 3$"):
        C.check_labels(torch.tensor([0, 3]), 2, num_classes=3)
    with pytest.raises(ValueError, match=r"^labels: expected values in \[0, 2\] \(num_classes=3\), got -1$"):
        C.check_labels(torch.tensor([-1, 0]), 2, num_classes=3)
    assert C.check_labels(torch.tensor([-1, 0]), 2, num_classes=3, allow_ignore=True).shape == (2,)
    with pytest.raises(ValueError, match=r"^labels: expected values in \[-1, 2\] \(num_classes=3\), got -2$"):
        C.check_labels(torch.tensor([-2, 0]), 2, num_classes=3, allow_ignore=True)
    with pytest.raises(ValueError, match=r"^labels: expected device meta \(the embeddings' device\), got cpu$"):
        C.check_labels(y, 3, device=torch.device("meta"))
    assert C.check_labels(torch.zeros(0, dtype=torch.long), 0, num_classes=3).shape == (0,)


def test_check_sample_weight():
    like = torch.zeros(3, dtype=torch.float64)
    assert C.check_sample_weight(None, 3, like) is None
    w = C.check_sample_weight([1, 2, 0], 3, like)  # a list is converted
    assert w.dtype == torch.float64 and w.tolist() == [1.0, 2.0, 0.0]
    assert C.check_sample_weight(torch.ones(3, dtype=torch.long), 3, like).dtype == torch.float64
    with pytest.raises(ValueError, match=r"^sample_weight: expected shape \[3\] \(one weight per row\), got \[2\]$"):
        C.check_sample_weight(torch.ones(2), 3, like)
    with pytest.raises(ValueError, match=r"got \[3, 1\]"):
        C.check_sample_weight(torch.ones(3, 1), 3, like)
    with pytest.raises(TypeError, match=r"^sample_weight: expected a real tensor, got dtype torch.bool$"):
        C.check_sample_weight(torch.ones(3, dtype=torch.bool), 3, like)
    with pytest.raises(ValueError, match=r"^sample_weight: expected finite values, got NaN or inf$"):
        C.check_sample_weight(torch.tensor([1.0, math.inf, 0.0]), 3, like)
    with pytest.raises(ValueError, match=r"^sample_weight: expected values >= 0, got min -0\.5$"):
        C.check_sample_weight(torch.tensor([1.0, -0.5, 0.0]), 3, like)
    with pytest.raises(ValueError, match=r"^sample_weight: expected device meta, got cpu$"):
        C.check_sample_weight(torch.ones(3), 3, torch.zeros(3, device="meta"))


# ---------------------------------------------------------------- the switch

def test_switch_and_context_manager_restore_the_setting():
    assert C.tensor_checks_enabled()
    with losskit.tensor_checks(False):
        assert not C.tensor_checks_enabled()
        with losskit.tensor_checks(True):
            assert C.tensor_checks_enabled()
        assert not C.tensor_checks_enabled()
    assert C.tensor_checks_enabled()
    with pytest.raises(RuntimeError):
        with losskit.tensor_checks(False):
            raise RuntimeError("boom")
    assert C.tensor_checks_enabled()  # restored after an exception
    assert losskit.set_tensor_checks(False) is True
    try:
        assert losskit.set_tensor_checks(False) is False
    finally:
        assert losskit.set_tensor_checks(True) is False
    assert C.tensor_checks_enabled()


def _bad_inputs():
    e = torch.randn(4, 3)
    e[0, 0] = math.nan
    return dict(
        emb=e,
        labels=torch.tensor([0, 1, 5, -3]),
        weight=torch.tensor([1.0, -1.0, math.nan, 0.0]),
        vec=torch.tensor([math.inf, 0.0, 0.0, 0.0]),
    )


def _run_all_validators(d):
    C.check_finite(d["emb"], "x")
    C.check_embeddings(d["emb"])
    C.check_labels(d["labels"], 4, num_classes=3)
    C.check_labels(d["labels"], 4, num_classes=3, allow_ignore=True)
    C.check_sample_weight(d["weight"], 4, d["emb"])
    C.check_vector(d["vec"], "v", 4, d["emb"])
    ok = torch.randn(4, 3)
    PairReference(ok, torch.tensor([0, 1, 0, 1]), self_index=torch.tensor([0, 9, -4, 1])).resolve(
        ok, torch.tensor([0, 1, 0, 1]))
    lp = torch.tensor([-1.0, math.nan, -2.0, -3.0])
    PreferenceBatch(lp, lp, lp, lp, torch.tensor([1, 0, -2, 3]), torch.tensor([1, 2, 3, 4]))


@contextlib.contextmanager
def _host_sync_raises():
    """Make every host synchronisation of a tensor an error."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def boom(self, *a, **k):
        raise AssertionError("host synchronisation")

    for n in names:
        setattr(torch.Tensor, n, boom)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_with_checks_off_nothing_is_refused_and_nothing_syncs():
    d = _bad_inputs()
    with losskit.tensor_checks(False), _host_sync_raises():
        _run_all_validators(d)
    # the same calls with checks on do read the data (so the patch above is effective)
    with _host_sync_raises(), pytest.raises(AssertionError, match="host synchronisation"):
        C.check_embeddings(torch.randn(2, 2))
    with pytest.raises(ValueError, match="embeddings: expected finite values"):
        C.check_embeddings(d["emb"])


def test_shape_and_type_checks_still_run_with_checks_off():
    with losskit.tensor_checks(False):
        with pytest.raises(ValueError, match=r"embeddings: expected shape \[B, D\]"):
            C.check_embeddings(torch.zeros(3))
        with pytest.raises(ValueError, match=r"labels: expected shape \[2\]"):
            C.check_labels(torch.zeros(3, dtype=torch.long), 2)
        with pytest.raises(ValueError, match=r"sample_weight: expected shape \[2\]"):
            C.check_sample_weight(torch.ones(3), 2, torch.zeros(2))
        with pytest.raises(ValueError, match="hidden: expected a value >= 0"):
            C.check_hparam("hidden", -1, low=0)  # hyperparameters are always checked
