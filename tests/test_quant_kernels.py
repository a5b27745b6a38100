"""QuZO quantized-weight kernels (quant_quantize, quant_probe, quant_update_): every backend against the
reference backend (zokernels/backends/reference/quant.py, the executable spec).

On CPU the Triton kernels run under the interpreter (conftest sets TRITON_INTERPRET=1), at small odd
shapes: N = 37, K = 203 (int4 groups of 64: K is not a multiple of the group, so rows end in padding).
With Rademacher z everything is integer-exact or one IEEE float32 op at a time, so results must be
bitwise equal, saturation counts included. Gaussian z differs between backends by a few float32 ulps
(numpy / libdevice / torch log, sin, cos; see tests/test_triton_backend.py), which may move a value
across a rounding boundary: there, at most 1% of the elements may differ, by one grid step.
"""
from __future__ import annotations

import pytest
import torch

from zokernels import numerics as R
from zokernels import quant
from zokernels.backends import registry
from zokernels.backends.reference import quant as RQ
from zokernels.backends.triton import quant as TQ
from zokernels.quant import formats as F
from zokernels.quant import ops as QO

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, K, GROUP = 37, 203, 64
# eps / lr per format: probe offsets and update steps of about one grid unit, so that rounding matters
# everywhere and the grid edge saturates only for the elements near +-qmax
EPS = {"int8": 2e-3, "int4": 2e-2, "fp8": 5e-3}
LR = {"int8": 5e-4, "int4": 5e-3, "fp8": 2e-4}


def _triton_reason() -> str | None:
    return registry.not_supported("triton", DEVICE)


