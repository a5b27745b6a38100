"""zokernels.quant: formats, stochastic rounding on the grids, integer-domain perturbation, quantized
linear layers vs a float64 reference, quantize_model."""
import math

import pytest
import torch

from zokernels import contract as C
from zokernels import numerics as R
from zokernels import ops
from zokernels import quant
from zokernels.backends import registry
from zokernels.quant import formats as F
from zokernels.quant import ops as QO


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- stochastic rounding
def _sr_z_scores(x, round_fn, step_fn, draws, v_map=lambda v: v):
    total = torch.zeros_like(x, dtype=torch.float64)
    for s in range(draws):
        v = ops.uniform(x.shape, 1000 + s, 77, 0, stream=C.STREAM_QUANT_SR)
        total += round_fn(x, v_map(v)).to(torch.float64)
    mean = total / draws
    lo, hi = step_fn(x)
    var = ((x.double() - lo) * (hi - x.double())).clamp_min(0)   # Bernoulli variance of SR(x)
    err = mean - x.double()
    p = (x.double() - lo) / (hi - lo)
    mid = (p > 0.2) & (p < 0.8)                                  # where the normal approximation holds
    per_element = (err[mid].abs() / (var[mid] / draws).sqrt()).max()
    pos = x > 0   # separately per sign: a magnitude bias cancels in a signed sum over both signs
    total_z = max(abs(float(err[m].sum() / (var[m].sum() / draws).sqrt())) for m in (pos, ~pos))
    return float(per_element), total_z, float(var.sum())


def _sr_mean_check(x, round_fn, step_fn, draws=48):
    """E[SR(x)] = x, tolerances from the variance (torchao's way): every element with P(up) in (0.2, 0.8)
    within 6 standard errors of its mean over `draws`, the standardized sums over x > 0 and x <= 0 within 5; a rounding biased by
    using v^0.7 instead of v fails the same test (the test has power)."""
    per_element, total_z, var = _sr_z_scores(x, round_fn, step_fn, draws)
    assert var > 0 and per_element < 6 and total_z < 5, (per_element, total_z)
    _, biased_z, _ = _sr_z_scores(x, round_fn, step_fn, draws, lambda v: v ** 0.7)
    assert biased_z > 5, biased_z


def test_sr_to_int_unbiased():
    x = torch.randn(4099, generator=_gen(1)) * 3.0
    _sr_mean_check(x, R.sr_to_int, lambda x: (torch.floor(x).double(), torch.floor(x).double() + 1))


def _e4m3_bracket(x):
    a = x.abs()
    lo = R._e4m3_value(R._e4m3_bits_down(a))
    hi = R._e4m3_value(torch.clamp(R._e4m3_bits_down(a) + 1, max=0x7E))
    s = torch.sign(x).double()
    lo_s, hi_s = (lo.double() * s), (hi.double() * s)
    return torch.minimum(lo_s, hi_s), torch.maximum(lo_s, hi_s)


def test_sr_to_e4m3_unbiased_and_on_grid():
    x = torch.randn(4099, generator=_gen(2)) * 20.0
    _sr_mean_check(x, lambda x, v: R.sr_to_e4m3(x, v).to(torch.float32), _e4m3_bracket)
    v = ops.uniform(x.shape, 5, 6, 0, stream=C.STREAM_QUANT_SR)
    r = R.sr_to_e4m3(x, v).to(torch.float32)
    lo, hi = _e4m3_bracket(x)
    assert bool(((r.double() == lo) | (r.double() == hi)).all())
    # exact grid values never move; saturation at 448
    grid = torch.tensor([0.0, 0.015625, -1.5, 448.0, -448.0, 3.25])
    assert torch.equal(R.sr_to_e4m3(grid, torch.rand(6, generator=_gen(0))).to(torch.float32), grid)
    big = torch.tensor([1000.0, -600.0])
    assert torch.equal(R.sr_to_e4m3(big, torch.zeros(2)).to(torch.float32), torch.tensor([448.0, -448.0]))


