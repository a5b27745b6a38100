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


def require_cuda_build() -> bool:
    """ZOKERNELS_REQUIRE_CUDA=1 (CI with nvcc): a missing or unusable zokernels._cuda fails instead of skipping."""
    return os.environ.get("ZOKERNELS_REQUIRE_CUDA", "0") not in ("", "0")


@pytest.fixture(scope="module")
def cuda_host_backend():
    """zokernels.backends.cuda for host-twin tests (CPU tensors run the kernels' element code on the host);
    skips if zokernels._cuda is not built (fails with ZOKERNELS_REQUIRE_CUDA=1)."""
    try:
        from zokernels import _cuda  # noqa: F401
    except ImportError as e:
        msg = f"zokernels._cuda is not importable ({e}); build it: python setup.py build_ext --inplace"
        if require_cuda_build():
            pytest.fail(msg + " [ZOKERNELS_REQUIRE_CUDA=1]")
        pytest.skip(msg)
    from zokernels.backends import cuda
    return cuda


@pytest.fixture
def cuda_gpu_backend():
    """zokernels.backends.cuda when it can run on the GPU, else skip with the reason (fail with
    ZOKERNELS_REQUIRE_CUDA=1)."""
    from zokernels.backends import cuda

    reason = cuda.unavailable_reason(torch.device("cuda"))
    if reason:
        if require_cuda_build():
            pytest.fail(reason)
        pytest.skip(reason)
    return cuda


@pytest.fixture
def aligned_launches(monkeypatch):
    """The ALIGNED value of every Triton launch (dense and masked kernels) made while the test runs:
    [(kernel name, ALIGNED)]."""
    from zokernels.backends import triton as tb
    from zokernels.backends.triton import masked as tb_masked

    seen = []
    real = tb._launch

    def spy(kernel, grid, device, *args, **meta):
        seen.append((tb._kernel_name(kernel), meta.get("ALIGNED")))
        return real(kernel, grid, device, *args, **meta)

    monkeypatch.setattr(tb, "_launch", spy)
    monkeypatch.setattr(tb_masked, "_launch", spy)
    return seen


@pytest.fixture
def compile_sm90():
    """run(script) -> stdout: runs a Python script that compiles Triton kernels for sm_90 (no GPU needed) in a
    subprocess without TRITON_INTERPRET and with FP contraction off; skips when triton's CUDA backend or its
    bundled ptxas is missing, fails on any other error."""
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401  (the NVIDIA backend itself)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"triton's CUDA backend is not importable: {e}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(script: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(PYTHONPATH=root, TRITON_DEFAULT_FP_FUSION="0")
        proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
            pytest.skip("triton's bundled ptxas is missing")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    return run
