"""Triton backend against the reference backend (the executable contract) and float64 math.

On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), so tensors stay
small (<= ~4K elements each). Integers (Philox words, uniforms, Rademacher signs) must be bit-identical.
Gaussian z may differ from the reference by a few float32 ulps (different log/sin/cos implementations:
numpy under the interpreter, libdevice on GPU, torch in the reference); with Rademacher z every op must
be bitwise identical, which pins the float32 operation order and the rounding code exactly.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import zokernels as Z
from zokernels import contract as C

P = importlib.import_module("zokernels.backends.reference.philox")  # the package's philox() shadows the name

pytest.importorskip("triton")
from zokernels.backends import triton as TB  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SEED = 0x0123456789ABCDEF
KEY = 0xDEADBEEFCAFEBABE
SIZES = [1037, 4099, 3, 2048, 777]
OFFSETS = [0, 5, 2**32 + 3, 2**40 + 1, 1]
KEYS = [C.MASK64, C.param_key("model.layers.1.weight"), 0, 2**63, 2**63 - 1]  # int64 bit patterns of both signs
LRS = [1e-2, 2e-2, 3e-3, 1e-1, 5e-2]
WDS = [0.0, 0.01, 0.1, 0.0, 0.05]

KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((C.MASK32,) * 4, (C.MASK32, C.MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def launches() -> int:
    return sum(TB.LAUNCHES.values())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Mixed odd sizes: three views into one flat buffer (pointer deltas inside one allocation) and two
    separate tensors (deltas between allocations)."""
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randn(sum(SIZES[:3]), generator=g) * 0.5).to(DEVICE, dtype)
    rest = [(torch.randn(n, generator=g) * 0.5).to(DEVICE, dtype) for n in SIZES[3:]]
    return list(torch.split(flat, SIZES[:3])) + rest


def test_module_is_usable_here():
    assert TB.NAME == "triton"
    assert TB.unavailable_reason(DEVICE) is None


# ----------------------------------------------------------------------------- Philox
def test_philox_known_answers():
    for ctr, key, want in KAT:
        before = TB.LAUNCHES["philox_kernel"]
        got = Z.philox4x32(torch.tensor([ctr], dtype=torch.int64, device=DEVICE), key, backend="triton")
        assert tuple(got[0].tolist()) == want
        assert TB.LAUNCHES["philox_kernel"] == before + 1


def test_philox_random_counters_match_reference():
    g = torch.Generator().manual_seed(1)
    ctr = torch.randint(0, 2**32, (517, 4), generator=g, dtype=torch.int64).to(DEVICE)
    key = (0x9E3779B9, 0xFFFFFFFF)
    assert torch.equal(Z.philox4x32(ctr, key, backend="triton"), Z.philox4x32(ctr, key, backend="reference"))


# ----------------------------------------------------------------------------- z, v, stochastic rounding
CASES = [(1037, 0), (4099, 3), (1001, 6), (5, 1), (1000, 2**32 + 3), (1000, 2**40 + 1)]


def gaussian_float64(n: int, offset: int, seed: int, key: int, query: int, stream: int) -> torch.Tensor:
    """Box-Muller in float64 from the contract's exact float32 uniforms and float32 angle 2pi * u (an
    exactly specified float32 product): the precise value of z."""
    first = offset >> 2
    nb = ((offset + n - 1) >> 2) - first + 1
    r = P.block_words(first, nb, seed, key, query, stream, torch.device("cpu"))
    u = [P.open_unit(w) for w in r]
    t1, t3 = (u[1] * C.TWO_PI_F32).double(), (u[3] * C.TWO_PI_F32).double()
    u = [w.double() for w in u]
    r0, r2 = (-2 * u[0].log()).sqrt(), (-2 * u[2].log()).sqrt()
    return P.lanes_to_elements((r0 * t1.cos(), r0 * t1.sin(), r2 * t3.cos(), r2 * t3.sin()), offset & 3, n)