def test_quantize_sr_reproducible_by_seed():
    w = torch.randn(33, 70, generator=_gen(3))
    for fmt in quant.FORMATS:
        a = quant.quantize_weight(w, fmt, rounding="stochastic", seed=11, key=5, group_size=32)
        b = quant.quantize_weight(w, fmt, rounding="stochastic", seed=11, key=5, group_size=32)
        c = quant.quantize_weight(w, fmt, rounding="stochastic", seed=12, key=5, group_size=32)
        assert torch.equal(a.q.view(torch.uint8), b.q.view(torch.uint8))
        assert not torch.equal(a.q.view(torch.uint8), c.q.view(torch.uint8))


def test_probe_and_update_streams_independent():
    """Q1 (STREAM_QUZO_PROBE) and Q2 (STREAM_QUZO_UPDATE) of the same d round independently: the
    correlation of their up/down decisions is ~0 (|r| < 5 / sqrt(n)), while one stream with itself is 1."""
    n = 40000
    d = torch.full((n,), 0.5)
    v1 = ops.uniform((n,), 9, 3, 0, stream=C.STREAM_QUZO_PROBE)
    v2 = ops.uniform((n,), 9, 3, 0, stream=C.STREAM_QUZO_UPDATE)
    v3 = ops.uniform((n,), 9, 3, 0, stream=C.STREAM_UPDATE_SR)
    up1, up2, up3 = (R.sr_to_int(d, v).double() for v in (v1, v2, v3))
    for a, b in ((up1, up2), (up1, up3), (up2, up3)):
        r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(r) < 5 / math.sqrt(n), r
    assert float(torch.corrcoef(torch.stack([up1, R.sr_to_int(d, v1).double()]))[0, 1]) > 0.999


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantize_round_trip_error(fmt):
    w = torch.randn(37, 130, generator=_gen(4))
    qw = quant.quantize_weight(w, fmt, group_size=64)
    deq = quant.dequantize(qw)
    s = F.scale_full(qw)
    if fmt == "fp8":  # RN on e4m3 (3 mantissa bits): relative error <= 2^-4, plus the subnormal step
        bound = w.abs() * 2.0 ** -4 + s * 2.0 ** -10
    else:
        bound = s / 2 * (1 + 1e-6)
    assert bool(((deq - w).abs() <= bound).all())
    if fmt == "int4":
        assert qw.q.dtype == torch.uint8 and qw.q.shape == (37, 192 // 2) and qw.scale.shape == (37, 3)
        vals = F.values(qw)
        assert int(vals.min()) >= -7 and int(vals.max()) <= 7
        assert torch.equal(R.unpack_int4(qw.q)[:, 130:], torch.zeros(37, 62, dtype=torch.int8))  # padding


def test_int4_pack_round_trip():
    q = torch.randint(-8, 8, (5, 18), generator=_gen(5))
    assert torch.equal(R.unpack_int4(R.pack_int4(q)).to(torch.int64), q)


# ----------------------------------------------------------------------------- integer perturbation
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_integer_perturb_restore_bitwise(fmt):
    w = torch.randn(41, 96, generator=_gen(6))
    qw = quant.quantize_weight(w, fmt, group_size=32)
    orig = qw.q.clone()
    # small eps: q + D - D == q with no saturation (exact integer arithmetic)
    qmax = int(qw.qmax)
    d = quant.probe_delta(qw, seed=123, key=9, query=2, eps=1e-2)
    assert int(d.abs().sum()) > 0
    inner = (F.values(qw).abs() + d.abs()) <= qmax
    d = torch.where(inner, d, torch.zeros_like(d))
    sat = quant.perturb_int_(qw, d)
    assert sat.count == 0 and not torch.equal(qw.q, orig)
    sat2 = quant.perturb_int_(qw, -d)
    assert sat2.count == 0 and torch.equal(qw.q, orig)
    # large eps: saturates; the recorded elements make restore exact anyway
    for sign in (+1, -1):
        d = quant.probe_delta(qw, seed=5, key=9, query=0, eps=1.0) * sign
        sat = quant.perturb_int_(qw, d)
        assert sat.count > 0
        assert int(F.values(qw).abs().max()) <= qmax
        quant.restore_int_(qw, d, sat)
        assert torch.equal(qw.q, orig)


def test_probe_values_match_inplace_and_count_saturation():
    w = torch.randn(17, 64, generator=_gen(7))
    qw = quant.quantize_weight(w, "int8")
    res = quant.probe_values(qw, 3, 4, 1, eps=0.05, sign=-1)
    d = quant.probe_delta(qw, 3, 4, 1, eps=0.05)
    raw = F.values(qw) - d
    assert torch.equal(res.values, raw.clamp(-127, 127))
    assert res.saturated == int((raw.abs() > 127).sum()) > 0


def test_probe_delta_is_unbiased_direction():
    """E[D1 | z] = eps z / s (Q1 is SR): averaged over Q1 seeds at fixed z."""
    w = torch.randn(8, 64, generator=_gen(8))
    qw = quant.quantize_weight(w, "int8")
    d = QO.scaled_direction(qw, 42, 1, 0, eps=0.01)
    draws = 64
    mean = sum(quant.probe_delta(qw, 42, 1, 0, 0.01, sr_seed=s).double() for s in range(draws)) / draws
    frac = d.double() - torch.floor(d.double())
    se = (frac * (1 - frac) / draws).sqrt()
    assert bool(((mean - d.double()).abs() <= 5 * se + 1e-9).all())


# ----------------------------------------------------------------------------- quantized linear
def _linear(n, k, seed):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    return lin


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quant_linear_dequant_path_vs_float64(fmt):
    """y == x (q s)^T + b in float64 within 2x the error of a naive bfloat16 implementation."""
    lin = _linear(45, 100, 0)
    model = torch.nn.Sequential(lin)
    quant.quantize_model(model, fmt, exclude=(), group_size=32)
    ql = model[0]
    x = torch.randn(37, 100, generator=_gen(9))
    w64 = quant.dequantize(ql.qw).double()
    ref = x.double() @ w64.t() + ql.bias.double()
    ours = ql(x).double()
    naive = (x.bfloat16() @ w64.bfloat16().t() + ql.bias.bfloat16()).double()
    err, err_naive = (ours - ref).abs().max(), (naive - ref).abs().max()
    assert err_naive > 0 and err <= 2 * err_naive, (float(err), float(err_naive))


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_w8a8_vs_float64(backend):
    """W8A8 (per-token int8 activations, int32 accumulation, dequant+bias epilogue) == float64 of the same
    quantized operands within 2x a naive bfloat16 implementation; odd M, N, K exercise the tile tails."""
    if backend == "triton":
        reason = registry.why_not("w8a8_matmul", "triton", torch.device("cpu"))
        if reason:
            pytest.skip(reason)
    lin = _linear(45, 100, 1)
    model = torch.nn.Sequential(lin)
    quant.quantize_model(model, "int8", exclude=(), matmul="w8a8", matmul_backend=backend)
    ql = model[0]
    x = torch.randn(3, 13, 100, generator=_gen(10))
    xq, xs = QO.quantize_activations(x.reshape(-1, 100), None)
    xd = xq.double() * xs.double()[:, None]
    wd = quant.dequantize(ql.qw).double()
    ref = (xd @ wd.t() + ql.bias.double()).reshape(3, 13, 45)
    ours = ql(x).double()
    naive = (xd.bfloat16() @ wd.bfloat16().t() + ql.bias.bfloat16()).double().reshape(3, 13, 45)
    err, err_naive = (ours - ref).abs().max(), (naive - ref).abs().max()
    assert err_naive > 0 and err <= 2 * err_naive, (float(err), float(err_naive))
    # and the activation quantization itself is within half a step of x
    assert bool(((xd - x.reshape(-1, 100).double()).abs() <= xs.double()[:, None] / 2 * (1 + 1e-6)).all())


def test_w8a8_backends_agree_bitwise():
    g = _gen(11)
    xq = torch.randint(-127, 128, (37, 100), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (45, 100), generator=g, dtype=torch.int8)
    sx, sw, b = torch.rand(37, generator=g) + 0.1, torch.rand(45, generator=g) + 0.1, torch.randn(45, generator=g)
    ref = quant.w8a8_matmul(xq, sx, wq, sw, b, "reference")
    exact = (xq.long() @ wq.long().t()).float() * sx[:, None] * sw[None, :] + b
    assert torch.equal(ref, exact)
    assert torch.equal(quant.w8a8_matmul(xq, sx, wq, sw, b, "torch"), ref)
    if registry.why_not("w8a8_matmul", "triton", torch.device("cpu")) is None:
        assert torch.equal(quant.w8a8_matmul(xq, sx, wq, sw, None, "triton"),
                           quant.w8a8_matmul(xq, sx, wq, sw, None, "reference"))
        assert torch.equal(quant.w8a8_matmul(xq, sx, wq, sw, b, "triton"), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 64, 48), (19, 203, 37), (7, 100, 45)])  # (M, K, N): unpadded, padded
