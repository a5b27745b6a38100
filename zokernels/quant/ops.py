"""QuZO ops on quantized weights: quantization, integer-domain probe weights, reversible in-place
perturbation, the unbiased update in its two forms, and the quantized matmuls with their backend choice.

Streams (docs/perturbation.md section 4): z of query q from STREAM_Z; the probe rounding
Q1 from STREAM_QUZO_PROBE (query q); the paper-form rounding of the update direction Q2 from
STREAM_QUZO_UPDATE (query q); the final rounding of the update from STREAM_UPDATE_SR (query 0);
weight quantization from STREAM_QUANT_SR (query 0); activation SR from STREAM_ACT_SR (query q, shared by
both probes of a query). Element index j = n * K + k of the logical [N, K] weight; for activations
j = m * K + k of the [M, K] input.

Integer formats: d = (z * eps) / s (float32, s the element's scale), D1 = SR(clamp(d, +-2^30)) (int32);
the probe weights are clamp(q +- D1, +-qmax). FP8: the probe weights are SR_e4m3(q +- d), the same
uniforms for + and -. Element math, step by step: zokernels/backends/reference/quant.py.

Backend contract of the quantized-weight ops (reference, triton, cuda implement these names; chosen per
device by quant_backend(): reference on CPU unless backend="triton" is asked for (interpreter), on CUDA
the first of cuda, triton, reference that has all three). Every backend follows the reference's float32
operation order, so results are bitwise equal across backends with Rademacher z; Gaussian z itself differs
by float32 ulps between backends (log/sin/cos), which can move a rounding (tests: <= 1% of elements).
fmt in ("int8", "int4", "fp8"); storage q: int8 [N, K] | uint8 [N, Kp/2] (int4, element 2i of a row in
the low nibble of byte i, padding nibbles k >= K are 0) | float8_e4m3fn [N, K]; scale float32 [N, 1]
(int8, fp8) or [N, Kp/group_size] (int4, Kp = K rounded up to group_size). All tensors contiguous, on
one device; seed/key are uint64 Python ints, eps/lr/coeffs Python floats (rounded to float32 inside).

  quant_quantize(w, scale, fmt, group_size, rounding, seed, key, out) -> None
      w float [N, K] (float32/bfloat16/float16); out: the storage (all of it written, int4 padding 0).
      out = R(w / s) on the grid, clamped to +-qmax; rounding "nearest" (int: half to even; fp8: RNE)
      or "stochastic" (uniforms of STREAM_QUANT_SR, query 0, j = n * K + k).
  quant_probe(q, scale, fmt, shape, group_size, seed, key, query, eps, sign, dist, out, saturated) -> None
      out-of-place probe weights of (query, sign) for the logical shape (N, K); sign is +1 or -1.
      out: int8 [N, K] (grid values; int formats) | float8_e4m3fn [N, K] (grid values; fp8) |
      float32/bfloat16/float16 [N, K] (dequantized: float32 value * s, then RNE to out's dtype) |
      optional, backends with QUANT_PROBE_PACKED_INT4 = True: uint8 [N, Kp/2] for int4 (the packed storage
      layout, padding nibbles 0; what the W4A16 matmul reads); others get int8 and a torch pack.
      saturated: int64 [1] on the device; the number of clamped elements is added to it (atomic add,
      no host sync): int: clamp(q + sign D1) != q + sign D1; fp8: |q + sign d| > 448.
  quant_update_(q, scale, fmt, shape, group_size, seed, key, coeffs, lr, eps, form, dist, saturated) -> None
      in place q <- Q(q - x), x = update_target(...) of form "single" or "paper" with c_q = coeffs[q]
      (queries 0 .. len(coeffs) - 1); int: q - SR(clamp(x, +-2^30)) clamped to +-qmax; fp8:
      SR_e4m3(q - x) (STREAM_UPDATE_SR, query 0); saturated += clamped elements (as in quant_probe).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import contract as C
from .. import ops
from ..backends import registry
from . import formats as F
from . import reference as R

UPDATE_FORMS = ("single", "paper")
MATMUL_BACKENDS = ("auto", "reference", "torch", "triton")
QUANT_OPS = ("quant_quantize", "quant_probe", "quant_update_")
SR_CLAMP = 2.0 ** 30


# ----------------------------------------------------------------------------- backend choice
def quant_backend(device: torch.device, backend: str = "auto"):
    """The backend module for the quantized-weight ops on `device`. 'auto' ($ZOKERNELS_BACKEND if set):
    reference on CPU, on CUDA the first of cuda, triton, reference implementing QUANT_OPS. A requested
    backend without the ops falls back to the 'auto' choice (deterministically, so replay reproduces)."""
    if backend == "auto":
        backend = os.environ.get(ops.BACKEND_ENV, "auto") or "auto"
    if backend != "auto":
        mod = registry.require(backend, device)
        if all(hasattr(mod, op) for op in QUANT_OPS):
            return mod
    return registry.auto(device, needs=QUANT_OPS)


def _f32(x: float) -> float:
    return float(torch.tensor(float(x), dtype=torch.float32))


def _scalar(x: float, like: torch.Tensor) -> torch.Tensor:
    """float32 0-dim tensor on like's device (on CUDA, `t / python_scalar` multiplies by a reciprocal)."""
    return torch.tensor(_f32(x), dtype=torch.float32, device=like.device)


