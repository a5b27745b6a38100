"""QuZO ops on quantized weights: integer-domain probe directions, reversible in-place perturbation,
the unbiased update in its two forms, and the quantized matmuls with their backend choice.

Streams (docs/perturbation.md section 4): z of query q from STREAM_Z; the probe rounding
Q1 from STREAM_QUZO_PROBE (query q); the paper-form rounding of the update direction Q2 from
STREAM_QUZO_UPDATE (query q); the final rounding of the update from STREAM_UPDATE_SR (query 0);
activation SR from STREAM_ACT_SR (query q, shared by both probes of a query). Element index
j = n * K + k of the logical [N, K] weight; for activations j = m * K + k of the [M, K] input.

Integer formats: d = eps * z / s (float32, s the element's scale), D1 = SR(d) (int32); the probe
weights are clamp(q +- D1). FP8: the probe weights are SR_e4m3(q +- d), the same uniforms for + and -.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import contract as C
from .. import ops
from . import formats as F
from . import reference as R

UPDATE_FORMS = ("single", "paper")
MATMUL_BACKENDS = ("auto", "reference", "torch", "triton")


def _f32(x: float) -> float:
    return float(torch.tensor(float(x), dtype=torch.float32))


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
    """d = eps * z_query / s, float32 [N, K]: the perturbation in grid units."""
    return (_z(qw, seed, key, query, dist, cache) * _f32(eps)) / F.scale_full(qw)


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
    out = R.sr_to_int(torch.clamp(d, -2.0 ** 30, 2.0 ** 30), v)
    if cache is not None:
        cache[k] = out
    return out


@dataclass
class ProbeResult:
    values: torch.Tensor    # grid values of the probe weights (int32, or float32 e4m3 values)
    saturated: int          # elements clamped at +-qmax


def probe_values(qw: F.QuantizedWeight, seed: int, key: int, query: int, eps: float, sign: int,
                 dist: str = "gaussian", sr_seed: int | None = None, cache: dict | None = None) -> ProbeResult:
    """The weights of probe (query, sign), as grid values, computed out of place (drift-free):
    int: clamp(q + sign * D1, -qmax, qmax); fp8: SR_e4m3(q + sign * d) (uniforms of STREAM_QUZO_PROBE)."""
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
    fixed z (variance tests)."""
    if form not in UPDATE_FORMS:
        raise ValueError(f"update form must be one of {UPDATE_FORMS}, got {form!r}")
    acc = None
    for q, c in enumerate(coeffs):
        if form == "single":
            term = _z(qw, seed, key, q, dist, cache) * _f32(c)
        else:
            d = scaled_direction(qw, seed, key, q, eps, dist, cache)
            v = _v(qw, seed if rounding_seed is None else rounding_seed, key, q, C.STREAM_QUZO_UPDATE)
            d2 = F.to_grid(qw, d, v).to(torch.float32) if qw.fmt == "fp8" else R.sr_to_int(d, v).to(torch.float32)
            term = d2 * _f32(c)
        acc = term if acc is None else acc + term
    if acc is None:
        return torch.zeros(qw.shape, dtype=torch.float32, device=qw.scale.device)
    if form == "single":
        return (acc * _f32(lr)) / F.scale_full(qw)
    return (acc * _f32(lr)) / _f32(eps)


def update_values(qw: F.QuantizedWeight, x: torch.Tensor, seed: int, key: int,
                  rounding_seed: int | None = None) -> ProbeResult:
    """The new grid values q' = Q(q - x), Q = SR with the uniforms of STREAM_UPDATE_SR (query 0):
    int: q - SR(x) clamped (the rounded step is what a replay recomputes); fp8: SR_e4m3(q - x)."""
    v = _v(qw, seed if rounding_seed is None else rounding_seed, key, 0, C.STREAM_UPDATE_SR)
    q = F.values(qw)
    if qw.fmt == "fp8":
        y = q - x
        return ProbeResult(R.sr_to_e4m3(y, v).to(torch.float32), int((y.abs() > qw.qmax).sum()))
    raw = q - R.sr_to_int(torch.clamp(x, -2.0 ** 30, 2.0 ** 30), v)
    clamped = torch.clamp(raw, -int(qw.qmax), int(qw.qmax))
    return ProbeResult(clamped, int((clamped != raw).sum()))


def apply_update_(qw: F.QuantizedWeight, seed: int, key: int, coeffs: Sequence[float], lr: float, eps: float,
                  form: str = "single", dist: str = "gaussian", cache: dict | None = None) -> int:
    """q <- Q(q - update_target(...)) in place; returns the number of saturated elements."""
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


def _torch_int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """torch._int_mm(a [M, K], b [K, N]); on CUDA it needs M > 16 and K, N multiples of 8: zero-pad."""
    m, k = a.shape
    n = b_t.shape[1]
    if a.is_cuda:
        mp, kp, np_ = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
        if (mp, kp, np_) != (m, k, n):
            a = torch.nn.functional.pad(a, (0, kp - k, 0, mp - m))
            b_t = torch.nn.functional.pad(b_t, (0, np_ - n, 0, kp - k))
        return torch._int_mm(a, b_t.contiguous())[:m, :n]
    return torch._int_mm(a, b_t)


def int_mm_available(device: torch.device) -> bool:
    key = torch.device(device).type
    if key not in _int_mm_ok:
        try:
            a = torch.ones(17, 8, dtype=torch.int8, device=device)
            _int_mm_ok[key] = bool((_torch_int_mm(a, a.t().contiguous()) == 8).all())
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
    acc = _torch_int_mm(xq, wq.t()) if which == "torch" else R.int_matmul_exact(xq, wq.t())
    y = acc.to(torch.float32) * x_scale[:, None] * w_scale.reshape(1, -1)
    return y + bias.to(torch.float32) if bias is not None else y
