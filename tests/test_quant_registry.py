"""The quantized-weight ops and quantized matmuls on the op registry (zokernels.ops.quant, zokernels.ops.matmul):
an explicit backend that cannot run a call raises BackendUnavailable naming every backend and its reason (no
silent fallback), 'auto' records the backend that ran, per-call properties (packed int4 probe output, torch's
probes of _int_mm / _scaled_mm) decide, and importing the backends imports no triton."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from zokernels import ops
from zokernels import quant
from zokernels.backends import registry
from zokernels.backends.registry import BackendUnavailable
from zokernels.quant import matmul as MM

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _calls() -> dict:
    """op -> fn(backend) running one valid CPU call of the op."""
    g = _gen(0)
    w = torch.randn(7, 40, generator=g) * 0.1
    q8 = quant.quantize_weight(w, "int8")
    q4 = quant.quantize_weight(w, "int4", group_size=32)
    qf = quant.quantize_weight(w, "fp8")
    x = torch.randn(5, 40, generator=g)
    xq, xs = MM.quantize_activations(x)
    xf, xfs = MM.quantize_activations_fp8(x)
    return {
        "quant_quantize": lambda b: ops.quant_quantize(w, q8.scale, "int8", 0, "stochastic", 1, 2, backend=b),
        "quant_probe": lambda b: ops.quant_probe(q4.q, q4.scale, "int4", q4.shape, 32, 1, 2, 0, 1e-2, -1, backend=b),
        "quant_update_": lambda b: ops.quant_update_(q8.q.clone(), q8.scale, "int8", q8.shape, 0, 1, 2, [0.5], 1e-3,
                                                     1e-2, "paper", backend=b),
        "quantize_activations": lambda b: ops.quantize_activations(x, "fp8", backend=b),
        "w8a8_matmul": lambda b: ops.w8a8_matmul(xq, xs, q8.q, q8.scale, None, backend=b),
        "fp8_matmul": lambda b: ops.fp8_matmul(xf, xfs, qf.q, qf.scale, None, backend=b),
        "w4a16_matmul": lambda b: ops.w4a16_matmul(x, q4.q, q4.scale, q4.shape, 32, None, backend=b),
    }


OPS = list(_calls())
QUANT = ("quant_quantize", "quant_probe", "quant_update_")
MATMULS = ("w8a8_matmul", "fp8_matmul", "w4a16_matmul")


def _assert_every_backend(msg: str, op: str, backend: str, reason: str) -> None:
    assert f"{op} cannot run on backend {backend!r}" in msg and reason in msg, msg
    every = msg.split("Every backend: ", 1)[1]
    where = [every.find(f"{name}: ") for name in registry.ORDER]
    assert where[0] == 0 and where == sorted(where), every   # every backend, in ORDER, with its reason


def test_every_op_is_declared_and_in_the_table():
    table = registry.table(CPU)
    for op in OPS:
        assert op in registry.declared() and op in table
        assert table[op]["reference"] == "ok", (op, table[op])
    for op in QUANT + ("quantize_activations",):
        assert table[op]["torch"] == f"torch does not implement {op}"
    for op in MATMULS + ("quantize_activations",):
        assert table[op]["cuda"] == f"cuda does not implement {op}"


@pytest.mark.parametrize("op", OPS)
def test_cuda_on_cpu_tensors_raises_with_every_reason(op):
    run = _calls()[op]
    reason = "CUDA backend needs CUDA tensors" if op in QUANT else f"cuda does not implement {op}"
    with pytest.raises(BackendUnavailable) as e:
        run("cuda")
    _assert_every_backend(str(e.value), op, "cuda", reason)


@pytest.mark.parametrize("op", OPS)
def test_triton_without_the_interpreter_raises_with_every_reason(op, monkeypatch):
    run = _calls()[op]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = ("triton does not implement quantize_activations" if op == "quantize_activations"
              else "CPU tensors need TRITON_INTERPRET=1")
    if registry.not_supported("triton", CPU) and "not installed" in registry.not_supported("triton", CPU):
        reason = "triton is not installed"
    with pytest.raises(BackendUnavailable) as e:
        run("triton")
    _assert_every_backend(str(e.value), op, "triton", reason)


@pytest.mark.parametrize("op", QUANT + ("quantize_activations",))
def test_torch_backend_implements_no_quant_op(op, monkeypatch):
    run = _calls()[op]
    with pytest.raises(BackendUnavailable) as e:
        run("torch")
    _assert_every_backend(str(e.value), op, "torch", f"torch does not implement {op}")
    monkeypatch.setenv(registry.BACKEND_ENV, "torch")     # $ZOKERNELS_BACKEND stands in for "auto"
    with pytest.raises(BackendUnavailable, match=r"from \$ZOKERNELS_BACKEND") as e:
        run("auto")
    _assert_every_backend(str(e.value), op, "torch", f"torch does not implement {op}")


def test_quant_matmul_wrappers_raise_with_the_reasons(monkeypatch):
    """zokernels.quant.matmul's backend= argument: the same BackendUnavailable (not a bare RuntimeError)."""
    g = _gen(1)
    w = torch.randn(9, 40, generator=g) * 0.1
    x = torch.randn(3, 40, generator=g)
    q4 = quant.quantize_weight(w, "int4", group_size=32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable) as e:
        MM.w4a16_matmul(x, q4, None, "triton")
    _assert_every_backend(str(e.value), "w4a16_matmul", "triton", "CPU tensors need TRITON_INTERPRET=1")