def new_counter(device) -> torch.Tensor:
    """An int64 [1] saturation counter for the kernels to add to."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def _check_sign(sign: int) -> int:
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    return int(sign)


def _check_counter(saturated: torch.Tensor | None, device) -> torch.Tensor:
    if saturated is None:
        return new_counter(device)
    if saturated.dtype != torch.int64 or saturated.numel() != 1 or saturated.device != torch.device(device):
        raise ValueError(f"saturated must be an int64 tensor of one element on {device}, got "
                         f"{saturated.dtype} {tuple(saturated.shape)} on {saturated.device}")
    return saturated


def _check_layout(fmt: str, q: torch.Tensor, scale: torch.Tensor, shape, group_size: int) -> None:
    """Storage and scale of a logical [N, K] weight as the module docstring lays them out (the CUDA and Triton
    kernels index raw memory from these shapes, so a mismatch must not reach them)."""
    F.check_format(fmt)
    n, k = (int(d) for d in shape)
    if fmt == "int4":
        if group_size <= 0 or group_size % 2:
            raise ValueError(f"int4 needs a positive even group_size, got {group_size}")
        kp = -(-k // group_size) * group_size
        dtype, q_shape, s_shape = torch.uint8, (n, kp // 2), (n, kp // group_size)
    else:
        dtype, q_shape, s_shape = grid_dtype(fmt), (n, k), (n, 1)
    if q.dtype != dtype or tuple(q.shape) != q_shape or tuple(scale.shape) != s_shape:
        raise ValueError(f"{fmt} weight of shape {(n, k)}: expected storage {dtype} {q_shape} and scale {s_shape}, "
                         f"got {q.dtype} {tuple(q.shape)} and {tuple(scale.shape)}")
    if not (q.is_contiguous() and scale.is_contiguous()):
        raise ValueError("quantized weight storage and scale must be contiguous")
    if scale.dtype != torch.float32 or scale.device != q.device:
        raise ValueError(f"scale must be float32 on the storage's device ({q.device}), got {scale.dtype} on "
                         f"{scale.device}")


def _check_qw(qw: F.QuantizedWeight) -> None:
    _check_layout(qw.fmt, qw.q, qw.scale, qw.shape, qw.group_size)


# ----------------------------------------------------------------------------- quantization
def quantize_into(w: torch.Tensor, scale: torch.Tensor, fmt: str, group_size: int, rounding: str, seed: int,
                  key: int, out: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """out <- storage of R(w / s) (see quant_quantize in the module docstring); returns out."""
    C.check_rounding(rounding)
    if w.dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"quantize takes a float32/bfloat16/float16 weight, got {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"quantize takes a 2-d weight, got shape {tuple(w.shape)}")
    _check_layout(fmt, out, scale, w.shape, group_size)
    if out.device != w.device:
        raise ValueError(f"out is on {out.device}, the weight on {w.device}")
    quant_backend(w.device, backend).quant_quantize(w.detach().contiguous(), scale, fmt, group_size, rounding,
                                                    C.check_u64(seed, "seed"), C.check_u64(key, "key"), out)
    return out


# ----------------------------------------------------------------------------- probes
def _z(qw: F.QuantizedWeight, seed: int, key: int, query: int, dist: str, cache: dict | None = None) -> torch.Tensor:
    """z of (seed, query, key) over the logical weight; `cache` (a dict that lives for one step) keeps
    it for the other probe and the update: the reference Philox dominates a CPU step otherwise."""
    if cache is None:
        return ops.perturbation(qw.shape, seed, key, query, dist, device=qw.scale.device)
    k = ("z", seed, key, query, dist)
    if k not in cache:
        cache[k] = ops.perturbation(qw.shape, seed, key, query, dist, device=qw.scale.device)
    return cache[k]


def _v(qw: F.QuantizedWeight, seed: int, key: int, query: int, stream: int) -> torch.Tensor:
    return ops.uniform(qw.shape, seed, key, query, stream=stream, device=qw.scale.device)


def scaled_direction(qw: F.QuantizedWeight, seed: int, key: int, query: int, eps: float,
                     dist: str = "gaussian", cache: dict | None = None) -> torch.Tensor:
    """d = (eps * z_query) / s, float32 [N, K]: the perturbation in grid units."""
    z = _z(qw, seed, key, query, dist, cache)
    return (z * _scalar(eps, z)) / F.scale_full(qw)


def probe_delta(qw: F.QuantizedWeight, seed: int, key: int, query: int, eps: float, dist: str = "gaussian",
                sr_seed: int | None = None, cache: dict | None = None) -> torch.Tensor:
    """Integer formats: D1 = Q1(eps z / s) = SR(d) with the uniforms of STREAM_QUZO_PROBE (int32).
    sr_seed (default: seed) only exists so tests can redraw Q1 at a fixed z."""
    if qw.fmt == "fp8":
        raise ValueError("fp8 probes are not an integer offset; use probe_values")
    k = ("d1", seed, key, query, dist, float(eps), sr_seed)
    if cache is not None and k in cache:
        return cache[k]
    d = scaled_direction(qw, seed, key, query, eps, dist, cache)
    v = _v(qw, seed if sr_seed is None else sr_seed, key, query, C.STREAM_QUZO_PROBE)
    out = R.sr_to_int(torch.clamp(d, -SR_CLAMP, SR_CLAMP), v)
    if cache is not None:
        cache[k] = out
    return out


@dataclass
class ProbeResult:
    values: torch.Tensor    # grid values of the probe weights (int32, or float32 e4m3 values)
    saturated: int          # elements clamped at +-qmax


def grid_dtype(fmt: str) -> torch.dtype:
    """The dtype of probe weights as grid values: int8 (int8, int4) or float8_e4m3fn (fp8)."""
    return torch.float8_e4m3fn if fmt == "fp8" else torch.int8


def probe_weights(qw: F.QuantizedWeight, seed: int, key: int, query: int, eps: float, sign: int,
                  dist: str = "gaussian", *, out_dtype: torch.dtype | None = None,
                  saturated: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The weights of probe (query, sign), out of place, by the backend kernel (quant_probe): grid values
    (out_dtype None: int8 for int formats, float8_e4m3fn for fp8) or dequantized values * s (out_dtype
    float32/bfloat16/float16), [N, K]; int4 with out_dtype uint8: packed like qw.q, [N, Kp / 2].
    Clamped elements are added to `saturated` (int64 [1]) if given."""
    _check_qw(qw)
    C.check_dist(dist)
    sign = _check_sign(sign)
    out_dtype = grid_dtype(qw.fmt) if out_dtype is None else out_dtype
    packed = qw.fmt == "int4" and out_dtype == torch.uint8
    if out_dtype not in (grid_dtype(qw.fmt),) + ops.FLOAT_DTYPES and not packed:
        raise ValueError(f"probe weights of {qw.fmt} come as {grid_dtype(qw.fmt)} grid values, float "
                         f"{ops.FLOAT_DTYPES} or (int4) packed uint8, not {out_dtype}")
    device = qw.q.device
    saturated = _check_counter(saturated, device)
    mod = quant_backend(device, backend)
    native = not packed or getattr(mod, "QUANT_PROBE_PACKED_INT4", False)
    out = torch.empty(qw.q.shape if packed and native else qw.shape, dtype=out_dtype if native else torch.int8,
                      device=device)
    mod.quant_probe(qw.q, qw.scale, qw.fmt, tuple(qw.shape), qw.group_size, C.check_u64(seed, "seed"),
                    C.check_u64(key, "key"), C.check_query(query), ops._f32(eps, "eps"), sign, dist, out, saturated)
    if not native:
        out = R.pack_int4(torch.nn.functional.pad(out.to(torch.int32), (0, qw.padded_k - qw.shape[1])))
    return out


