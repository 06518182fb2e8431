import pytest
import torch

from losskit.bench.config import BenchConfig
from losskit.bench.errors import BenchConfigError
from losskit.bench.measure import measure_step_memory
from losskit.bench.model import build_model
from losskit.bench.tasks.embedding import batch_shape, shift


def test_batch_shape_auto_and_explicit():
    y = torch.arange(5).repeat_interleave(180)
    assert batch_shape(BenchConfig(), y) == (5, 16)
    y = torch.arange(100).repeat_interleave(20)
    assert batch_shape(BenchConfig(), y) == (16, 5)
    assert batch_shape(BenchConfig(batch_classes=3, batch_samples=2), y) == (3, 2)
    with pytest.raises(BenchConfigError, match=r"--batch-classes 101.*101 classes per batch exceeds the 100"):
        batch_shape(BenchConfig(batch_classes=101), y)


def test_shift_translates_by_at_most_one_pixel():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)
    g = torch.Generator().manual_seed(0)
    out = shift(x, g)
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 3, (2,), generator=g), torch.randint(0, 3, (2,), generator=g)
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        assert torch.equal(out[i], pad[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 5])


def test_same_seed_same_network():
    a = build_model("auto", (1, 8, 8), 16, seed=3)
    b = build_model("auto", (1, 8, 8), 16, seed=3)
    c = build_model("auto", (1, 8, 8), 16, seed=4)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert type(build_model("auto", (3, 28, 28), 16, seed=0)).__name__ == "CNNEmbedder"


def test_profiler_memory_sees_a_transient_allocation():
    def step():
        t = torch.ones(1_000_000)  # 4 MB, freed when the step returns
        return float(t.sum())

    mb, result = measure_step_memory(step, persistent_bytes=2**20)
    assert result == 1_000_000.0
    assert 1 + 3.8 <= mb <= 1 + 4.5


def test_profiled_step_keeps_warnings():
    def step():
        import warnings

        warnings.warn("objective says hi", UserWarning)
        return 1

    with pytest.warns(UserWarning, match="objective says hi"):
        measure_step_memory(step, 0)