@pytest.mark.parametrize("n,offset", CASES)
def test_gaussian_matches_reference_and_float64(n, offset):
    args = dict(seed=SEED, key=KEY, query=7, dist="gaussian", offset=offset, device=DEVICE)
    got = Z.perturbation((n,), backend="triton", **args)
    ref = Z.perturbation((n,), backend="reference", **args)
    assert (got - ref).abs().max().item() <= 1e-5
    exact = gaussian_float64(n, offset, SEED, KEY, 7, C.STREAM_Z)
    ulps = (got.cpu().double() - exact).abs() / (torch.finfo(torch.float32).eps * exact.abs().clamp_min(2**-10))
    assert ulps.max().item() <= 3  # measured under the interpreter: <= 1.6 (reference backend: <= 1.5)


@pytest.mark.parametrize("n,offset", CASES)
def test_rademacher_and_uniform_bit_identical(n, offset):
    args = dict(seed=SEED, key=KEY, query=3, offset=offset, device=DEVICE)
    r_tri = Z.perturbation((n,), dist="rademacher", backend="triton", **args)
    r_ref = Z.perturbation((n,), dist="rademacher", backend="reference", **args)
    assert torch.equal(bits(r_tri), bits(r_ref))
    v_tri = Z.uniform((n,), stream=C.STREAM_PROBE_SR_NEG, backend="triton", **args)
    v_ref = Z.uniform((n,), stream=C.STREAM_PROBE_SR_NEG, backend="reference", **args)
    assert torch.equal(bits(v_tri), bits(v_ref))


def test_streams_queries_and_keys_change_the_draws():
    base = dict(seed=SEED, key=KEY, query=1, offset=0, device=DEVICE, backend="triton")
    z = Z.perturbation((64,), **base)
    for change in (dict(query=2), dict(key=KEY ^ 1), dict(seed=SEED + 1), dict(stream=C.STREAM_ACT_SR)):
        assert not torch.equal(z, Z.perturbation((64,), **{**base, **change}))


def special_values(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g) * torch.logspace(-30, 30, n).clamp_max(1e4)
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 7e4, -65519.0, 65504.0, 65520.0, 1e-8,
                -6e-8, 3.3e38, -3.39e38, 1e-40, 2.0**-149, 1.0 + 2.0**-8, 1.0 - 2.0**-12]
    x[:len(specials)] = torch.tensor(specials)
    x[100::97] = float("nan")
    return x.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_bitwise(dtype):
    x = special_values(4099)
    got = Z.stochastic_round(x, dtype, SEED, KEY, query=2, offset=11, backend="triton")
    ref = Z.stochastic_round(x, dtype, SEED, KEY, query=2, offset=11, backend="reference")
    nan = torch.isnan(x)
    assert torch.isnan(got[nan]).all()  # NaN payload bits are implementation-defined (torch CPU: 0xFFFF)
    assert torch.equal(bits(got)[~nan], bits(ref)[~nan])
    assert (got.float() != x)[~nan].any()  # really rounded


# ----------------------------------------------------------------------------- multi-tensor ops
def run_op(op: str, backend: str, tensors, dist: str, rounding: str, offsets=OFFSETS):
    """Apply op to `tensors` (in place or returning outs); return the resulting tensors."""
    common = dict(keys=KEYS, offsets=offsets, dist=dist, rounding=rounding, backend=backend)
    if op == "perturb":
        Z.perturb_(tensors, SEED, 1e-3, query=2, sr_stream=C.STREAM_PROBE_SR_POS, **common)
        return tensors
    if op == "copy":
        return Z.perturbed_copy(tensors, SEED, -1e-3, query=2, sr_stream=C.STREAM_PROBE_SR_NEG, **common)
    if op == "update1":
        Z.zo_update_(tensors, SEED, coeffs=[0.7], lr=1e-2, weight_decay=0.0, **common)
    elif op == "update4_restore":
        Z.zo_update_(tensors, SEED, coeffs=[0.7, -1.3, 0.25, 2.0], lr=LRS, weight_decay=WDS,
                     restore_scale=-1e-3, restore_query=1, **common)
    elif op == "update2_wd":
        Z.zo_update_(tensors, SEED, coeffs=[-0.4, 1.1], lr=LRS, weight_decay=0.1, **common)
    return tensors


