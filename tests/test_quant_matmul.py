"""Quantized matmuls of QuantLinear's forward (zokernels.quant.matmul, zokernels.ops.matmul and the Triton
backend's zokernels/backends/triton/quant_matmul.py):
FP8 (e4m3 x e4m3 -> float32) and W4A16 (int4 unpacked + dequantized in the mainloop) against float64
references within 2x the error of a naive bfloat16 implementation (the rule of tests/test_quant.py's W8A8
test), odd shapes that are no tile multiples; QuantLinear's matmul modes (incl. "auto" and probes) against
its dequant path; the Triton kernels compile for sm_90 (wgmma) without a GPU; GPU-only checks marked gpu."""
import pytest
import torch

from zokernels import contract as C
from zokernels import ops
from zokernels import quant
from zokernels.backends import registry
from zokernels.backends.triton import quant_matmul as T
from zokernels.quant import matmul as MM
from zokernels.quant import ops as QO
from zokernels.quant.linear import ProbeSpec, QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")

M, K, N = 19, 203, 37          # no multiple of any tile (16 / 32 / 64) nor of the int4 groups


def _triton_reason(kind: str, device="cpu") -> str | None:
    """Why the Triton backend cannot run the `kind` matmul ("w8a8" | "w4a16" | "fp8") on `device` (None: it can)."""
    return registry.why_not(f"{kind}_matmul", "triton", torch.device(device))


NEEDS_TRITON = _triton_reason("w4a16")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_within_2x_naive(ours: torch.Tensor, ref: torch.Tensor, naive: torch.Tensor) -> None:
    """max |ours - ref| <= 2 max |naive - ref| (flash-attention's rule; naive > 0 so the test can fail)."""
    err = (ours.double() - ref).abs().max()
    err_naive = (naive.double() - ref).abs().max()
    assert err_naive > 0 and err <= 2 * err_naive, (float(err), float(err_naive))


def _skip_backend(backend: str, kind: str) -> None:
    if backend == "triton" and _triton_reason(kind):
        pytest.skip(_triton_reason(kind))
    if backend == "torch" and kind == "fp8" and not MM.scaled_mm_available(torch.device("cpu")):
        pytest.skip(f"torch._scaled_mm does not run e4m3 on CPU with torch {torch.__version__}")


def _fp8_operands(seed: int, m: int = M, k: int = K, n: int = N, device="cpu"):
    g = _gen(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
    w = torch.randn(n, k, generator=g) * 0.05
    qw = quant.quantize_weight(w.to(device), "fp8")
    xq, xs = MM.quantize_activations_fp8(x.to(device))
    b = torch.randn(n, generator=g).to(device)
    return x.to(device), xq, xs, qw, b


# ----------------------------------------------------------------------------- FP8
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_fp8_matmul_vs_float64(backend):
    """y = f32(xq wq^T) s_m s_n + b == float64 of the same e4m3 operands within 2x a naive bf16 matmul."""
    _skip_backend(backend, "fp8")
    x, xq, xs, qw, b = _fp8_operands(1)
    xd = xq.double() * xs.double()[:, None]
    wd = quant.dequantize(qw).double()
    ref = xd @ wd.t() + b.double()
    ours = MM.fp8_matmul(xq, xs, qw.q, qw.scale, b, backend)
    assert ours.dtype == torch.float32 and ours.shape == (M, N)
    assert_within_2x_naive(ours, ref, xd.bfloat16() @ wd.bfloat16().t() + b.bfloat16())
    # float32 accumulation of exact e4m3 products: close to the exact (float64-summed) reference
    exact = MM.fp8_matmul(xq, xs, qw.q, qw.scale, b, "reference")
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-5)
    # and the per-token e4m3 activations are the nearest grid values: within half an e4m3 step of x
    step = x.abs() * 2.0 ** -4 + xs[:, None] * 2.0 ** -10
    assert bool(((xq.float() * xs[:, None] - x).abs() <= step * (1 + 1e-6)).all())
    assert float(xq.float().abs().amax(dim=1).min()) == C.E4M3_MAX   # each row's amax sits on 448