def test_gpu_w8a8_torch_int_mm_is_exact(shape):
    """torch._int_mm on CUDA (weight as the transposed view, zero padding to its shape rules) == the exact
    int64 product; and the availability probe says yes on sm_80+."""
    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev) >= (8, 0):
        assert QO.int_mm_available(dev)
    if not QO.int_mm_available(dev):
        pytest.skip("torch._int_mm is not available on this GPU/build")
    m, k, n = shape
    g = _gen(12)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    sx, sw, b = torch.rand(m, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g)
    ref = quant.w8a8_matmul(xq, sx, wq, sw, b, "reference")
    got = quant.w8a8_matmul(xq.to(dev), sx.to(dev), wq.to(dev), sw.to(dev), b.to(dev), "torch")
    assert torch.equal(got.cpu(), ref)


# ----------------------------------------------------------------------------- quantize_model
def test_quantize_model_swaps_and_reports_memory():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(64, 32), "b": torch.nn.Linear(32, 16, bias=False),
                                 "lm_head": torch.nn.Linear(16, 10)})
    rep = quant.quantize_model(model, "int4", group_size=32)
    assert isinstance(model["a"], quant.QuantLinear) and isinstance(model["b"], quant.QuantLinear)
    assert type(model["lm_head"]) is torch.nn.Linear
    assert rep.layers == ["a", "b"]
    assert rep.bytes_before == (64 * 32 + 32 + 32 * 16) * 4
    assert rep.bytes_after == (32 * 32 + 32 * 2 * 4 + 32 * 4) + (16 * 16 + 16 * 1 * 4)
    assert rep.saved > 0 and rep.model_bytes_before - rep.model_bytes_after == rep.saved
    for m in (model["a"], model["b"]):
        assert not any(t.requires_grad for t in m.buffers())
        assert len(list(m.parameters())) == 0


