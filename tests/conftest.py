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


def _run_gloo(worker, world: int = 2, timeout: float = 180.0) -> list:
    """Start ``world`` processes running ``worker(rank, world, port, outdir)`` (each saves its
    result with ``torch.save(obj, outdir/f"r{rank}.pt")``), wait for them with a deadline, kill
    any still running, and return the results in rank order.

    Spawn, not fork: a forked child inherits the test process's OpenMP/gloo locks (a forked
    pair-loss worker hung in the full suite)."""
    import os
    import socket
    import tempfile
    import time

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(worker, args=(world, port, d), nprocs=world, join=False, start_method="spawn")
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
        return [torch.load(os.path.join(d, f"r{r}.pt")) for r in range(world)]


@pytest.fixture(scope="session")
def run_gloo():
    """The runner of :func:`_run_gloo` (processes always joined, killed on timeout)."""
    return _run_gloo
