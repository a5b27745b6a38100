"""QuZO ops on quantized weights, declared once: quantization, out-of-place probe weights, the in-place
update, and per-token activation quantization. Validated here, dispatched by the registry.

Streams (docs/perturbation.md section 4): z of query q from STREAM_Z; the probe rounding Q1 from
STREAM_QUZO_PROBE (query q); the paper-form rounding of the update direction Q2 from STREAM_QUZO_UPDATE
(query q); the final rounding of the update from STREAM_UPDATE_SR (query 0); weight quantization from
STREAM_QUANT_SR (query 0); activation SR from STREAM_ACT_SR (query q, shared by both probes of a query).
Element index j = n * K + k of the logical [N, K] weight; for activations j = m * K + k of the [M, K] input.

Layout: fmt in QUANT_FORMATS ("int8", "int4", "fp8"); storage q: int8 [N, K] | uint8 [N, Kp/2] (int4,
element 2i of a row in the low nibble of byte i, padding nibbles k >= K are 0) | float8_e4m3fn [N, K];
scale float32 [N, 1] (int8, fp8) or [N, Kp/group_size] (int4, Kp = K rounded up to group_size, group_size
positive and even). All tensors contiguous, on one device (the CUDA and Triton kernels index raw memory
from these shapes, so a mismatch is refused here); seed/key are uint64 ints, eps/lr/coeffs finite numbers
within float32 range (rounded to float32 once on the host).

Element math, step by step: zokernels/numerics.py and zokernels/backends/reference/quant.py (the executable
spec). Integer formats: d = (z * eps) / s (float32), D1 = SRI(d) = SR(clamp(d, +-2^30)) (int32); the probe
weights are clamp(q +- D1, +-qmax). FP8: the probe weights are SR_e4m3(q +- d), the same uniforms for + and -.
Every backend follows the reference's float32 operation order, so results are bitwise equal across backends
with Rademacher z; Gaussian z itself differs by float32 ulps between backends (log/sin/cos), which can move
a rounding (tests: <= 1% of the elements, by one grid step).

Backend kernels (registered under the op's name; call properties for `supports`):
    quant_quantize(w, scale, fmt, group_size, rounding, seed, key, out)                      {fmt, dtype, rounding}
        out (the storage, all of it written, int4 padding 0) = R(w / s) clamped to +-qmax; R nearest (int:
        half to even; fp8: RNE) or stochastic (uniforms of STREAM_QUANT_SR, query 0, j = n * K + k).
    quant_probe(q, scale, fmt, shape, group_size, seed, key, query, eps, sign, dist, out, saturated)
                                                                                             {fmt, out}
        out-of-place probe weights of (query, sign): out = int8 / float8_e4m3fn grid values [N, K]
        (call out "grid"), float32/bfloat16/float16 [N, K] dequantized (float32 value * s, RNE to out's
        dtype; "float"), or int4 packed like the storage, uint8 [N, Kp/2] ("packed-int4", what the W4A16
        matmul reads). saturated (int64 [1] on the device) += clamped elements (atomic add, no host sync):
        int clamp(q + sign D1) != q + sign D1; fp8 |q + sign d| > 448.
    quant_update_(q, scale, fmt, shape, group_size, seed, key, coeffs, lr, eps, form, dist, saturated)
                                                                                             {fmt, form}
        in place q <- Q(q - x), x of form "single" (lr * sum_q c_q z_q / s) or "paper"
        (lr * sum_q c_q Q2(eps z_q / s) / eps), queries 0 .. len(coeffs) - 1; int q - SRI(x) clamped to
        +-qmax; fp8 SR_e4m3(q - x) (STREAM_UPDATE_SR, query 0); saturated += clamped elements.
    quantize_activations(x, fmt, v) -> (xq, s)                                               {fmt}
        per token: s_m = amax_m / qmax (1 where 0), xq = R(x / s_m) (int8: clamped to +-127; fp8: e4m3,
        saturating); R nearest (v None) or SR with the uniforms v [M, K] (STREAM_ACT_SR of the probe).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import contract as C
from ..backends import registry
from . import _checks as K
from ._checks import FLOAT_DTYPES, OpError

UPDATE_FORMS = ("single", "paper")
QUANT_OPS = ("quant_quantize", "quant_probe", "quant_update_")
PROBE_OUTS = ("grid", "float", "packed-int4")   # the `out` call property of quant_probe
ACTIVATION_FORMATS = ("int8", "fp8")

for _op, _summary in (
        ("quant_quantize", "storage of R(w / s) on a quantized grid (int8 / int4 / fp8), nearest or SR"),
        ("quant_probe", "probe weights clamp(q +- SR(eps z / s)) (fp8: SR_e4m3(q +- d)), out of place"),
        ("quant_update_", "q <- Q(q - x), the QuZO update (single | paper form), in place"),
        ("quantize_activations", "per-token int8 / e4m3 activations, nearest or SR (STREAM_ACT_SR)")):
    registry.declare(_op, _summary)


# ----------------------------------------------------------------------------- checks
def check_format(fmt: str) -> str:
    if fmt not in C.QUANT_FORMATS:
        raise OpError(f"fmt must be one of {C.QUANT_FORMATS}, got {fmt!r}")
    return fmt


def grid_dtype(fmt: str) -> torch.dtype:
    """The dtype of probe weights as grid values: int8 (int8, int4) or float8_e4m3fn (fp8)."""
    return torch.float8_e4m3fn if fmt == "fp8" else torch.int8


def padded_k(k: int, fmt: str, group_size: int) -> int:
    """Kp: K rounded up to a multiple of group_size (int4), else K."""
    return -(-k // group_size) * group_size if fmt == "int4" else k


def storage_layout(fmt: str, shape, group_size: int) -> tuple[torch.dtype, tuple[int, int], tuple[int, int]]:
    """(storage dtype, storage shape, scale shape) of a logical [N, K] weight of format fmt."""
    check_format(fmt)
    n, k = (int(d) for d in shape)
    if fmt == "int4":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
            raise OpError(f"int4 needs a positive even group_size, got {group_size}")
        kp = padded_k(k, fmt, group_size)
        return torch.uint8, (n, kp // 2), (n, kp // group_size)
    return grid_dtype(fmt), (n, k), (n, 1)


def check_layout(fmt: str, q: torch.Tensor, scale: torch.Tensor, shape, group_size: int) -> tuple[int, int]:
    """Storage and scale of a logical [N, K] weight as the module docstring lays them out; returns (N, K)."""
    if len(tuple(shape)) != 2:
        raise OpError(f"the logical weight shape must be (N, K), got {tuple(shape)}")
    dtype, q_shape, s_shape = storage_layout(fmt, shape, group_size)
    if q.dtype != dtype or tuple(q.shape) != q_shape or tuple(scale.shape) != s_shape:
        raise OpError(f"{fmt} weight of shape {tuple(shape)}: expected storage {dtype} {q_shape} and scale "
                      f"{s_shape}, got {q.dtype} {tuple(q.shape)} and {tuple(scale.shape)}")
    if not (q.is_contiguous() and scale.is_contiguous()):
        raise OpError("quantized weight storage and scale must be contiguous")
    if scale.dtype != torch.float32 or scale.device != q.device:
        raise OpError(f"scale must be float32 on the storage's device ({q.device}), got {scale.dtype} on "
                      f"{scale.device}")
    return tuple(int(d) for d in shape)


def new_counter(device) -> torch.Tensor:
    """An int64 [1] saturation counter for the kernels to add to."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def check_counter(saturated: torch.Tensor | None, device) -> torch.Tensor:
    """`saturated` (int64 [1] on `device`), or a new counter if None."""
    if saturated is None:
        return new_counter(device)
    if (not isinstance(saturated, torch.Tensor) or saturated.dtype != torch.int64 or saturated.numel() != 1
            or saturated.device != torch.device(device) or not saturated.is_contiguous()):
        raise OpError(f"saturated must be an int64 tensor of one element on {device}, got "
                      f"{getattr(saturated, 'dtype', type(saturated).__name__)} "
                      f"{tuple(getattr(saturated, 'shape', ()))} on {getattr(saturated, 'device', '?')}")
    return saturated


