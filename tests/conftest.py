import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (on tiny tensors two threads on a busy shared machine spin far longer
    than they compute); the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def restore_threads():
    """Put torch's thread count back after a test whose command sets it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