def test_quantize_model_int8_fp8_bytes():
    for fmt, elt in (("int8", 1), ("fp8", 1)):
        model = torch.nn.Sequential(torch.nn.Linear(48, 24))
        rep = quant.quantize_model(model, fmt, exclude=())
        assert rep.bytes_after == 24 * 48 * elt + 24 * 4 + 24 * 4
        assert model[0].qweight.dtype == (torch.int8 if fmt == "int8" else torch.float8_e4m3fn)


def test_exclude_given_as_one_name_is_that_name():
    """exclude="lm_head" means the module lm_head, not the characters of the string (it used to quantize
    lm_head, breaking a tie to the embeddings)."""
    model = torch.nn.ModuleDict({"body": torch.nn.Linear(32, 32), "lm_head": torch.nn.Linear(32, 16)})
    quant.quantize_model(model, "int8", exclude="lm_head")
    assert isinstance(model["body"], quant.QuantLinear) and type(model["lm_head"]) is torch.nn.Linear


def test_non_finite_weights_are_refused_not_quantized_to_garbage():
    w = torch.randn(4, 64)
    for bad in (float("nan"), float("inf")):
        w2 = w.clone()
        w2[1, 3] = bad
        for fmt in F.FORMATS:
            with pytest.raises(ValueError, match="1 NaN/inf elements"):
                F.quantize_weight(w2, fmt, group_size=32)