@pytest.mark.parametrize("op", OPS)
def test_auto_records_the_backend_that_ran(op):
    """'auto' on CPU: the first backend in ORDER that can run the call (never the interpreter), recorded."""
    run = _calls()[op]
    run("reference")
    assert registry.last_backend(op, CPU) == "reference"
    if registry.why_not(op, "triton", CPU) is None:
        run("triton")
        assert registry.last_backend(op, CPU) == "triton"
    run("auto")
    want = next(n for n in ("torch", "reference") if registry.why_not(op, n, CPU) is None)
    assert registry.last_backend(op, CPU) == want
    if op in MATMULS and op != "fp8_matmul" or op == "fp8_matmul" and MM.scaled_mm_available(CPU):
        assert want == "torch"
    if op in QUANT + ("quantize_activations",):
        assert want == "reference"


def test_torch_probe_failure_is_a_reason_not_a_fallback(monkeypatch):
    """torch._scaled_mm that does not run here (simulated probe failure): backend='torch' raises with the probe's
    reason, 'auto' runs the next backend (reference) and records it; MM.scaled_mm_available says no."""
    from zokernels.backends.torch import quant_matmul as TM

    monkeypatch.setitem(TM._probed, ("scaled_mm", ("cpu", None)), "RuntimeError: no e4m3 kernel")
    run = _calls()["fp8_matmul"]
    with pytest.raises(BackendUnavailable) as e:
        run("torch")
    _assert_every_backend(str(e.value), "fp8_matmul", "torch",
                          f"torch._scaled_mm does not run e4m3 on cpu with torch {torch.__version__}")
    assert "no e4m3 kernel" in str(e.value)
    y = run("auto")
    assert registry.last_backend("fp8_matmul", CPU) == "reference" and y.shape == (5, 7)
    assert not MM.scaled_mm_available(CPU)


def test_packed_int4_probe_is_a_call_property():
    """quant_probe's out="packed-int4" call: every backend that registers quant_probe is asked per call; on CPU
    the reference writes it, and it equals the int8 grid values packed."""
    from zokernels import numerics as N

    q4 = quant.quantize_weight(torch.randn(6, 70, generator=_gen(2)) * 0.1, "int4", group_size=32)
    packed = ops.quant_probe(q4.q, q4.scale, "int4", q4.shape, 32, 3, 4, 1, 5e-2, 1, "rademacher",
                             out_dtype=torch.uint8)
    assert registry.last_backend("quant_probe", CPU) == "reference" and packed.shape == q4.q.shape
    grid = ops.quant_probe(q4.q, q4.scale, "int4", q4.shape, 32, 3, 4, 1, 5e-2, 1, "rademacher")
    assert torch.equal(packed, N.pack_int4_padded(grid, q4.padded_k))
    impls = registry.implementations("quant_probe")
    assert set(impls) == {"cuda", "triton", "reference"}
    call = {"fmt": "int4", "out": "packed-int4"}
    for name in ("triton", "reference"):
        assert impls[name].supports is None or impls[name].supports(CPU, call) is None


def test_probe_out_argument_is_validated():
    q8 = quant.quantize_weight(torch.randn(4, 16, generator=_gen(3)), "int8")
    out = torch.empty(4, 16, dtype=torch.bfloat16)
    got = ops.quant_probe(q8.q, q8.scale, "int8", q8.shape, 0, 1, 2, 0, 1e-2, 1, out=out)
    assert got is out
    with pytest.raises(ValueError, match="out must be a contiguous"):
        ops.quant_probe(q8.q, q8.scale, "int8", q8.shape, 0, 1, 2, 0, 1e-2, 1, out=torch.empty(4, 15))
    with pytest.raises(ValueError, match="same memory"):
        ops.quant_probe(q8.q, q8.scale, "int8", q8.shape, 0, 1, 2, 0, 1e-2, 1, out=q8.q)
    with pytest.raises(ValueError, match="int4\\) packed uint8"):
        ops.quant_probe(q8.q, q8.scale, "int8", q8.shape, 0, 1, 2, 0, 1e-2, 1, out_dtype=torch.uint8)
    with pytest.raises(ValueError, match="coeffs must be a sequence"):
        ops.quant_update_(q8.q, q8.scale, "int8", q8.shape, 0, 1, 2, 0.5, 1e-3, 1e-2)
    with pytest.raises(ValueError, match="update form"):
        ops.quant_update_(q8.q, q8.scale, "int8", q8.shape, 0, 1, 2, [0.5], 1e-3, 1e-2, "double")
    with pytest.raises(ValueError, match="v must be float32 uniforms"):
        ops.quantize_activations(torch.randn(3, 8), "int8", torch.rand(3, 7))
    with pytest.raises(ValueError, match="activations quantize to one of"):
        ops.quantize_activations(torch.randn(3, 8), "int4")


def test_importing_the_backends_imports_no_triton():
    """The Triton backend (its quant and matmul modules included) imports triton only when a kernel is needed."""
    code = ("import sys; import zokernels.quant, zokernels.ops; from zokernels.backends import registry; "
            "registry.implementations('w8a8_matmul'); import zokernels.backends.triton.quant_matmul; "
            "print('triton' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False", proc.stdout
