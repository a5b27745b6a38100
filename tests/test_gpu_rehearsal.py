"""benchmarks/gpu_session.sh rehearsed on CPU in a Python shaped like the GPU machine's image
(benchmarks/gpu_rehearsal.sh): Python 3.12, torch 2.11, triton 3.6, transformers 5.17 and none of the packages the
image may lack, with the offline wheels; every stage a CPU can run must pass. Slow: ~3 min on the 2-core machine
with the venv cached in ~/.cache/zokernels, plus ~2 min and ~2.7 GB of downloads where it must be made (once per
machine); CI runs it. Skipped where this machine cannot rehearse (no Python 3.12 or nvcc, too little disk)."""
import os
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_session_rehearsal_in_a_python_like_the_gpu_image():
    if torch.cuda.is_available():
        pytest.skip("a CPU rehearsal of the GPU machine; here, run benchmarks/gpu_session.sh itself")
    proc = subprocess.run(["bash", os.path.join("benchmarks", "gpu_rehearsal.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    assert "gpu-rehearsal: every CPU stage passed" in proc.stdout
