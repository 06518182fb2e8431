"""The suite itself: a new entry gets every contract by registering (a
minimal correct objective passes them all), and an entry the suite cannot
build inputs for is a failure naming it, never a silent skip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import test_objective_contracts as T
from contract_cases import objective_cases
from losskit.core import registry as R
from losskit.core.checks import check_embeddings, check_hparam, check_labels, check_reduction, check_sample_weight
from losskit.core.reduction import reduce_loss


class _Reference(nn.Module):
    """Cosine-free linear softmax written to the contracts."""

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 2.0, reduction: str = "mean"):
        super().__init__()
        self.scale = check_hparam("scale", scale, low=0, low_open=True)
        self.reduction = check_reduction(reduction)
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.3)

    def forward(self, embeddings, labels, sample_weight=None):
        x = check_embeddings(embeddings)
        check_labels(labels, x.shape[0], device=x.device, num_classes=self.weight.shape[0])
        sw = check_sample_weight(sample_weight, x.shape[0], x)
        ct = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        logits = F.linear(x.to(ct), self.weight.to(ct)) * self.scale
        per = F.cross_entropy(logits, labels, reduction="none")
        return reduce_loss(per, self.reduction, sw, checked=True)


@pytest.fixture
def registered(monkeypatch):
    R._load_all()
    snap = dict(R._REGISTRY)
    R.register("test-fake-reference", family="baseline", paper=R.Paper("fake", 2024))(_Reference)

    class Other(nn.Module):
        def __init__(self, reduction: str = "mean"):
            super().__init__()

    R.register("test-fake-other", family="baseline", task="other")(Other)

    class NeedsK(nn.Module):
        def __init__(self, k: int, reduction: str = "mean"):
            super().__init__()

    R.register("test-fake-needs-k", family="pair")(NeedsK)
    yield {c.id: c for c in objective_cases()}
    R._REGISTRY.clear()
    R._REGISTRY.update(snap)


CONTRACTS = [
    T.test_none_sum_mean_agree, T.test_none_rows_follow_the_input_rows, T.test_zero_sample_weight_gives_zero_gradient,
    T.test_empty_batch_is_a_finite_zero_connected_to_the_graph, T.test_one_class_batch_is_finite,
    T.test_non_contiguous_input_gives_the_same_result, T.test_state_dict_round_trip,
    T.test_keeps_no_batch_tensors_between_calls, T.test_float64_gradcheck,
    T.test_forward_makes_no_host_sync_with_checks_off,
]


def test_a_new_correct_objective_passes_every_contract_by_registering(registered):
    case = registered["test-fake-reference"]
    assert case.missing is None and case.row_independent
    for contract in CONTRACTS:
        contract(case, "cpu")
    for bad in (float("nan"), float("inf")):
        T.test_non_finite_input_is_a_clear_error(case, bad, "cpu")
    for dtype in T.DTYPE_TOL:
        T.test_dtype_table(case, dtype, "cpu")
    for b, d in T.ODD_SHAPES:
        T.test_odd_shapes(case, b, d, "cpu")
    T.test_hyperparameters_are_captured_and_nan_is_refused(case)


def test_the_contracts_catch_a_wrong_mean(registered, monkeypatch):
    case = registered["test-fake-reference"]
    fwd = _Reference.forward

    def wrong(self, embeddings, labels, sample_weight=None):
        out = fwd(self, embeddings, labels, sample_weight)
        return out * (1.0 if self.reduction != "mean" else 0.5)

    monkeypatch.setattr(_Reference, "forward", wrong)
    with pytest.raises(AssertionError, match="documented denominator"):
        T.test_none_sum_mean_agree(case, "cpu")


@pytest.mark.parametrize("name,why", [("test-fake-other", "task 'other' has no input factory"),
                                      ("test-fake-needs-k", r"required hyperparameters \['k'\]")])
def test_an_entry_without_a_case_is_a_failure_naming_it(registered, name, why):
    case = registered[name]
    assert case.missing is not None
    with pytest.raises(pytest.fail.Exception, match=rf"no contract case for '{name}': {why}"):
        T.test_none_sum_mean_agree(case, "cpu")
    with pytest.raises(pytest.fail.Exception, match=rf"no contract case for '{name}'"):
        T.test_hyperparameters_are_captured_and_nan_is_refused(case)