def probe_values(qw: F.QuantizedWeight, seed: int, key: int, query: int, eps: float, sign: int,
                 dist: str = "gaussian", sr_seed: int | None = None, cache: dict | None = None,
                 backend: str = "auto") -> ProbeResult:
    """The weights of probe (query, sign), as grid values, computed out of place (drift-free):
    int: clamp(q + sign * D1, -qmax, qmax); fp8: SR_e4m3(q + sign * d) (uniforms of STREAM_QUZO_PROBE).
    Without cache and sr_seed: the backend kernel (probe_weights); otherwise materialized here."""
    if cache is None and sr_seed is None:
        counter = new_counter(qw.q.device)
        vals = probe_weights(qw, seed, key, query, eps, sign, dist, saturated=counter, backend=backend)
        return ProbeResult(vals.to(torch.float32 if qw.fmt == "fp8" else torch.int32), int(counter))
    q = F.values(qw)
    if qw.fmt == "fp8":
        d = scaled_direction(qw, seed, key, query, eps, dist, cache)
        v = _v(qw, seed if sr_seed is None else sr_seed, key, query, C.STREAM_QUZO_PROBE)
        x = q + d * float(sign)
        return ProbeResult(R.sr_to_e4m3(x, v).to(torch.float32), int((x.abs() > qw.qmax).sum()))
    raw = q + probe_delta(qw, seed, key, query, eps, dist, sr_seed, cache) * sign
    clamped = torch.clamp(raw, -int(qw.qmax), int(qw.qmax))
    return ProbeResult(clamped, int((clamped != raw).sum()))