@pytest.mark.skipif(NEEDS_TRITON is not None, reason=str(NEEDS_TRITON))
def test_fp8_triton_fast_accum_and_tiles():
    """fast_accum (Triton's default fp8 accumulation; only sm_90 hardware differs) and pinned tiles with
    K tiles that cross the 203 tail; bf16 output."""
    _, xq, xs, qw, b = _fp8_operands(3)
    exact = MM.fp8_matmul(xq, xs, qw.q, qw.scale, b, "reference")
    for fast, tiles in ((True, None), (False, (16, 32, 64))):
        y = T.fp8(xq, xs, qw.q, qw.scale, b, tiles=tiles, fast_accum=fast)
        torch.testing.assert_close(y, exact, rtol=1e-5, atol=1e-5)
    y16 = T.fp8(xq, xs, qw.q, qw.scale, b, out_dtype=torch.float16)
    torch.testing.assert_close(y16, exact.half(), rtol=1e-3, atol=1e-3)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        MM.fp8_matmul(xq.float(), xs, qw.q, qw.scale, b, "triton")


def test_fp8_reference_is_exact_and_zero_rows():
    """The reference sums e4m3 products in float64 (exact); an all-zero token row gets scale 1, output b."""
    _, xq, xs, qw, b = _fp8_operands(2)
    acc = (xq.double() @ qw.q.double().t()).float()
    y = MM.fp8_matmul(xq, xs, qw.q, qw.scale, b, "reference")
    assert torch.equal(y, acc * xs[:, None] * qw.scale.reshape(1, -1) + b)
    x0 = torch.zeros(3, K)
    xq0, xs0 = MM.quantize_activations_fp8(x0)
    assert torch.equal(xs0, torch.ones(3))
    assert torch.equal(MM.fp8_matmul(xq0, xs0, qw.q, qw.scale, b, "reference"), b.expand(3, N))


# ----------------------------------------------------------------------------- W4A16
def _int4_operands(seed: int, group: int, dtype, m: int = M, k: int = K, n: int = N, device="cpu"):
    g = _gen(seed)
    x = (torch.randn(m, k, generator=g) * 2).to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=g) * 0.05
    qw = quant.quantize_weight(w.to(device), "int4", group_size=group)
    return x, qw, torch.randn(n, generator=g).to(device)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [64, 128])
def test_w4a16_matmul_vs_float64(group, dtype, backend):
    """y = x (q s)^T + b (x fp32 / fp16; bf16 tl.dot is garbage in the interpreter: GPU test below) ==
    float64 within 2x a naive bf16 matmul; K = 203 is padded to Kp = 256 with a partial group."""
    _skip_backend(backend, "w4a16")
    x, qw, b = _int4_operands(3, group, dtype)
    assert qw.padded_k == 256 and qw.scale.shape == (N, 256 // group)
    wd = quant.dequantize(qw).double()
    ref = x.double() @ wd.t() + b.double()
    ours = MM.w4a16_matmul(x, qw, b, backend)
    assert ours.dtype == dtype and ours.shape == (M, N)
    assert_within_2x_naive(ours, ref, x.bfloat16() @ wd.bfloat16().t() + b.bfloat16())
    if dtype == torch.float32:  # fp32 activations: no rounding of the dequantized weight at all
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(NEEDS_TRITON is not None, reason=str(NEEDS_TRITON))
@pytest.mark.parametrize("group,tiles", [(32, (16, 32, 32)), (64, (16, 16, 64)), (128, (32, 16, 64))])
def test_w4a16_triton_tiles_and_groups(group, tiles):
    """K tiles equal to or a fraction of the group (one scale per tile either way), a tile over the
    last, partial group, float16 output, and no bias."""
    x, qw, _ = _int4_operands(4, group, torch.float32, m=21, k=130, n=19)
    ref = MM.w4a16_matmul(x, qw, None, "reference")
    y = T.w4a16(x, qw.q, qw.scale, group, None, tiles=tiles)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y16 = T.w4a16(x, qw.q, qw.scale, group, None, out_dtype=torch.float16, tiles=tiles)
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16, ref.half(), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="must divide group_size"):
        T.w4a16(x, qw.q, qw.scale, group, None, tiles=(16, 16, 2 * group))


