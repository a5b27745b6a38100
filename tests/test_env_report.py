"""`python -m zokernels` prints an environment report and exits 0 on any machine."""
import subprocess
import sys

import pytest


def test_environment_report_runs():
    out = subprocess.run([sys.executable, "-m", "zokernels"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for needle in ("perturbation contract v1", "torch", "backends on cpu:", "reference ok", "ops on cpu",
                   "CUDA backend needs CUDA tensors"):
        assert needle in out.stdout, (needle, out.stdout)
    from zokernels.backends import registry
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()
            if line.startswith("  ") and line.split() and line.split()[0] in registry.declared()}
    assert set(rows) == set(registry.declared())  # every declared op has a row: auto, then one cell per backend
    for op, cells in rows.items():
        assert len(cells) == 1 + len(registry.ORDER), (op, cells)
        assert cells[1 + registry.ORDER.index("reference")] == "ok", op  # the reference implements every op
        assert cells[0] != "triton"  # the interpreter is never automatic


def test_unknown_command_is_one_clear_error():
    out = subprocess.run([sys.executable, "-m", "zokernels", "frobnicate"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: unknown command 'frobnicate'")


def test_forced_backend_is_reported_and_named_in_errors(monkeypatch):
    import torch
    from zokernels import ops
    from zokernels.__main__ import environment_report
    from zokernels.backends.registry import BackendUnavailable

    monkeypatch.setenv("ZOKERNELS_BACKEND", "bogus")
    assert "$ZOKERNELS_BACKEND=bogus: every op's backend='auto' means 'bogus'" in environment_report()
    with pytest.raises(BackendUnavailable, match=r"unknown backend 'bogus' \(from \$ZOKERNELS_BACKEND\)"):
        ops.backend_name("perturb_", torch.device("cpu"))
    monkeypatch.setenv("ZOKERNELS_BACKEND", "reference")
    assert ops.backend_name("perturb_", torch.device("cpu")) == "reference"
    with pytest.raises(BackendUnavailable) as info:  # an explicit request is the caller's, not the variable's
        ops.backend_name("perturb_", torch.device("cpu"), "bogus")
    assert "ZOKERNELS_BACKEND" not in str(info.value)
