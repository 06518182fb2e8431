"""The Multi-Similarity Function never materialises a B x B tensor (forward or backward)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import losskit


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):  # a sparse tensor holds its stored values only
                self.largest = max(self.largest, t.numel() if t.layout == torch.strided else t._nnz())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ms_blocks_bound_the_largest_temporary(reduction):
    B, D, chunk = 256, 8, 32
    x = torch.randn(B, D, requires_grad=True)
    y = torch.arange(B) % 12
    m = losskit.get("multi-similarity", chunk_size=chunk, reduction=reduction)
    with LargestTensor() as mode:
        out = m(x, y)
        (out.sum() if reduction == "none" else out).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert mode.largest <= chunk * B, mode.largest
    # the probe itself can fail: a plain similarity matrix is B x B
    with LargestTensor() as probe:
        (x @ x.T).sum()
    assert probe.largest == B * B