needs_triton = pytest.mark.skipif(_triton_reason() is not None, reason=f"triton backend: {_triton_reason()}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


def _weights(fmt: str, seed: int = 0) -> torch.Tensor:
    """[N, K]: 32 random rows, then 5 rows whose scale is exactly 1 and whose other values are exact ties
    of the grid (half-integers; e4m3 midpoints), so round-to-nearest-even is tested at its hard cases."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    ties = w[32:]
    if fmt == "fp8":
        bits = torch.randint(0, 0x7D, ties.shape, generator=g, dtype=torch.int32).to(torch.uint8)
        lo = bits.view(torch.float8_e4m3fn).to(torch.float32)
        hi = (bits + 1).view(torch.float8_e4m3fn).to(torch.float32)
        ties.copy_((lo + hi) / 2)
        ties[:, 0] = 448.0
    else:
        qmax = int(F.QMAX[fmt])
        ties.copy_(torch.randint(-qmax, qmax, ties.shape, generator=g).float() + 0.5)
        amax_cols = range(0, K, GROUP) if fmt == "int4" else [0]
        for c in amax_cols:
            ties[:, c] = qmax
    ties.mul_(torch.where(torch.rand(ties.shape, generator=g) < 0.5, -1.0, 1.0))
    return w.to(DEVICE)


def _quantized(fmt: str) -> F.QuantizedWeight:
    return quant.quantize_weight(_weights(fmt), fmt, rounding="stochastic", seed=3, key=2**63 + 5, group_size=GROUP)


def _clone(qw: F.QuantizedWeight) -> F.QuantizedWeight:
    return F.QuantizedWeight(qw.fmt, qw.q.clone(), qw.scale, qw.shape, qw.group_size)


def _near(a: torch.Tensor, b: torch.Tensor, fmt: str) -> None:
    """Gaussian z: <= 1% of the elements differ, each by one grid step (adjacent e4m3 codes for fp8)."""
    if a.dtype == torch.float8_e4m3fn:
        diff = (a.view(torch.uint8).int() - b.view(torch.uint8).int()).abs()
    elif fmt == "int4" and a.dtype == torch.uint8:
        diff = (R.unpack_int4(a).int() - R.unpack_int4(b).int()).abs()
    else:
        diff = (a.int() - b.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01


# ----------------------------------------------------------------------------- quantize
@needs_triton
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantize_matches_reference(fmt):
    n0 = registry.module("triton").LAUNCHES["quantize_kernel"]
    w = _weights(fmt)
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if fmt == "int8" else (torch.float32,)
    for dtype in dtypes:
        for rounding in ("nearest", "stochastic"):
            kw = dict(rounding=rounding, seed=11, key=2**63 + 7, group_size=GROUP)
            ref = quant.quantize_weight(w.to(dtype), fmt, backend="reference", **kw)
            tri = quant.quantize_weight(w.to(dtype), fmt, backend="triton", **kw)
            assert torch.equal(_bits(tri.q), _bits(ref.q)), (dtype, rounding)
            assert torch.equal(tri.scale, ref.scale)
    assert registry.module("triton").LAUNCHES["quantize_kernel"] == n0 + 2 * len(dtypes)
    # the tie rows have scale 1 and really are ties: nearest-even differs from rounding half up there
    ref = quant.quantize_weight(w, fmt, backend="reference", group_size=GROUP)
    assert bool((ref.scale[32:] == 1.0).all())
    vals = F.values(ref)[32:].double()
    half_up = torch.floor(w[32:].double().cpu() + 0.5) if fmt != "fp8" else None
    if half_up is not None:
        assert bool((vals.cpu() != half_up).any())
    if fmt == "int4":  # padding nibbles (columns K .. Kp - 1) are 0
        assert not bool(R.unpack_int4(tri.q)[:, K:].any())


@needs_triton
def test_quantize_fp8_special_values():
    """e4m3 rounding in integer arithmetic vs torch's casts (reference): every e4m3 value, the midpoints
    between neighbours and one float32 ulp either side of them, subnormals, 448 and beyond, inf, NaN, -0."""
    g = torch.Generator().manual_seed(0)
    grid = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[:-1] + grid[1:]) / 2
    vals = torch.cat([grid, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e9)),
                      torch.rand(500, generator=g) * 2**-6, torch.rand(500, generator=g) * 600,
                      torch.tensor([449.0, 464.0, 480.0, 1e30, float("inf"), float("nan"), 2**-10, 1e-40])])
    vals = torch.cat([vals, -vals, torch.tensor([-0.0])])
    w = torch.nn.functional.pad(vals, (0, (-vals.numel()) % 101)).reshape(-1, 101).to(DEVICE)
    scale = torch.ones(w.shape[0], 1, device=DEVICE)
    for rounding in ("nearest", "stochastic"):
        outs = [torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=DEVICE) for _ in range(2)]
        for out, impl in zip(outs, (RQ, TQ)):
            impl.quant_quantize(w, scale, "fp8", 0, rounding, 1, 2, out)
        assert torch.equal(outs[0].view(torch.uint8), outs[1].view(torch.uint8)), rounding


# ----------------------------------------------------------------------------- probes
@needs_triton
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_probe_matches_reference_rademacher(fmt):
    qw = _quantized(fmt)
    outs = (None, torch.float32, torch.bfloat16) if fmt != "int4" else (None, torch.float16, torch.uint8)
    for sign in (1, -1):
        for out_dtype in outs:
            sat = {}
            got = {}
            for backend in ("reference", "triton"):
                sat[backend] = torch.full((1,), 5, dtype=torch.int64, device=DEVICE)
                got[backend] = QO.probe_weights(qw, 77, 2**64 - 3, 2, EPS[fmt], sign, "rademacher",
                                                out_dtype=out_dtype, saturated=sat[backend], backend=backend)
            assert got["triton"].dtype == (out_dtype or QO.grid_dtype(fmt))
            if out_dtype == torch.uint8:   # int4 packed like the storage (K % 4 != 0 here: int8, then packed)
                assert got["triton"].shape == qw.q.shape
            assert torch.equal(_bits(got["triton"]), _bits(got["reference"])), (sign, out_dtype)
            assert int(sat["triton"]) == int(sat["reference"]) > 5, (sign, out_dtype)
    # the probe really moved the weights, and the two signs differ
    plus = QO.probe_weights(qw, 77, 9, 2, EPS[fmt], 1, "rademacher", backend="triton")
    minus = QO.probe_weights(qw, 77, 9, 2, EPS[fmt], -1, "rademacher", backend="triton")
    base = qw.q.view(torch.uint8) if fmt == "fp8" else F.values(qw).to(torch.int8)
    assert not torch.equal(_bits(plus), base) and not torch.equal(_bits(plus), _bits(minus))


@needs_triton
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_probe_gaussian_close_to_reference(fmt):
    qw = _quantized(fmt)
    ref = QO.probe_weights(qw, 5, 9, 1, EPS[fmt], -1, "gaussian", backend="reference")
    tri = QO.probe_weights(qw, 5, 9, 1, EPS[fmt], -1, "gaussian", backend="triton")
    _near(tri, ref, fmt)


@needs_triton
def test_probe_values_and_quzo_probe_path_use_the_backend():
    """probe_values (ProbeResult, int32 values) goes through the same kernels when no cache is given."""
    qw = _quantized("int4")
    a = QO.probe_values(qw, 5, 9, 0, EPS["int4"], 1, "rademacher", backend="triton")
    b = QO.probe_values(qw, 5, 9, 0, EPS["int4"], 1, "rademacher", cache={})   # materialized torch path
    assert a.values.dtype == torch.int32 and torch.equal(a.values, b.values) and a.saturated == b.saturated > 0


# ----------------------------------------------------------------------------- update
@needs_triton
@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("form", ["single", "paper"])
def test_update_matches_reference_rademacher(fmt, form):
    qw = _quantized(fmt)
    coeffs = [0.7, -1.3, 2.1] if form == "single" else [1.9, -0.6]
    res = {}
    for backend in ("reference", "triton"):
        q = _clone(qw)
        sat = QO.update_(q, 2**40 + 1, 12345, coeffs, LR[fmt], EPS[fmt], form, "rademacher", backend=backend)
        res[backend] = (q.q, int(sat))
    assert torch.equal(_bits(res["triton"][0]), _bits(res["reference"][0]))
    assert res["triton"][1] == res["reference"][1]
    assert not torch.equal(_bits(res["triton"][0]), _bits(qw.q))   # the update moved the weights
    if fmt != "fp8":
        assert res["triton"][1] > 0       # the grid edge was hit, so the counts were compared for real
    # the materialized path of the CPU step cache computes the same update
    q = _clone(qw)
    QO.apply_update_(q, 2**40 + 1, 12345, coeffs, LR[fmt], EPS[fmt], form, "rademacher", cache={})
    assert torch.equal(_bits(q.q), _bits(res["reference"][0]))


@needs_triton
def test_update_gaussian_and_no_queries():
    qw = _quantized("int4")
    res = []
    for backend in ("reference", "triton"):
        q = _clone(qw)
        QO.update_(q, 8, 9, [0.5, -1.0], LR["int4"], EPS["int4"], "single", "gaussian", backend=backend)
        res.append(q.q)
    _near(res[1], res[0], "int4")
    for fmt in ("int8", "fp8"):   # no coefficients: x = 0, the weights stay (SR of 0, SR_e4m3 of grid values)
        qw = _quantized(fmt)
        q = _clone(qw)
        sat = QO.update_(q, 8, 9, [], 1.0, 1e-3, "paper", "gaussian", backend="triton")
        assert torch.equal(_bits(q.q), _bits(qw.q)) and int(sat) == 0


@needs_triton
def test_int4_writes_when_k_is_a_multiple_of_4():
    """K % 4 == 0 (every LLM shape): int4 quantize / update write whole Philox blocks (byte pairs assembled
    in the tile) instead of the per-byte gather path; K = 100 with groups of 32 still ends in padding."""
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(29, 100, generator=g) * 0.05).to(DEVICE)
    for rounding in ("nearest", "stochastic"):
        ref = quant.quantize_weight(w, "int4", rounding=rounding, seed=2, key=3, group_size=32, backend="reference")
        tri = quant.quantize_weight(w, "int4", rounding=rounding, seed=2, key=3, group_size=32, backend="triton")
        assert torch.equal(tri.q, ref.q) and tri.q.shape == (29, 64)
    out = torch.full_like(ref.q, 0xFF)     # padding bytes are written as 0 whatever the buffer held
    TQ.quant_quantize(w, ref.scale, "int4", 32, "stochastic", 2, 3, out)
    assert torch.equal(out, ref.q)
    for form in ("single", "paper"):
        res = []
        for backend in ("reference", "triton"):
            q = _clone(ref)
            sat = QO.update_(q, 6, 7, [1.1, -0.4], LR["int4"], EPS["int4"], form, "rademacher", backend=backend)
            res.append((q.q, int(sat)))
        assert torch.equal(res[0][0], res[1][0]) and res[0][1] == res[1][1] > 0, form
        assert not torch.equal(res[1][0], ref.q)
    # probe weights packed by the kernel == the reference == int8 grid values packed in torch
    packed = {b: QO.probe_weights(ref, 4, 5, 1, EPS["int4"], -1, "rademacher", out_dtype=torch.uint8, backend=b)
              for b in ("reference", "triton")}
    grid = QO.probe_weights(ref, 4, 5, 1, EPS["int4"], -1, "rademacher", backend="reference")
    torch_packed = R.pack_int4_padded(grid, ref.padded_k)
    assert torch.equal(packed["triton"], packed["reference"]) and torch.equal(torch_packed, packed["reference"])
    assert not torch.equal(packed["triton"], ref.q)


# ----------------------------------------------------------------------------- dispatch, QuZO
def test_backend_choice():
    assert QO.quant_backend(torch.device("cpu")) == "reference"   # the interpreter is never automatic
    if _triton_reason() is None:
        assert QO.quant_backend(DEVICE, "triton") == "triton"
    if torch.cuda.is_available():
        assert QO.quant_backend(DEVICE) in ("cuda", "triton")
    with pytest.raises(ValueError, match="sign"):
        QO.probe_weights(_quantized("int8"), 1, 2, 0, 1e-3, 2)
    with pytest.raises(ValueError, match="saturated"):
        QO.probe_weights(_quantized("int8"), 1, 2, 0, 1e-3, 1, saturated=torch.zeros(1, dtype=torch.int32))


def test_inconsistent_layouts_are_refused():
    """Storage / scale that do not match (fmt, shape, group_size) never reach a kernel (the CUDA and Triton
    kernels index raw memory from the shapes): ValueError naming the expected layout."""
    qw = _quantized("int4")
    bad = [F.QuantizedWeight("int4", qw.q, qw.scale, (N, K + 60), GROUP),         # K beyond the padded storage
           F.QuantizedWeight("int4", qw.q, qw.scale[:, :2].contiguous(), qw.shape, GROUP),
           F.QuantizedWeight("int8", qw.q, qw.scale, qw.shape, GROUP),               # uint8 storage called int8
           F.QuantizedWeight("int4", qw.q, qw.scale, qw.shape, 0)]
    for q in bad:
        with pytest.raises(ValueError, match="group_size|expected storage"):
            QO.probe_weights(q, 1, 2, 0, 1e-3, 1, backend="reference")
        with pytest.raises(ValueError, match="group_size|expected storage"):
            QO.update_(q, 1, 2, [1.0], 1e-3, 1e-3, backend="reference")
    w = _weights("int8")
    scale = F.compute_scale(w, "int8")
    out = torch.empty(N, K - 1, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="expected storage"):
        QO.quantize_into(w, scale, "int8", 0, "nearest", 0, 0, out)
    with pytest.raises(ValueError, match="2-d"):
        QO.quantize_into(w[0], scale, "int8", 0, "nearest", 0, 0, out)
    qw = _quantized("int8")
    with pytest.raises(ValueError, match="eps must be finite"):
        QO.probe_weights(qw, 1, 2, 0, float("nan"), 1)
    with pytest.raises(ValueError, match="lr must be finite"):
        QO.update_(qw, 1, 2, [1.0], float("inf"), 1e-3)
    with pytest.raises(ValueError, match="coeffs must be finite"):
        QO.update_(qw, 1, 2, [1.0, float("nan")], 1e-3, 1e-3)


def test_quantlinear_probe_values_kernel_and_cache_paths_agree():
    """QuantLinear._probe_values: the kernel path (int8 grid values, or packed int4 for W4A16) and the CPU
    step-cache path (materialized int32 values) give the same probe weights."""
    from zokernels.quant.linear import ProbeSpec

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 12))
    quant.quantize_model(model, "int4", exclude=(), group_size=32)
    ql = model[0]
    got = {}
    for cache in (None, {}):
        for packed in (False, True):
            ql.probe = ProbeSpec(3, 0, -1, 2e-2, "rademacher", cache=cache)
            got[cache is None, packed] = ql._probe_values(packed_int4=packed)
            ql.probe = None
    assert got[True, False].dtype == torch.int8 and got[False, False].dtype == torch.int32
    assert torch.equal(got[True, False].int(), got[False, False])
    assert got[True, True].shape == ql.qweight.shape and torch.equal(got[True, True], got[False, True])
    assert not torch.equal(got[True, True], ql.qweight)


def _mlp(fmt: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 8)).to(DEVICE)
    quant.quantize_model(model, fmt, exclude=(), group_size=32)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 24, generator=g).to(DEVICE), torch.randn(16, 8, generator=g).to(DEVICE)
    return model, lambda: torch.nn.functional.mse_loss(model(x), y)


@needs_triton
def test_quzo_triton_matches_reference_bitwise():
    """Two QuZO steps (int4, paper form) with the Triton kernels and with the reference path (on CPU: the
    step cache of z and Q1): the same losses, gradients, saturation counts and weights, bit for bit."""
    from zokernels.quant.quzo import QuZO

    runs = {}
    for backend in ("auto", "triton"):
        model, closure = _mlp("int4")
        opt = QuZO(model, lr=3e-2, eps=2e-2, seed=4, dist="rademacher", update="paper", backend=backend)
        losses = [float(opt.step(closure)) for _ in range(2)]
        runs[backend] = (losses, [(r.grads, r.probe_saturated, r.update_saturated) for r in opt.log.steps],
                         [m.qweight.clone() for _, m in quant.quant_layers(model)])
        if backend == "triton":
            assert not opt.cache_directions
    assert runs["auto"][0] == runs["triton"][0] and runs["auto"][1] == runs["triton"][1]
    assert all(torch.equal(a, b) for a, b in zip(runs["auto"][2], runs["triton"][2]))
    model, _ = _mlp("int4")
    assert not all(torch.equal(a, m.qweight) for a, (_, m) in zip(runs["triton"][2], quant.quant_layers(model)))


# ----------------------------------------------------------------------------- sm_90 compile (no GPU)
_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from zokernels.backends.triton import quant_kernels as QK
def ptx(fn, ptrs, consts):
    sig = {n: ptrs.get(n, "constexpr" if n in consts else ("fp32" if n in ("eps", "lr") else "i32"))
           for n in fn.arg_names}
    c = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    assert len(c.asm["cubin"]) > 0
    return c.asm["ptx"]
t = {"BLOCKS": 256, "PRECISE": True}
cases = [
    ("quantize int4 bf16 SR", QK.quantize_kernel, {"w_ptr": "*i16", "scale_ptr": "*fp32", "out_ptr": "*u8"},
     {"QMAX": 7, "FMT": 1, "GROUP": 128, "KIND": 1, "STOCHASTIC": True, "QUAD": True, **t}),
    ("probe fp8 -> bf16", QK.probe_kernel, {"q_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": "*i16", "sat_ptr": "*i64"},
     {"QMAX": 448.0, "FMT": 2, "GROUP": 1, "OUT": 1, "GAUSSIAN": True, **t}),
    ("update int4 paper", QK.update_kernel, {"q_ptr": "*u8", "scale_ptr": "*fp32", "coeff_ptr": "*fp32",
     "sat_ptr": "*i64"}, {"QMAX": 7, "FMT": 1, "GROUP": 64, "PAPER": True, "GAUSSIAN": True, "QUAD": False, **t}),
]
for name, fn, ptrs, consts in cases:
    p = ptx(fn, ptrs, consts)
    print(name, p.count("div.rn.f32"), p.count("div.full.f32"), p.count("atom.global"), sep="|")
"""


def test_triton_quant_kernels_compile_for_sm90(compile_sm90):
    """Without a GPU: the quant kernels compile for sm_90 down to a cubin (catches GPU-only compile errors),
    every float32 division is IEEE div.rn (plain `/` would be the approximate div.full), and the probe and
    update kernels count saturation with a global atomic."""
    stdout = compile_sm90(_COMPILE)
    rows = [line.split("|") for line in stdout.strip().splitlines()]
    assert len(rows) == 3, stdout
    for name, div_rn, div_full, atomics in rows:
        assert int(div_rn) > 0 and int(div_full) == 0, (name, stdout)
        assert int(atomics) >= (0 if name.startswith("quantize") else 1), (name, stdout)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_gpu_backends_match_reference_at_scale(fmt, cuda_device):
    """Every usable GPU backend with the quant ops (cuda, triton) vs the reference at 1037 x 4099."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(1037, 4099, generator=g) * 0.02).to(cuda_device, torch.bfloat16)
    names = [n for n in ("cuda", "triton") if registry.not_supported(n, cuda_device) is None
             and all(registry.why_not(op, n, cuda_device) is None for op in QO.QUANT_OPS)]
    assert "triton" in names
    ref_q = quant.quantize_weight(w, fmt, rounding="stochastic", seed=1, key=2, group_size=128, backend="reference")
    for name in names:
        q = quant.quantize_weight(w, fmt, rounding="stochastic", seed=1, key=2, group_size=128, backend=name)
        assert torch.equal(_bits(q.q), _bits(ref_q.q)), name
        for out_dtype in (None, torch.bfloat16):
            a, b = QO.new_counter(cuda_device), QO.new_counter(cuda_device)
            pr = QO.probe_weights(ref_q, 3, 4, 1, 1e-3, -1, "rademacher", out_dtype=out_dtype, saturated=a,
                                  backend="reference")
            pg = QO.probe_weights(ref_q, 3, 4, 1, 1e-3, -1, "rademacher", out_dtype=out_dtype, saturated=b,
                                  backend=name)
            assert torch.equal(_bits(pg), _bits(pr)) and int(a) == int(b), (name, out_dtype)
        for form in ("single", "paper"):
            qa, qb = _clone(ref_q), _clone(ref_q)
            sa = QO.update_(qa, 5, 6, [0.3, -0.8], 1e-4, 1e-3, form, "rademacher", backend="reference")
            sb = QO.update_(qb, 5, 6, [0.3, -0.8], 1e-4, 1e-3, form, "rademacher", backend=name)
            assert torch.equal(_bits(qa.q), _bits(qb.q)) and int(sa) == int(sb), (name, form)
            qc = _clone(ref_q)
            QO.update_(qc, 5, 6, [0.3, -0.8], 1e-4, 1e-3, form, "gaussian", backend="reference")
            qd = _clone(ref_q)
            QO.update_(qd, 5, 6, [0.3, -0.8], 1e-4, 1e-3, form, "gaussian", backend=name)
            _near(qd.q, qc.q, fmt)


@pytest.mark.gpu
def test_gpu_int8_probe_beyond_2_pow_31_elements(cuda_device):
    """64-bit element indices: the last rows of a weight with N K > 2^31 match the reference element math."""
    k = 4099
    n = (1 << 31) // k + 3
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=cuda_device)
    scale = torch.rand(n, 1, device=cuda_device) * 1e-2 + 1e-3
    qw = F.QuantizedWeight("int8", q, scale, (n, k))
    sat = QO.new_counter(cuda_device)
    out = QO.probe_weights(qw, 9, 10, 3, 1e-2, 1, "rademacher", saturated=sat, backend="triton")
    n0, rows = n - 4, 4
    ref = torch.empty(rows, k, dtype=torch.int8, device=cuda_device)
    ref_sat = QO.new_counter(cuda_device)
    d = (RQ._z(9, 10, 3, "rademacher", n0, rows, k, cuda_device) * RQ._scalar(1e-2, cuda_device)) / scale[n0:]
    v = RQ._v(9, 10, 3, QO.C.STREAM_QUZO_PROBE, n0, rows, k, cuda_device)
    raw = q[n0:].int() + R.sr_int(d, v)
    ref.copy_(raw.clamp(-127, 127).to(torch.int8))
    ref_sat += (raw.abs() > 127).sum()
    assert torch.equal(out[n0:], ref)
    assert int(sat) >= int(ref_sat) > 0