def check_sign(sign: int) -> int:
    if isinstance(sign, bool) or sign not in (1, -1):
        raise OpError(f"sign must be +1 or -1, got {sign!r}")
    return int(sign)


def check_form(form: str) -> str:
    if form not in UPDATE_FORMS:
        raise OpError(f"update form must be one of {UPDATE_FORMS}, got {form!r}")
    return form


def probe_out(fmt: str, out_dtype: torch.dtype) -> str:
    """The `out` call property of quant_probe for out_dtype: 'grid', 'float' or 'packed-int4'."""
    if out_dtype == grid_dtype(fmt):
        return "grid"
    if out_dtype in FLOAT_DTYPES:
        return "float"
    if fmt == "int4" and out_dtype == torch.uint8:
        return "packed-int4"
    raise OpError(f"probe weights of {fmt} come as {grid_dtype(fmt)} grid values, float {FLOAT_DTYPES} or "
                  f"(int4) packed uint8, not {out_dtype}")


def _seed_key(seed: int, key: int) -> tuple[int, int]:
    return C.check_u64(seed, "seed"), C.check_u64(key, "key")


# ----------------------------------------------------------------------------- ops
@torch.no_grad()
def quant_quantize(w: torch.Tensor, scale: torch.Tensor, fmt: str, group_size: int, rounding: str, seed: int,
                   key: int, out: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """The storage of R(w / s) for the float weight w [N, K] (float32/bfloat16/float16) with scale s (layout:
    module docstring): out (given, or allocated) is written entirely, int4 padding nibbles 0. Returns out."""
    C.check_rounding(rounding)
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize takes a float32/bfloat16/float16 weight, got {getattr(w, 'dtype', type(w))}")
    if w.ndim != 2:
        raise OpError(f"quantize takes a 2-d weight, got shape {tuple(w.shape)}")
    if out is None:
        dtype, q_shape, _ = storage_layout(fmt, w.shape, group_size)
        out = torch.empty(q_shape, dtype=dtype, device=w.device)
    check_layout(fmt, out, scale, w.shape, group_size)
    if out.device != w.device:
        raise OpError(f"out is on {out.device}, the weight on {w.device}")
    K.check_disjoint([w, scale, out], "quant_quantize (w, scale, out)")
    seed, key = _seed_key(seed, key)
    K.run("quant_quantize", w.device, backend, {"fmt": fmt, "dtype": w.dtype, "rounding": rounding},
          w.detach().contiguous(), scale, fmt, group_size if fmt == "int4" else 0, rounding, seed, key, out)
    return out


@torch.no_grad()
def quant_probe(q: torch.Tensor, scale: torch.Tensor, fmt: str, shape, group_size: int, seed: int, key: int,
                query: int, eps: float, sign: int, dist: str = "gaussian", *, out_dtype: torch.dtype | None = None,
                out: torch.Tensor | None = None, saturated: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """The weights of probe (query, sign), out of place: grid values (out_dtype None: int8 for the int
    formats, float8_e4m3fn for fp8), dequantized values * s (float32/bfloat16/float16), [N, K], or for int4
    with out_dtype uint8 packed like q, [N, Kp / 2]. `out`, if given, decides out_dtype. Clamped elements
    are added to `saturated` (int64 [1] on the device) if given. q is not modified."""
    n, k = check_layout(fmt, q, scale, shape, group_size)
    C.check_dist(dist)
    sign = check_sign(sign)
    seed, key = _seed_key(seed, key)
    C.check_query(query)
    eps = K.f32(eps, "eps")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise OpError(f"out must be a tensor, got {type(out).__name__}")
        out_dtype = out.dtype
    out_dtype = grid_dtype(fmt) if out_dtype is None else out_dtype
    kind = probe_out(fmt, out_dtype)
    out_shape = tuple(q.shape) if kind == "packed-int4" else (n, k)
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=q.device)
    elif tuple(out.shape) != out_shape or out.device != q.device or not out.is_contiguous():
        raise OpError(f"out must be a contiguous {out_dtype} tensor {out_shape} on {q.device}, got "
                      f"{tuple(out.shape)} on {out.device}")
    saturated = check_counter(saturated, q.device)
    K.check_disjoint([q, scale, out, saturated], "quant_probe (q, scale, out, saturated)")
    K.run("quant_probe", q.device, backend, {"fmt": fmt, "out": kind}, q, scale, fmt, (n, k),
          group_size if fmt == "int4" else 0, seed, key, query, eps, sign, dist, out, saturated)
    return out


@torch.no_grad()
def quant_update_(q: torch.Tensor, scale: torch.Tensor, fmt: str, shape, group_size: int, seed: int, key: int,
                  coeffs: Sequence[float], lr: float, eps: float, form: str = "single", dist: str = "gaussian", *,
                  saturated: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """In place, one pass: q <- Q(q - x), x of `form` with c_q = coeffs[q] (module docstring); nothing is
    materialized. Clamped elements are added to `saturated` (int64 [1], returned; no host sync). Mutates q."""
    n, k = check_layout(fmt, q, scale, shape, group_size)
    C.check_dist(dist)
    check_form(form)
    seed, key = _seed_key(seed, key)
    if isinstance(coeffs, (int, float)) or getattr(coeffs, "ndim", None) == 0:
        raise OpError(f"coeffs must be a sequence of numbers, one per query (e.g. [g]), got {coeffs!r}")
    coeffs = [K.f32(c, "coeffs") for c in coeffs]
    if len(coeffs) > C.MAX_QUERIES:
        raise OpError(f"at most {C.MAX_QUERIES} coefficients (queries), got {len(coeffs)}")
    lr, eps = K.f32(lr, "lr"), K.f32(eps, "eps")
    saturated = check_counter(saturated, q.device)
    K.check_disjoint([q, scale, saturated], "quant_update_ (q, scale, saturated)")
    K.run("quant_update_", q.device, backend, {"fmt": fmt, "form": form}, q, scale, fmt, (n, k),
          group_size if fmt == "int4" else 0, seed, key, coeffs, lr, eps, form, dist, saturated)
    return saturated


@torch.no_grad()
def quantize_activations(x: torch.Tensor, fmt: str = "int8", v: torch.Tensor | None = None, *,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric activations of x [M, K]: (xq, s) with s_m = amax_m / qmax (1 where 0) float32 [M]
    and xq = R(x / s_m): int8 [M, K] (fmt "int8", clamped to +-127) or float8_e4m3fn [M, K] (fmt "fp8").
    R: nearest (v None) or SR with the uniforms v (float32 [M, K]; STREAM_ACT_SR of the probe, see
    zokernels.quant.matmul.activation_uniforms)."""
    if fmt not in ACTIVATION_FORMATS:
        raise OpError(f"activations quantize to one of {ACTIVATION_FORMATS}, not {fmt!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 2:
        raise OpError(f"quantize_activations takes floating activations [M, K], got "
                      f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if v is not None and (not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.shape != x.shape
                          or v.device != x.device):
        raise OpError(f"v must be float32 uniforms shaped like x {tuple(x.shape)} on {x.device}, got "
                      f"{getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
    return K.run("quantize_activations", x.device, backend, {"fmt": fmt}, x, fmt, v)