OPS = ["perturb", "copy", "update1", "update4_restore", "update2_wd"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def both(op, dtype, dist, rounding):
    base = params(dtype)
    n0 = launches()
    got = run_op(op, "triton", [t.clone() for t in base], dist, rounding)
    assert launches() == n0 + 1, "one launch per (device, dtype) group"
    ref = run_op(op, "reference", [t.clone() for t in base], dist, rounding)
    if op == "copy":
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(base, params(dtype))), "input modified"
    return base, got, ref


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_ops_bitwise_with_rademacher(op, dtype, rounding):
    base, got, ref = both(op, dtype, "rademacher", rounding)
    for a, b, t in zip(got, ref, base):
        assert a.dtype == dtype and a.shape == t.shape
        assert torch.equal(bits(a), bits(b))
    assert any(not torch.equal(bits(a), bits(t)) for a, t in zip(got, base)), "op changed nothing"


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS[:4])  # weight decay lists are in update4_restore; update2_wd: rademacher only
def test_ops_match_reference_gaussian(op, dtype, rounding):
    _, got, ref = both(op, dtype, "gaussian", rounding)
    same = total = 0
    for a, b in zip(got, ref):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:  # a <= 1e-5 difference in z may move a value across a rounding boundary: at most 1 ulp
            ulps = (bits(a).int() - bits(b).int()).abs()
            assert ulps.max().item() <= 1
        same += torch.equal(bits(a), bits(b)) if a.numel() < 8 else (bits(a) == bits(b)).sum().item()
        total += 1 if a.numel() < 8 else a.numel()
    if dtype != torch.float32:
        assert same >= 0.99 * total


@pytest.mark.parametrize("dtype,half_ulp", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_round_to_nearest_ties_overflow_and_nan(dtype, half_ulp):
    """theta in [1, 2) and scale * z = +-half an ulp: every element is an exact tie (round half to even);
    the interpreter's own bf16 cast truncates, so this pins the integer rounding code."""
    g = torch.Generator().manual_seed(5)
    theta = (1 + torch.rand(4099, generator=g)).to(dtype)
    big = torch.finfo(dtype).max
    theta[:6] = torch.tensor([big, -big, float("nan"), float("inf"), -float("inf"), 0.0]).to(dtype)
    theta = theta.to(DEVICE)
    outs = {}
    for backend in ("triton", "reference"):
        outs[backend] = Z.perturbed_copy(theta, SEED, half_ulp, KEY, dist="rademacher", rounding="nearest",
                                         backend=backend)
    got, ref = outs["triton"], outs["reference"]
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan) and nan.any()
    assert torch.equal(bits(got)[~nan], bits(ref)[~nan])
    assert (got[6:] != theta[6:]).any() and (got[6:] == theta[6:]).any()  # ties went both ways


def test_mixed_dtypes_launch_once_per_group():
    a, b = params(torch.float32), params(torch.bfloat16)
    mixed = [a[0], b[1], a[3], b[4]]
    ref = [t.clone() for t in mixed]
    keys = [KEYS[0], KEYS[1], KEYS[3], KEYS[4]]
    n0 = launches()
    Z.perturb_(mixed, SEED, 1e-2, keys, dist="rademacher", backend="triton")
    assert launches() == n0 + 2
    Z.perturb_(ref, SEED, 1e-2, keys, dist="rademacher", backend="reference")
    assert all(torch.equal(bits(x), bits(y)) for x, y in zip(mixed, ref))
    n0 = launches()
    Z.zo_update_(mixed, SEED, keys, [0.3, -0.2], 1e-2, dist="rademacher", backend="triton")
    assert launches() == n0 + 2


