import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run on one thread: with other processes on the cores, torch's spinning threads slow
    the tests down many times. The previous setting is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