# ----------------------------------------------------------------------------- in place, reversible
@dataclass
class Saturation:
    """What clamping destroyed in an in-place perturbation: flat indices and their values before."""

    index: torch.Tensor
    before: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.index.numel())


def perturb_int_(qw: F.QuantizedWeight, delta: torch.Tensor) -> Saturation:
    """In place: q <- clamp(q + delta, -qmax, qmax) (int formats). Returns the clamped elements'
    previous values, so that restore_int_ undoes it bitwise even where it saturated."""
    if qw.fmt == "fp8":
        raise ValueError("in-place reversible perturbation needs an integer format (int8, int4)")
    q = F.values(qw)
    raw = q + delta.to(torch.int32)
    qmax = int(qw.qmax)
    clamped = torch.clamp(raw, -qmax, qmax)
    hit = (clamped != raw).reshape(-1).nonzero().reshape(-1)
    sat = Saturation(hit, q.reshape(-1)[hit].clone())
    F.store_values_(qw, clamped)
    return sat


def restore_int_(qw: F.QuantizedWeight, delta: torch.Tensor, saturation: Saturation) -> None:
    """Undo perturb_int_(qw, delta): q <- q - delta, then the clamped elements get their old values."""
    q = F.values(qw) - delta.to(torch.int32)
    if saturation.count:
        q.view(-1)[saturation.index] = saturation.before
    F.store_values_(qw, q)