@pytest.mark.skipif(NEEDS_TRITON is not None, reason=str(NEEDS_TRITON))
def test_autotuned_launch_wiring():
    """The GPU launch path (triton.autotune wrapper, grid from the chosen config, M_BUCKET key) with one
    config, run by the interpreter: same results as the fixed-tile launch."""
    x, qw, b = _int4_operands(11, 64, torch.float32)
    out = torch.empty(M, N)
    args = (x, qw.q, qw.scale, b, out, M, N, K, T._pow2_at_least(M), x.stride(0), qw.q.stride(0),
            qw.scale.stride(0), out.stride(0))
    T._launch("w4a16", ((16, 32, 64, 4, 1), (16, 32, 128, 4, 1)), 64, None, args, M, N,
              {"GROUP": 64, "IEEE": True, "HAS_BIAS": True}, x.device, autotune=True)   # BK=128 pruned
    torch.testing.assert_close(out, MM.w4a16_matmul(x, qw, b, "reference"), rtol=1e-5, atol=1e-5)
    _, xq, xs, qf, bf = _fp8_operands(12)
    out = torch.empty(M, N)
    args = (xq, qf.q, xs, qf.scale.reshape(-1), bf, out, M, N, K, 32, xq.stride(0), qf.q.stride(0), out.stride(0))
    T._launch("scaled_dot", ((32, 16, 32, 4, 1),), 0, None, args, M, N,
              {"IS_INT": False, "HAS_BIAS": True, "FAST_ACC": False}, xq.device, autotune=True)
    torch.testing.assert_close(out, MM.fp8_matmul(xq, xs, qf.q, qf.scale, bf, "reference"), rtol=1e-5, atol=1e-5)
    assert T._pow2_at_least(1) == 1 and T._pow2_at_least(17) == 32 and T._pow2_at_least(4096) == 4096


def test_w4a16_rejects_inconsistent_layouts():
    x, qw, b = _int4_operands(5, 64, torch.float32)
    with pytest.raises(ValueError, match="int4"):
        MM.w4a16_matmul(x, quant.quantize_weight(torch.randn(N, K), "int8"), b)
    if NEEDS_TRITON is None:
        with pytest.raises(ValueError, match="inconsistent int4 layout"):
            ops.w4a16_matmul(x, qw.q, qw.scale, qw.shape, 128, b, backend="triton")


def test_bad_operands_raise_before_any_kernel():
    """Mismatched K, scale / bias sizes or devices are ValueErrors on every backend (the Triton kernels would
    read past the tensors: they index raw memory from the shapes); wrong dtypes are TypeErrors."""
    _, xq, xs, qf, b = _fp8_operands(13)
    x4, q4, b4 = _int4_operands(14, 64, torch.float32)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match=r"activations \[M, 203\]"):
            MM.fp8_matmul(xq[:, :200], xs, qf.q, qf.scale, b, backend)
        with pytest.raises(ValueError, match="x_scale must have 19"):
            MM.fp8_matmul(xq, xs[:5], qf.q, qf.scale, b, backend)
        with pytest.raises(ValueError, match="w_scale must have 37"):
            MM.fp8_matmul(xq, xs, qf.q, qf.scale[:30], b, backend)
        with pytest.raises(ValueError, match="bias must have 37"):
            MM.fp8_matmul(xq, xs, qf.q, qf.scale, b[:3], backend)
        with pytest.raises(ValueError, match="one device"):
            MM.fp8_matmul(xq, xs.to("meta"), qf.q, qf.scale, b, backend)
        with pytest.raises(TypeError, match="float8_e4m3fn"):
            MM.fp8_matmul(xq.float(), xs, qf.q, qf.scale, b, backend)
        with pytest.raises(ValueError, match=r"activations \[M, 203\]"):
            MM.w4a16_matmul(x4[:, :100], q4, b4, backend)
        with pytest.raises(ValueError, match="bias must have 37"):
            MM.w4a16_matmul(x4, q4, b4[:36], backend)
        with pytest.raises(ValueError, match="packed int4 weights must be uint8"):
            MM.w4a16_matmul(x4, q4, b4, backend, packed=q4.q[:, :64])
    with pytest.raises(ValueError, match=r"activations \[M, 203\]"):
        ops.w8a8_matmul(torch.zeros(3, 202, dtype=torch.int8), torch.ones(3), torch.zeros(5, 203, dtype=torch.int8),
                        torch.ones(5), None, backend="triton")
    with pytest.raises(ValueError, match="inconsistent int4 layout"):   # K = 100 (Kp = 128) vs a Kp = 256 weight
        ops.w4a16_matmul(x4[:, :100].contiguous(), q4.q, q4.scale, (N, 100), 64, b4, backend="triton")


