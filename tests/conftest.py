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