# ----------------------------------------------------------------------------- the update
def update_target(qw: F.QuantizedWeight, seed: int, key: int, coeffs: Sequence[float], lr: float, eps: float,
                  form: str = "single", dist: str = "gaussian", cache: dict | None = None,
                  rounding_seed: int | None = None) -> torch.Tensor:
    """x = the update in grid units before its final rounding (float32 [N, K]); coeffs c_q = mu_q / n.

    single: x = lr * (sum_q c_q z_q) / s                      (one rounding later: unbiased, less variance)
    paper : x = lr * (sum_q c_q D2_q) / eps, D2_q = Q2(eps z_q / s) (uniforms: STREAM_QUZO_UPDATE, q)
    (sums start from the first term, as in the float ops.) rounding_seed (default seed) redraws Q2 at a
    fixed z (variance tests). Materialized here; the backends fuse it into quant_update_."""
    if form not in UPDATE_FORMS:
        raise ValueError(f"update form must be one of {UPDATE_FORMS}, got {form!r}")
    acc = None
    for q, c in enumerate(coeffs):
        if form == "single":
            z = _z(qw, seed, key, q, dist, cache)
            term = z * _scalar(c, z)
        else:
            d = scaled_direction(qw, seed, key, q, eps, dist, cache)
            v = _v(qw, seed if rounding_seed is None else rounding_seed, key, q, C.STREAM_QUZO_UPDATE)
            d2 = R.sr_to_e4m3(d, v) if qw.fmt == "fp8" else R.sr_to_int(torch.clamp(d, -SR_CLAMP, SR_CLAMP), v)
            term = d2.to(torch.float32) * _scalar(c, d)
        acc = term if acc is None else acc + term
    if acc is None:
        return torch.zeros(qw.shape, dtype=torch.float32, device=qw.scale.device)
    if form == "single":
        return (acc * _scalar(lr, acc)) / F.scale_full(qw)
    return (acc * _scalar(lr, acc)) / _scalar(eps, acc)


def update_values(qw: F.QuantizedWeight, x: torch.Tensor, seed: int, key: int,
                  rounding_seed: int | None = None) -> ProbeResult:
    """The new grid values q' = Q(q - x), Q = SR with the uniforms of STREAM_UPDATE_SR (query 0):
    int: q - SR(x) clamped (the rounded step is what a replay recomputes); fp8: SR_e4m3(q - x)."""
    v = _v(qw, seed if rounding_seed is None else rounding_seed, key, 0, C.STREAM_UPDATE_SR)
    q = F.values(qw)
    if qw.fmt == "fp8":
        y = q - x
        return ProbeResult(R.sr_to_e4m3(y, v).to(torch.float32), int((y.abs() > qw.qmax).sum()))
    raw = q - R.sr_to_int(torch.clamp(x, -SR_CLAMP, SR_CLAMP), v)
    clamped = torch.clamp(raw, -int(qw.qmax), int(qw.qmax))
    return ProbeResult(clamped, int((clamped != raw).sum()))


def update_(qw: F.QuantizedWeight, seed: int, key: int, coeffs: Sequence[float], lr: float, eps: float,
            form: str = "single", dist: str = "gaussian", *, saturated: torch.Tensor | None = None,
            backend: str = "auto") -> torch.Tensor:
    """q <- Q(q - update_target(...)) in place by the backend kernel (quant_update_, one pass, no
    materialized z); saturated elements are added to `saturated` (int64 [1], returned; no host sync)."""
    _check_qw(qw)
    C.check_dist(dist)
    if form not in UPDATE_FORMS:
        raise ValueError(f"update form must be one of {UPDATE_FORMS}, got {form!r}")
    if len(coeffs) > C.MAX_QUERIES:
        raise ValueError(f"at most {C.MAX_QUERIES} coefficients (queries), got {len(coeffs)}")
    device = qw.q.device
    saturated = _check_counter(saturated, device)
    quant_backend(device, backend).quant_update_(qw.q, qw.scale, qw.fmt, tuple(qw.shape), qw.group_size,
                                                 C.check_u64(seed, "seed"), C.check_u64(key, "key"),
                                                 [ops._f32(c, "coeffs") for c in coeffs], ops._f32(lr, "lr"),
                                                 ops._f32(eps, "eps"), form, dist, saturated)
    return saturated