# ----------------------------------------------------------------------------- backend choice
def test_backend_choice_is_explicit():
    """'auto' on CPU: the registry's first backend that can run the call (the interpreter never), recorded in
    registry.last_backend; a named backend runs there; unknown names are refused."""
    cpu = torch.device("cpu")
    _, xq, xs, qf, b = _fp8_operands(15)
    x4, q4, b4 = _int4_operands(16, 64, torch.float32)
    MM.fp8_matmul(xq, xs, qf.q, qf.scale, b)
    assert registry.last_backend("fp8_matmul", cpu) == ("torch" if MM.scaled_mm_available(cpu) else "reference")
    MM.w4a16_matmul(x4, q4, b4)
    assert registry.last_backend("w4a16_matmul", cpu) == "torch"
    for name in ("reference", "torch", "triton"):
        if name == "triton" and NEEDS_TRITON or name == "torch" and not MM.scaled_mm_available(cpu):
            continue
        MM.fp8_matmul(xq, xs, qf.q, qf.scale, b, name)
        MM.w4a16_matmul(x4, q4, b4, name)
        assert registry.last_backend("fp8_matmul", cpu) == registry.last_backend("w4a16_matmul", cpu) == name
    with pytest.raises(ValueError, match="backend must be one of"):
        MM.fp8_matmul(xq, xs, qf.q, qf.scale, b, "cublas")
    with pytest.raises(ValueError, match="backend must be one of"):
        MM.w4a16_matmul(x4, q4, b4, "fast")
    # the W8A8 names are re-exported so one module holds every quantized matmul
    assert MM.w8a8_matmul is QO.w8a8_matmul and MM.quantize_activations is QO.quantize_activations


# ----------------------------------------------------------------------------- QuantLinear modes
MODES = [("int8", "w8a8"), ("int4", "w4a16"), ("fp8", "fp8")]


def _layer(fmt: str, matmul: str, backend: str = "auto", seed: int = 6) -> QuantLinear:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(K, N))
    quant.quantize_model(model, fmt, exclude=(), group_size=64, matmul=matmul, matmul_backend=backend)
    return model[0]


def _activation_error_bound(fmt: str, x2: torch.Tensor, ql: QuantLinear, vals=None) -> torch.Tensor:
    """|y_mode - y_dequant| <= sum_k |x~ - x| |w| with |x~ - x| bounded by the activation rounding."""
    w = quant.dequantize(ql.qw, vals).double().abs()
    if fmt == "int8":
        err = (x2.abs().amax(dim=1, keepdim=True) / 127 / 2).expand_as(x2)
    elif fmt == "fp8":
        err = x2.abs() * 2.0 ** -4 + x2.abs().amax(dim=1, keepdim=True) / 448 * 2.0 ** -10
    else:
        err = torch.zeros_like(x2)
    return err.double() @ w.t() * (1 + 1e-4) + 1e-5


