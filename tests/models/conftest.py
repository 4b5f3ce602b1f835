import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: each op call is small, and with 2 threads on a loaded 2-core machine every OpenMP region
    # waits for a second core (tens of ms per call). One thread, restored afterwards for the other suites.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
