import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test runs torch on one thread: on the 2-core CI machine OpenMP
    threads spin against each other and small kernels run several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_RETURNED = "(the worker returned)"


def _traced(rank, worker, world, port, outdir):
    """One rank: ``worker`` under faulthandler (a rank that dies of a signal, SIGABRT from C++ or
    SIGSEGV, leaves its Python stack in ``outdir/trace{rank}.txt`` for the error message), then a
    barrier and the process group's teardown, then ``os._exit(0)``.

    Why the end is written this way: CI once lost a whole module of results because one rank
    aborted with "terminate called without an active exception" (a C++ ``std::thread`` destroyed
    while joinable) after the run.  No rank tears the group down while its peer may still have a
    message in flight (the barrier), and once the results are on disk the process skips the
    interpreter's finalisation, where torch's static C++ objects are destroyed (``os._exit``, as a
    forked ``multiprocessing`` child ends anyway)."""
    import faulthandler
    import os

    import torch.distributed as dist

    f = open(os.path.join(outdir, f"trace{rank}.txt"), "w", buffering=1)  # open until the process ends
    faulthandler.enable(f, all_threads=True)
    worker(rank, world, port, outdir)
    f.write(_RETURNED + "\n")
    if dist.is_available() and dist.is_initialized():  # the harness, not each worker, ends the group
        dist.barrier()
        dist.destroy_process_group()
    import sys

    for stream in (sys.stdout, sys.stderr, f):
        stream.flush()
    os._exit(0)


def _traces(outdir, world) -> str:
    import os

    out = []
    for r in range(world):
        path = os.path.join(outdir, f"trace{r}.txt")
        text = ""
        if os.path.exists(path):
            with open(path) as f:
                text = f.read().strip()
        if text:
            out.append(f"--- rank {r} (faulthandler) ---\n{text}")
    return "\n".join(out)


def _spawn_once(worker, world, timeout, d):
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.start_processes(_traced, args=(worker, world, port, d), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} gloo processes did not finish within {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()


def _run_gloo(worker, world: int = 2, timeout: float = 180.0) -> list:
    """Start ``world`` processes running ``worker(rank, world, port, outdir)`` (each saves its
    result with ``torch.save(obj, outdir/f"r{rank}.pt")`` and leaves its process group up: the
    harness ends it), wait for them with a deadline, kill
    any still running, and return the results in rank order.

    Spawn, not fork: a forked child inherits the test process's OpenMP/gloo locks (a forked
    pair-loss worker hung in the full suite).

    A rank killed by a signal (a C++ abort or crash inside torch/gloo, never a Python exception,
    a wrong result or a hang: those fail at once) is run again once, with a warning that carries
    the first try's faulthandler stacks; a second crash fails the test with both."""
    import os
    import tempfile
    import warnings

    import torch.multiprocessing as mp

    first = None
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            try:
                _spawn_once(worker, world, timeout, d)
            except mp.ProcessExitedException as e:
                report = f"{e} (try {attempt} of 2)\n{_traces(d, world)}"
                if e.exit_code is None or e.exit_code >= 0 or attempt == 2:
                    raise RuntimeError(report if first is None else f"{first}\n{report}") from e
                first = report
                warnings.warn(f"a gloo rank died of a signal; running the {world} processes again:\n{report}",
                              RuntimeWarning, stacklevel=2)
                continue
            except Exception as e:
                raise RuntimeError(f"{e}\n{_traces(d, world)}") from e
            return [torch.load(os.path.join(d, f"r{r}.pt")) for r in range(world)]
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def run_gloo():
    """The runner of :func:`_run_gloo` (processes always joined, killed on timeout)."""
    return _run_gloo