def apply_update_(qw: F.QuantizedWeight, seed: int, key: int, coeffs: Sequence[float], lr: float, eps: float,
                  form: str = "single", dist: str = "gaussian", cache: dict | None = None,
                  backend: str = "auto") -> int:
    """q <- Q(q - update_target(...)) in place; returns the number of saturated elements. With a step
    cache (CPU) materialized here from the cached z; otherwise the backend kernel (update_)."""
    if cache is None:
        return int(update_(qw, seed, key, coeffs, lr, eps, form, dist, backend=backend))
    res = update_values(qw, update_target(qw, seed, key, coeffs, lr, eps, form, dist, cache), seed, key)
    F.store_values_(qw, res.values)
    return res.saturated


# ----------------------------------------------------------------------------- activations, matmuls
def quantize_activations(x: torch.Tensor, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: s_m = amax_m / 127 (1 where 0), xq = R(x / s_m) in [-127, 127].
    R: nearest (v None) or SR with uniforms v [M, K]. Returns (int8 [M, K], float32 [M])."""
    x = x.to(torch.float32)
    s = x.abs().amax(dim=1) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    y = torch.clamp(x / s[:, None], -127.0, 127.0)
    q = R.sr_to_int(y, v) if v is not None else R.rn_to_int(y)
    return q.to(torch.int8), s


def activation_uniforms(shape, seed: int, key: int, query: int, device) -> torch.Tensor:
    return ops.uniform(tuple(shape), seed, key, query, stream=C.STREAM_ACT_SR, device=device)


_int_mm_ok: dict = {}


def _torch_int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ w [N, K]^T with torch._int_mm -> int32 [M, N]. On CUDA the weight goes in as the transposed
    view w.t() (column-major [K, N]: cuBLASLt's "TN" int8 layout, the one PyTorch tests on CUDA 13; a
    row-major copy would be "NN", which CUDA 13's cuBLAS does not offer), with M > 16 and K, N multiples of 8
    by zero padding (of w itself, so the view stays column-major)."""
    m, k = a.shape
    n = w.shape[0]
    if a.is_cuda:
        mp, kp, np_ = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
        if (mp, kp, np_) != (m, k, n):
            a = torch.nn.functional.pad(a, (0, kp - k, 0, mp - m))
            w = torch.nn.functional.pad(w, (0, kp - k, 0, np_ - n))
        return torch._int_mm(a, w.t())[:m, :n]
    return torch._int_mm(a, w.t())


def int_mm_available(device: torch.device) -> bool:
    key = torch.device(device).type
    if key not in _int_mm_ok:
        try:
            a = torch.ones(17, 8, dtype=torch.int8, device=device)  # the layout the matmuls use, unpadded
            _int_mm_ok[key] = bool((_torch_int_mm(a, torch.ones(8, 8, dtype=torch.int8, device=device)) == 8).all())
        except Exception:  # noqa: BLE001 — any failure means: not on this build/device
            _int_mm_ok[key] = False
    return _int_mm_ok[key]


def _triton_usable(device: torch.device) -> bool:
    from . import triton_linear
    return triton_linear.unavailable_reason(device) is None


def choose_matmul(device: torch.device, backend: str) -> str:
    if backend not in MATMUL_BACKENDS:
        raise ValueError(f"matmul backend must be one of {MATMUL_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    device = torch.device(device)
    if device.type == "cuda" and _triton_usable(device):
        return "triton"
    return "torch" if int_mm_available(device) else "reference"


def w8a8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, backend: str = "auto") -> torch.Tensor:
    """y = (xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias, float32 [M, N]: int8 x int8 ->
    int32 accumulation (exact), dequant and bias in the epilogue. xq [M, K], wq [N, K] int8."""
    which = choose_matmul(xq.device, backend)
    if which == "triton":
        from . import triton_linear
        return triton_linear.w8a8(xq, x_scale, wq, w_scale, bias)
    acc = _torch_int_mm(xq, wq) if which == "torch" else R.int_matmul_exact(xq, wq.t())
    y = acc.to(torch.float32) * x_scale[:, None] * w_scale.reshape(1, -1)
    return y + bias.to(torch.float32) if bias is not None else y