def test_empty_tensors_in_a_group():
    ts = [torch.empty(0, device=DEVICE), torch.randn(513, device=DEVICE), torch.empty(0, device=DEVICE)]
    ref = [t.clone() for t in ts]
    before = ts[1].clone()
    Z.zo_update_(ts, SEED, [1, 2, 3], [0.5], 1e-2, dist="rademacher", backend="triton")
    Z.zo_update_(ref, SEED, [1, 2, 3], [0.5], 1e-2, dist="rademacher", backend="reference")
    assert torch.equal(ts[1], ref[1]) and not torch.equal(ts[1], before)


def test_zero_coefficients_leave_only_weight_decay():
    ts = params(torch.float32)
    before = [t.clone() for t in ts]
    Z.zo_update_(ts, SEED, KEYS, coeffs=[], lr=0.1, weight_decay=0.5, offsets=OFFSETS, backend="triton")
    for a, t in zip(ts, before):
        torch.testing.assert_close(a, t - (t * 0.5) * 0.1, rtol=0, atol=0)


QUAD_SIZES = [1036, 4100, 4, 2048, 776]   # multiples of 4, as are the offsets and the views' starts
QUAD_OFFSETS = [0, 8, 2**32 + 4, 2**40, 4]


def quad_params(dtype: torch.dtype, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randn(sum(QUAD_SIZES[:3]), generator=g) * 0.5).to(DEVICE, dtype)
    rest = [(torch.randn(n, generator=g) * 0.5).to(DEVICE, dtype) for n in QUAD_SIZES[3:]]
    return list(torch.split(flat, QUAD_SIZES[:3])) + rest


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["perturb", "copy", "update4_restore"])
def test_ops_bitwise_on_the_aligned_path(op, dtype):
    """Every delta, numel and offset a multiple of 4: the kernels run with ALIGNED (vector access hints on a
    GPU); the result is the reference's, bit for bit; odd sizes or offsets take the general path."""
    base = quad_params(dtype)
    assert TB._tables(base, KEYS, QUAD_OFFSETS, TB._blocks(DEVICE)).aligned
    assert not TB._tables(params(dtype), KEYS, OFFSETS, TB._blocks(DEVICE)).aligned
    assert not TB._tables(base, KEYS, [0, 8, 2, 0, 4], TB._blocks(DEVICE)).aligned
    assert not TB._tables(base[:2] + [base[2][1:]], KEYS[:3], QUAD_OFFSETS[:3], TB._blocks(DEVICE)).aligned
    results = [run_op(op, backend, [t.clone() for t in base], "rademacher", "stochastic", offsets=QUAD_OFFSETS)
               for backend in ("triton", "reference")]
    for a, b, t in zip(*results, base):
        assert torch.equal(bits(a), bits(b))
    assert all(not torch.equal(bits(a), bits(t)) for a, t in zip(results[0], base))


def test_no_coefficients_keep_signed_zeros_like_the_reference():
    """zo_update_ without coefficients: theta' - lr * (0 + wd * theta'), with the reference's +0 start (a
    -0 start would flip -0.0 weights to +0.0)."""
    for dtype in (torch.float32, torch.bfloat16):
        ts = quad_params(dtype)
        for t in ts:
            t[::3] = -0.0
        ref = [t.clone() for t in ts]
        Z.zo_update_(ts, SEED, KEYS, coeffs=[], lr=0.1, weight_decay=0.0, offsets=QUAD_OFFSETS, backend="triton")
        Z.zo_update_(ref, SEED, KEYS, coeffs=[], lr=0.1, weight_decay=0.0, offsets=QUAD_OFFSETS,
                     backend="reference")
        for a, b in zip(ts, ref):
            assert torch.equal(bits(a), bits(b))
            assert (bits(a[::3]) == bits(torch.tensor(-0.0, dtype=dtype))).all()


