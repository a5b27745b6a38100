"""Test session setup. Triton's interpreter must be chosen before triton is imported: on a machine
without a CUDA GPU we turn it on, so the Triton kernels run (slowly) on CPU tensors."""
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU with the reason)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on the 2-core CI machine")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda_device():
    return torch.device("cuda")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the reference backend issues ~150 tiny ops per call, and on the
    loaded 2-core CI machine two threads made such ops up to 500x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