@pytest.mark.parametrize("fmt,mode", MODES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quant_linear_modes_vs_dequant(fmt, mode, backend):
    """Each format's quantized path (3-d input, odd sizes) == its dequant path up to the activation
    rounding (none for W4A16 with fp32 activations), without and with a probe (the probe weights repacked
    to int4 / cast to int8 / e4m3); the probe changes the output."""
    _skip_backend(backend, "fp8" if fmt == "fp8" else ("w4a16" if fmt == "int4" else "w8a8"))
    ql = _layer(fmt, mode, backend)
    dq = _layer(fmt, "dequant")
    assert torch.equal(ql.qweight.view(torch.uint8), dq.qweight.view(torch.uint8))
    x = torch.randn(2, 7, K, generator=_gen(7)) * 1.5
    x2 = x.reshape(-1, K).double()
    y, y_dq = ql(x), dq(x)
    assert y.shape == (2, 7, N) and y.dtype == torch.float32
    bound = _activation_error_bound(fmt, x2, ql)
    assert bool(((y.reshape(-1, N).double() - y_dq.reshape(-1, N).double()).abs() <= bound).all())
    spec = dict(seed=11, query=1, sign=-1, eps=0.1)
    ql.probe, dq.probe = ProbeSpec(**spec), ProbeSpec(**spec)
    yp, yp_dq = ql(x), dq(x)
    vals = QO.probe_values(ql.qw, 11, ql.key, 1, 0.1, -1).values
    bound = _activation_error_bound(fmt, x2, ql, vals)
    assert bool(((yp.reshape(-1, N).double() - yp_dq.reshape(-1, N).double()).abs() <= bound).all())
    assert (yp - y).abs().max() > 3 * bound.max()
    ql.probe = dq.probe = None
    assert torch.equal(ql(x), y)   # the stored weights never changed


def test_fp8_mode_activation_sr_uses_the_probe_uniforms():
    """act_sr during a probe: xq = SR_e4m3(x / s_m) with STREAM_ACT_SR uniforms of (seed, layer, query),
    the same for both signs (common random numbers)."""
    ql = _layer("fp8", "fp8", "reference")
    x = torch.randn(9, K, generator=_gen(8))
    ql.probe = ProbeSpec(seed=3, query=0, sign=1, eps=1e-3, act_sr=True)
    y = ql(x)
    v = QO.activation_uniforms(x.shape, 3, ql.key, 0, x.device)
    xq, xs = MM.quantize_activations_fp8(x, v)
    wq = QO.probe_values(ql.qw, 3, ql.key, 0, 1e-3, 1).values.to(torch.float8_e4m3fn)
    assert torch.equal(y, MM.fp8_matmul(xq, xs, wq, ql.scale, ql.bias, "reference"))
    assert not torch.equal(xq.view(torch.uint8), MM.quantize_activations_fp8(x)[0].view(torch.uint8))


def test_auto_mode_and_validation():
    for fmt, mode in MODES:
        ql = _layer(fmt, "auto")
        assert ql.resolved_matmul(torch.device("cpu")) == "dequant"
        assert ql.resolved_matmul(torch.device("cuda")) == mode
        assert "matmul=auto" in repr(ql)
        x = torch.randn(5, K, generator=_gen(9))
        assert torch.equal(ql(x), _layer(fmt, "dequant")(x))
    for fmt, mode in (("int4", "w8a8"), ("int8", "fp8"), ("fp8", "w4a16")):
        with pytest.raises(ValueError, match="needs fmt="):
            quant.quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), fmt, exclude=(), group_size=32,
                                 matmul=mode)
    with pytest.raises(ValueError, match="matmul_backend"):
        _layer("int8", "w8a8", backend="cutlass")


def test_bf16_input_on_cpu_stays_bf16():
    """Half-precision inputs: the W4A16 reference runs in float32 and returns the input dtype."""
    ql = _layer("int4", "w4a16", "reference")
    x = torch.randn(4, K, generator=_gen(10)).bfloat16()
    y = ql(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _layer("int4", "dequant")(x).float(), rtol=0, atol=0)


