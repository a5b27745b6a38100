"""`python -m zokernels` prints an environment report and exits 0 on any machine."""
import subprocess
import sys


def test_environment_report_runs():
    out = subprocess.run([sys.executable, "-m", "zokernels"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for needle in ("perturbation contract v1", "torch", "backends on cpu:", "reference ok", "backend='auto'",
                   "masked ops (MaZO): ", "quantized-weight ops (QuZO): "):
        assert needle in out.stdout, (needle, out.stdout)


def test_unknown_command_is_one_clear_error():
    out = subprocess.run([sys.executable, "-m", "zokernels", "frobnicate"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: unknown command 'frobnicate'")
