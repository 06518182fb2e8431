"""Memory and time of one training step, shared by the benchmark workers
(``python benchmarks/<script>.py`` puts this folder on ``sys.path``).

* extra resident memory of one step: the peak RSS (``VmHWM`` after resetting
  it through ``/proc/self/clear_refs``) minus the RSS before, or the
  process's lifetime peak (``ru_maxrss``) where ``/proc`` cannot be written;
* optionally the peak of bytes held by tensors allocated during one step,
  from torch.profiler's allocation events (allocator caching excluded);
* the median time of ``repeats`` further steps.
"""

from __future__ import annotations

import resource
import statistics
import time

__all__ = ["status_kb", "reset_peak", "tensor_peak_mib", "measure_step"]


def status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tensor_peak_mib(step) -> float:
    """Peak of bytes held by tensors allocated during one ``step()`` (torch.profiler allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak / 2**20


def measure_step(step, repeats: int, tensor_memory: bool = False) -> dict:
    """One measured first ``step()`` for memory, then ``repeats`` timed ones (``repeats=0``: the first's time)."""
    method = "VmHWM after clear_refs"
    if reset_peak() and status_kb("VmHWM") is not None:
        base = status_kb("VmRSS")
        t0 = time.perf_counter()
        g = step()
        first = time.perf_counter() - t0
        peak = status_kb("VmHWM")
    else:  # fall back to the process's lifetime peak
        method = "ru_maxrss"
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        g = step()
        first = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del g
    tensor_mib = tensor_peak_mib(step) if tensor_memory else None
    times = [first] if repeats == 0 else []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times": times, "first_s": first,
            "extra_mib": (peak - base) / 1024, "method": method, "tensor_mib": tensor_mib}
