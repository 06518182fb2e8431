"""The contract suite: every registered entry, by kind (see contract_cases.py).

``device`` runs each contract on the CPU and, marked ``cuda``, on a GPU when
there is one (``pytest -m cuda`` runs only those; without a GPU they are
skipped)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # contract_cases (tests use --import-mode=importlib)

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