# ----------------------------------------------------------------------------- sm_90 compile (no GPU)
_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from zokernels.backends.triton import quant_matmul_kernels as K
ks = {"scaled_dot": K.scaled_dot_kernel, "w4a16": K.w4a16_kernel}
def compile_(fn, ptrs, consts):
    sig = {n: ptrs.get(n, "constexpr" if n in consts else "i32") for n in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
    return "wgmma" in c.asm["ptx"] and len(c.asm["cubin"]) > 0
tiles = {"BM": 128, "BN": 128, "BK": 64}
for et, is_int in (("*i8", True), ("*fp8e4nv", False)):
    ptrs = {"a_ptr": et, "b_ptr": et, "sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": "*fp32", "c_ptr": "*bf16"}
    print("scaled_dot", et, compile_(ks["scaled_dot"], ptrs, {"IS_INT": is_int, "HAS_BIAS": True, "FAST_ACC": False,
                                                          **tiles}))
ptrs = {"x_ptr": "*bf16", "p_ptr": "*u8", "s_ptr": "*fp32", "bias_ptr": "*fp32", "c_ptr": "*bf16"}
print("w4a16 bf16", compile_(ks["w4a16"], ptrs, {"GROUP": 128, "IEEE": False, "HAS_BIAS": True, **tiles}))
"""


def test_triton_kernels_compile_for_sm90(compile_sm90):
    """Without a GPU: Triton compiles the three kernels (int8, e4m3, W4A16 bf16) for sm_90 down to a cubin,
    with Hopper wgmma instructions (catches GPU-only compile errors; the run itself needs the GPU tests)."""
    lines = compile_sm90(_COMPILE).split("\n")
    assert sum(line.endswith(" True") for line in lines) == 3, "\n".join(lines)


# ----------------------------------------------------------------------------- GPU
def _cuda_ok(kind: str) -> None:
    reason = _triton_reason(kind, "cuda")
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("shape", [(M, K, N), (300, 4096, 1100)])
def test_gpu_w4a16_bf16(group, shape):
    """bf16 activations (GPU only): Triton W4A16 vs float64 within 2x naive bf16; autotuned == pinned tiles."""
    _cuda_ok("w4a16")
    m, k, n = shape
    x, qw, b = _int4_operands(20, group, torch.bfloat16, m, k, n, device="cuda")
    wd = quant.dequantize(qw).double()
    ref = x.double() @ wd.t() + b.double()
    ours = MM.w4a16_matmul(x, qw, b, "triton", out_dtype=torch.float32)
    assert_within_2x_naive(ours, ref, x @ wd.bfloat16().t() + b.bfloat16())
    pinned = T.w4a16(x, qw.q, qw.scale, group, b, tiles=(64, 64, 64))
    torch.testing.assert_close(ours, pinned, rtol=1e-4, atol=1e-4)
    torch_path = MM.w4a16_matmul(x, qw, b, "torch", out_dtype=torch.float32)
    assert_within_2x_naive(torch_path, ref, x @ wd.bfloat16().t() + b.bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(M, K, N), (300, 4096, 1100)])
def test_gpu_fp8_triton_and_scaled_mm(shape):
    """Hopper/Ada (sm_89+): e4m3 tl.dot and torch._scaled_mm vs the exact float64-summed reference."""
    _cuda_ok("fp8")
    m, k, n = shape
    _, xq, xs, qw, b = _fp8_operands(21, m, k, n, device="cuda")
    exact = MM.fp8_matmul(xq, xs, qw.q, qw.scale, b, "reference")
    xd = xq.double() * xs.double()[:, None]
    wd = quant.dequantize(qw).double()
    ref = xd @ wd.t() + b.double()
    naive = xd.bfloat16() @ wd.bfloat16().t() + b.bfloat16()
    for backend in ("triton", "torch"):
        if backend == "torch" and not MM.scaled_mm_available(xq.device):
            continue
        ours = MM.fp8_matmul(xq, xs, qw.q, qw.scale, b, backend)
        assert_within_2x_naive(ours, ref, naive)
        # sm_90 wgmma sums fp8 products with ~14-bit precision within a K tile (promoted to fp32 after it)
        assert float((ours - exact).abs().max() / exact.abs().max()) < 1e-3
    MM.fp8_matmul(xq, xs, qw.q, qw.scale, b)
    assert registry.last_backend("fp8_matmul", xq.device) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,mode", MODES)
def test_gpu_quant_linear_auto(fmt, mode):
    """On CUDA matmul="auto" takes the format's quantized path (bf16 activations), within the activation
    rounding bound of the dequant path, under a probe too."""
    if fmt == "fp8":
        _cuda_ok("fp8")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(K, N)).cuda()
    quant.quantize_model(model, fmt, exclude=(), group_size=64, matmul="auto")
    ql = model[0]
    assert ql.resolved_matmul(torch.device("cuda")) == mode
    x = torch.randn(M, K, device="cuda")
    for probe in (None, ProbeSpec(seed=1, query=0, sign=1, eps=0.02)):
        ql.probe = probe
        y = ql(x.bfloat16()).double()
        vals = None if probe is None else QO.probe_values(ql.qw, 1, ql.key, 0, 0.02, 1).values
        ql.matmul = "dequant"
        y_dq = ql(x).double()
        ql.matmul = "auto"
        w = quant.dequantize(ql.qw, vals).double().abs()
        # + rounding x to bf16 (and the W4A16 weight tile to bf16), + the bf16 output
        bound = (_activation_error_bound(fmt, x.double(), ql, vals) + (x.double().abs() @ w.t()) * 2.0 ** -7
                 + y_dq.abs() * 2.0 ** -8)
        assert bool(((y - y_dq).abs() <= bound).all())