def test_aligned_is_decided_by_every_delta_numel_offset_and_out(aligned_launches):
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(1045, generator=g).to(DEVICE)
    Z.perturb_([flat[:1036], flat[1036:1044]], SEED, 1e-3, [1, 2], backend="triton")   # all multiples of 4
    Z.perturb_([flat[:1037]], SEED, 1e-3, [1], backend="triton")                       # numel 1037
    Z.perturb_([flat[:1036], flat[1037:1045]], SEED, 1e-3, [1, 2], backend="triton")   # delta 1037
    Z.perturb_([flat[:1036]], SEED, 1e-3, [1], offsets=[6], backend="triton")          # offset 6
    Z.perturb_([flat[:1036], flat[:0]], SEED, 1e-3, [1, 2], offsets=[0, 3], backend="triton")  # empty: ignored
    ts = [torch.randn(1036, generator=g).to(DEVICE), torch.randn(8, generator=g).to(DEVICE)]
    buf = torch.randn(1045, generator=g).to(DEVICE)
    Z.perturbed_copy(ts, SEED, 1e-3, [1, 2], outs=[buf[:1036], buf[1036:1044]], backend="triton")
    Z.perturbed_copy(ts, SEED, 1e-3, [1, 2], outs=[buf[:1036], buf[1037:1045]], backend="triton")  # out delta
    Z.zo_update_([flat[:1036], flat[1036:1044]], SEED, [1, 2], [0.5], 1e-2, backend="triton")
    Z.zo_update_([flat[1:1037]], SEED, [1], [0.5], 1e-2, backend="triton")  # delta 0 from itself, numel 1036
    Z.perturbation((1036,), SEED, 1, backend="triton", device=DEVICE)
    Z.perturbation((1037,), SEED, 1, backend="triton", device=DEVICE)
    assert aligned_launches == [("perturb_kernel", True), ("perturb_kernel", False), ("perturb_kernel", False),
                                ("perturb_kernel", False), ("perturb_kernel", True), ("perturb_kernel", True),
                                ("perturb_kernel", False), ("update_kernel", True), ("update_kernel", True),
                                ("fill_kernel", True), ("fill_kernel", False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_term_is_not_added_to_zero(dtype):
    """acc starts as c_0 z_0 (the reference's first term), not 0 + c_0 z_0: with c_0 = 0 the term is -0.0
    where z < 0, and -0.0 weights with no weight decay keep their sign only then."""
    ts = [torch.full((1036,), -0.0, dtype=dtype, device=DEVICE), torch.full((8,), -0.0, dtype=dtype, device=DEVICE)]
    ref = [t.clone() for t in ts]
    kw = dict(keys=[1, 2], coeffs=[0.0], lr=0.1, weight_decay=0.0, dist="rademacher", rounding="nearest")
    Z.zo_update_(ts, SEED, backend="triton", **kw)
    Z.zo_update_(ref, SEED, backend="reference", **kw)
    neg = bits(torch.tensor(-0.0, dtype=dtype))
    assert 0 < int((bits(ref[0]) == neg).sum()) < 1036  # both signs occur: the check has teeth
    for a, b in zip(ts, ref):
        assert torch.equal(bits(a), bits(b))


def test_tables_are_cached_between_steps():
    ts = params(torch.float16)
    TB._cache.clear()
    Z.perturb_(ts, SEED, 1e-3, KEYS, offsets=OFFSETS, backend="triton")
    assert len(TB._cache) == 1
    tables = next(iter(TB._cache.values()))
    for step in range(3):
        Z.perturb_(ts, SEED + step, 1e-3, KEYS, offsets=OFFSETS, backend="triton")
    assert len(TB._cache) == 1 and next(iter(TB._cache.values())) is tables
    assert tables.programs == sum((((o + n - 1) >> 2) - (o >> 2)) // TB._blocks(DEVICE) + 1
                                  for n, o in zip(SIZES, OFFSETS))


# ----------------------------------------------------------------------------- availability
def test_unavailable_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert TB.unavailable_reason(torch.device("cpu")) == \
        "CPU tensors need TRITON_INTERPRET=1 (set before importing triton)"
    assert "meta" in TB.unavailable_reason(torch.device("meta"))
    monkeypatch.setattr(TB, "_triton_import_error", lambda: "triton is not installed (pip install triton)")
    assert TB.unavailable_reason(torch.device("cpu")).startswith("triton is not installed")
    if not torch.cuda.is_available():
        monkeypatch.setattr(TB, "_triton_import_error", lambda: None)
        assert "CUDA is not available" in TB.unavailable_reason(torch.device("cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter self-check concerns CPU tensors")
def test_interpreter_that_cannot_run_runtime_loops_is_reported(monkeypatch):
    """The interpreter self-check: triton 3.6's interpreter fails loops bounded by a runtime argument under
    numpy >= 2.4 (every update kernel has one); this interpreter passes it, a broken one is named with the fix."""
    assert TB.unavailable_reason(torch.device("cpu")) is None  # conftest set TRITON_INTERPRET=1
    kernels = TB._k()

    class Broken:
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(TB, "_interpreter_checked", [])
    monkeypatch.setattr(kernels, "runtime_loop_kernel", Broken())
    reason = TB.unavailable_reason(torch.device("cpu"))
    assert "interpreter cannot run a loop bounded by a runtime argument" in reason and "triton 3.9" in reason
    assert TB.unavailable_reason(torch.device("cpu")) == reason  # probed once


def test_import_without_triton_explains():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, zokernels\n"
            "from zokernels.backends import registry\n"
            "import zokernels.backends.triton as tb\n"
            "print(tb.unavailable_reason(torch.device('cpu')))\n"
            "print(registry.report('cpu')['triton'])\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert all(line.startswith("triton is not installed (pip install triton)") for line in lines), lines


# ----------------------------------------------------------------------------- sm_90 compile (no GPU)
_COMPILE = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from zokernels.backends.triton import kernels as K, masked_kernels as MK

FP32 = ("scale", "restore_scale")

def compile90(fn, ptrs, consts):
    sig = {n: ptrs.get(n, "constexpr" if n in consts else ("fp32" if n in FP32 else "i32")) for n in fn.arg_names}
    # pointers 16-byte aligned, as the JIT specializes them for torch allocations
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    c = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    assert len(c.asm["cubin"]) > 0
    return c.asm["ptx"]

W = {"bf16": 1, "fp16": 2, "fp32": 0}
I64 = "*i64"
cases = []
for aligned in (True, False):
    tag = " aligned" if aligned else ""
    for dt in ("bf16", "fp16", "fp32"):
        ptr = "*i16" if dt == "bf16" else f"*{dt}"
        p = {"in_ptr": ptr, "out_ptr": ptr, "tab_ptr": I64, "out_delta_ptr": I64, "chunk_ptr": I64}
        cases.append((f"perturb {dt} SR copy{tag}", K.perturb_kernel, p,
                      {"KIND": W[dt], "GAUSSIAN": True, "STOCHASTIC": dt != "fp32", "COPY": True, "BLOCKS": 256,
                       "PRECISE": True, "ALIGNED": aligned}))
        u = {"ptr": ptr, "tab_ptr": I64, "chunk_ptr": I64, "lrwd_ptr": "*fp32", "coeff_ptr": "*fp32"}
        cases.append((f"update {dt} SR restore{tag}", K.update_kernel, u,
                      {"KIND": W[dt], "GAUSSIAN": True, "STOCHASTIC": dt != "fp32", "RESTORE": True, "BLOCKS": 256,
                       "PRECISE": True, "ALIGNED": aligned}))
    cases.append((f"fill z{tag}", K.fill_kernel, {"in_ptr": "*fp32", "out_ptr": "*fp32", "tab_ptr": I64,
                  "chunk_ptr": I64}, {"MODE": 0, "GAUSSIAN": True, "KIND": 0, "BLOCKS": 256, "PRECISE": True,
                                      "ALIGNED": aligned}))
for fmt, idx, npb, bcols, blocks, aligned in ((0, "*i16", 1, 1, 1024, False), (1, "*i16", 4, 16, 512, False),
                                              (1, "*i16", 4, 16, 512, True), (2, "*u8", 1, 1, 512, False)):
    tag = " aligned" if aligned else ""
    for copy in (False, True) if aligned else (False,):
        mp = {"w_ptr": "*i16", "out_ptr": "*i16", "idx_ptr": idx, "tab_ptr": I64, "chunk_ptr": I64}
        cases.append((f"masked perturb fmt{fmt} bf16{' copy' if copy else ''}{tag}", MK.masked_perturb_kernel, mp,
                      {"FORMAT": fmt, "KIND": 1, "GAUSSIAN": True, "STOCHASTIC": True, "COPY": copy, "BLOCKS": blocks,
                       "NPB": npb, "BCOLS": bcols, "PRECISE": True, "ALIGNED": aligned}))
    mu = {"w_ptr": "*i16", "idx_ptr": idx, "tab_ptr": I64, "chunk_ptr": I64, "lrwd_ptr": "*fp32", "coeff_ptr": "*fp32"}
    cases.append((f"masked update fmt{fmt} bf16{tag}", MK.masked_update_kernel, mu,
                  {"FORMAT": fmt, "KIND": 1, "GAUSSIAN": True, "STOCHASTIC": True, "RESTORE": True, "BLOCKS": blocks,
                   "NPB": npb, "BCOLS": bcols, "PRECISE": True, "ALIGNED": aligned}))
pats = ["div.full", "approx", "mul.hi.u32", "ld.global", "st.global", "bar.sync", "ld.global.v", "st.global.v"]
for name, fn, ptrs, consts in cases:
    p = compile90(fn, ptrs, consts)
    print(name, *[len(re.findall(re.escape(x), p)) for x in pats], sep="|")
"""


def test_dense_and_masked_kernels_compile_for_sm90(compile_sm90):
    """Without a GPU: every dense and masked tile kernel (perturb, update, fill; bf16/fp16/fp32; the three mask
    formats) compiles for sm_90 down to a cubin (catches GPU-only compile errors that the interpreter cannot
    see), with no approximate math (no div.full, no *.approx: the contract's float32 order needs IEEE ops),
    Philox multiplies present, and global loads and stores. The ALIGNED dense kernels (every delta, numel and
    offset a multiple of 4) and masked block kernels (runs on Philox block boundaries, deltas multiples of 4)
    keep each thread's Philox block in registers from the RNG to the store: no shared-memory layout conversion
    (bar.sync) and vector loads/stores (8 bytes for 16-bit weights, 16 for float32; measured 2026-12-07, triton
    3.9: update bf16 had 47 bar.sync and 8 scalar 2-byte loads per thread before the lanes were joined in
    registers and the hints added; masked block bf16 update 31 bar.sync before its hints)."""
    rows = [line.split("|") for line in compile_sm90(_COMPILE).strip().splitlines()]
    assert len(rows) == 23, rows
    for name, div_full, approx, mul_hi, loads, stores, barriers, vloads, vstores in rows:
        assert int(div_full) == 0 and int(approx) == 0, (name, rows)
        assert int(mul_hi) >= 20 and int(loads) > 0 and int(stores) > 0, (name, rows)
        if name.endswith(" aligned"):
            assert int(barriers) == 0 and int(vstores) > 0, (name, rows)
            assert int(vloads) > 0 or name.startswith("fill z"), (name, rows)  # fill z reads no weights
        else:  # without the hints nothing may be proven aligned: scalar accesses only
            assert int(vloads) == 0 and int(vstores) == 0, (name, rows)


# ----------------------------------------------------------------------------- GPU (triton compiled)
GPU_N = 278011


@pytest.mark.gpu
def test_gpu_perturbation_uniform_and_rounding_match_reference(cuda_device):
    for offset in (0, 3, 2**32 + 3):
        args = dict(seed=SEED, key=KEY, query=5, offset=offset, device=cuda_device)
        g_t = Z.perturbation((GPU_N,), backend="triton", **args)
        g_r = Z.perturbation((GPU_N,), backend="reference", **args)
        assert (g_t - g_r).abs().max().item() <= 1e-5
        for dist in ("rademacher",):
            assert torch.equal(Z.perturbation((GPU_N,), dist=dist, backend="triton", **args),
                               Z.perturbation((GPU_N,), dist=dist, backend="reference", **args))
        assert torch.equal(Z.uniform((GPU_N,), backend="triton", **args),
                           Z.uniform((GPU_N,), backend="reference", **args))
    x = torch.randn(GPU_N, device=cuda_device) * 3
    for dtype in (torch.bfloat16, torch.float16):
        a = Z.stochastic_round(x, dtype, SEED, KEY, backend="triton")
        b = Z.stochastic_round(x, dtype, SEED, KEY, backend="reference")
        assert torch.equal(bits(a), bits(b))


def assert_gpu_matches(a: torch.Tensor, b: torch.Tensor, dist: str, what) -> None:
    """Compiled Triton vs reference: bitwise with Rademacher z; Gaussian z differs by libdevice vs torch
    float32 ulps (float32 within 1e-6, 16-bit at most 1 ulp on <= 1% of the elements)."""
    if dist == "rademacher":
        assert torch.equal(bits(a), bits(b)), what
    elif a.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    else:
        d = (bits(a).int() - bits(b).int()).abs()
        assert d.max().item() <= 1 and (d == 0).float().mean().item() >= 0.99, what


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_aligned_path_matches_reference_and_stays_inside(cuda_device, dtype, aligned_launches):
    """Compiled ALIGNED kernels (vector accesses): views of one buffer at multiples of 4, a sentinel view
    right after the group that no op may touch, the reference's results (bitwise with Rademacher z)."""
    sizes = [278012, 4100, 4, 65536, 1036]
    g = torch.Generator().manual_seed(11)
    flat = (torch.randn(sum(sizes) + 3, generator=g) * 0.5).to(cuda_device, dtype)
    *base, sentinel = torch.split(flat, sizes + [3])
    keep = sentinel.clone()
    for dist in ("rademacher", "gaussian"):
        for rounding in ("nearest", "stochastic"):
            for op in ("perturb", "copy", "update4_restore"):
                got, ref = (run_op(op, backend, [t.clone() for t in base], dist, rounding, offsets=QUAD_OFFSETS)
                            for backend in ("triton", "reference"))
                for a, b in zip(got, ref):
                    assert_gpu_matches(a, b, dist, (op, rounding))
    # the ops above ran on clones: run the in-place ones on `flat`'s views themselves, then check the sentinel
    run_op("perturb", "triton", list(base), "gaussian", "stochastic", offsets=QUAD_OFFSETS)
    run_op("update4_restore", "triton", list(base), "gaussian", "stochastic", offsets=QUAD_OFFSETS)
    torch.cuda.synchronize()
    assert torch.equal(bits(sentinel), bits(keep))
    assert aligned_launches and all(a for _, a in aligned_launches), aligned_launches


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_multi_tensor_ops_match_reference(cuda_device, dtype):
    sizes = [GPU_N, 4099, 3, 65536, 1037]
    g = torch.Generator().manual_seed(7)
    base = [(torch.randn(n, generator=g) * 0.5).to(cuda_device, dtype) for n in sizes]
    for dist in ("rademacher", "gaussian"):
        for op in ("perturb", "copy", "update4_restore"):
            for rounding in ("nearest", "stochastic"):
                n0 = launches()
                got = run_op(op, "triton", [t.clone() for t in base], dist, rounding)
                assert launches() == n0 + 1
                ref = run_op(op, "reference", [t.clone() for t in base], dist, rounding)
                for a, b in zip(got, ref):
                    assert_gpu_matches(a, b, dist, (op, rounding))
