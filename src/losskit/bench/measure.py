"""Measuring a training step's memory (the ``peak_memory_mb`` of every cell, any task)."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Callable

from torch import nn

__all__ = ["MEMORY_LABELS", "measure_step_memory", "param_bytes"]

#: What ``peak_memory_mb`` means, by how it was measured.
MEMORY_LABELS = {
    "cuda_max_allocated": ("torch.cuda.max_memory_allocated over the training steps (MB; includes the network, "
                           "the objective and the training images, which are held on the GPU)"),
    "cpu_profiler_step": (
        "CPU tensor memory of one training step (MB): bytes of the network's and the objective's parameters "
        "plus the peak of the bytes allocated during the first training step (gradients, optimiser state, "
        "activations), from torch.profiler's allocation events; allocator caching and Python overhead excluded"
    ),
}


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's start/stop lines on fd 2 (Python errors still surface as exceptions)."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def measure_step_memory(step: Callable[[], Any], persistent_bytes: int) -> tuple[float, Any]:
    """Run ``step()`` under torch.profiler; return (MB, step's result).

    MB = ``persistent_bytes`` + peak of the running sum of CPU allocation
    events recorded during the step (frees subtract).
    """
    from torch.profiler import ProfilerActivity, profile

    # fd 2 is silenced (the C++ profiler prints start/stop lines there); python warnings raised
    # by the step are recorded and re-issued afterwards so that none is lost
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = step()
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        if str(e.device_type()).lower().endswith("cpu"):
            running += e.nbytes()
            peak = max(peak, running)
    return (persistent_bytes + peak) / 2**20, result


def param_bytes(*modules: nn.Module) -> int:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        for b in m.buffers():
            if id(b) not in seen:
                seen.add(id(b))
                total += b.numel() * b.element_size()
    return total
