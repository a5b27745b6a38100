"""Reference backend: QuZO element math on quantized weights, in plain torch (any device), chunked by
rows so that extra memory stays O(CHUNK). The executable spec that the Triton and CUDA quant kernels
reproduce bitwise; the ops and their contract: zokernels/ops/quant.py (module docstring), the element
functions: zokernels/numerics.py.

Per element (n, k) of the logical [N, K] weight, j = n * K + k, s = the element's scale (float32), q its
grid value; every operation is float32 (IEEE, one rounding per op) unless it says int:

    z_q   = contract z  (seed, STREAM_Z, query q, key, j)                 (gaussian | rademacher)
    v(S, q) = contract SR uniform (seed, stream S, query q, key, j)       in [0, 1)
    SRI(x, v) = floor(x) + [v < x - floor(x)]                             (x clamped to +-2^30 first)
    SR8(x, v) = e4m3 SR of numerics.sr_to_e4m3 (saturates at 448, sign of x kept)

    quantize : x = w / s; int: q = SRI(clamp(x, +-qmax), v(QUANT_SR, 0)) or RNE(clamp(x, +-qmax));
               fp8: q = SR8(x, v(QUANT_SR, 0)) or RNE_e4m3(clamp(x, +-448))
    probe    : d = (z_query * eps) / s
               int: raw = q + sign * SRI(d, v(QUZO_PROBE, query)); p = clamp(raw, +-qmax); sat += [p != raw]
               fp8: x = q + d * sign;        p = SR8(x, v(QUZO_PROBE, query));     sat += [|x| > 448]
    update   : single: acc = sum_q z_q * c_q;               x = (acc * lr) / s
               paper : acc = sum_q D2_q * c_q,  x = (acc * lr) / eps,
                       D2_q = SRI(d_q, v(QUZO_UPDATE, q)) (int) | SR8(d_q, v(QUZO_UPDATE, q)) (fp8),
                       d_q = (z_q * eps) / s
               (acc starts from the q = 0 term, not from 0 + term; no coeffs: x = 0)
               int: raw = q - SRI(x, v(UPDATE_SR, 0)); q' = clamp(raw, +-qmax); sat += [q' != raw]
               fp8: y = q - x;                 q' = SR8(y, v(UPDATE_SR, 0));       sat += [|y| > 448]

eps, lr and the coeffs are rounded to float32 once on the host. Scalars enter the torch ops as 0-dim
tensors on the weight's device: on CUDA, `tensor / python_scalar` multiplies by the reciprocal.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ... import contract as C
from ... import numerics as N
from ..registry import register
from .philox import uniform_range, z_range  # the package's `philox` is the op

NAME = "reference"
CHUNK = 1 << 20           # elements per chunk of rows


def _scalar(x: float, device: torch.device) -> torch.Tensor:
    """x rounded to float32, as a 0-dim float32 tensor on `device`."""
    return torch.tensor(C.round_f32(float(x)), dtype=torch.float32, device=device)


def _row_chunks(n: int, k: int):
    rows = max(1, CHUNK // max(k, 1))
    for start in range(0, n, rows):
        yield start, min(rows, n - start)


def _scale_rows(scale: torch.Tensor, fmt: str, group_size: int, n0: int, rows: int, k: int) -> torch.Tensor:
    """float32 [rows, K]: the scale of every element of rows n0 .. n0 + rows - 1."""
    s = scale[n0:n0 + rows]
    if fmt == "int4":
        return N.group_scales(s, group_size, k)
    return s[:, :1].to(torch.float32).expand(rows, k)


def _values_rows(q: torch.Tensor, fmt: str, n0: int, rows: int, k: int) -> torch.Tensor:
    """Grid values of rows n0.. : int32 (int8, int4 from packed nibbles) or float32 (fp8)."""
    if fmt == "int4":
        return N.unpack_int4(q[n0:n0 + rows])[:, :k].to(torch.int32)
    if fmt == "int8":
        return q[n0:n0 + rows].to(torch.int32)
    return q[n0:n0 + rows].to(torch.float32)


def _store_rows(q: torch.Tensor, fmt: str, n0: int, rows: int, vals: torch.Tensor) -> None:
    """Write grid values (in range) into storage rows n0..; int4 padding nibbles are written as 0."""
    if fmt == "int4":
        q[n0:n0 + rows].copy_(N.pack_int4_padded(vals, q.shape[1] * 2))
    elif fmt == "int8":
        q[n0:n0 + rows].copy_(vals.to(torch.int8))
    else:
        q[n0:n0 + rows].copy_(vals.to(torch.float8_e4m3fn))


def _z(seed: int, key: int, query: int, dist: str, n0: int, rows: int, k: int, device) -> torch.Tensor:
    return z_range(n0 * k, rows * k, seed, key, query, C.STREAM_Z, dist, device).view(rows, k)


def _v(seed: int, key: int, query: int, stream: int, n0: int, rows: int, k: int, device) -> torch.Tensor:
    return uniform_range(n0 * k, rows * k, seed, key, query, stream, device).view(rows, k)


# ----------------------------------------------------------------------------- kernels
@register("quant_quantize", NAME)
def quant_quantize(w: torch.Tensor, scale: torch.Tensor, fmt: str, group_size: int, rounding: str, seed: int,
                   key: int, out: torch.Tensor) -> None:
    """out <- the storage of R(w / s) on fmt's grid (R: nearest or SR with STREAM_QUANT_SR, query 0)."""
    n, k = w.shape
    for n0, rows in _row_chunks(n, k):
        x = w[n0:n0 + rows].to(torch.float32) / _scale_rows(scale, fmt, group_size, n0, rows, k)
        v = _v(seed, key, 0, C.STREAM_QUANT_SR, n0, rows, k, w.device) if rounding == "stochastic" else None
        _store_rows(out, fmt, n0, rows, N.quantize_values(fmt, x, v))


def _write_probe(out: torch.Tensor, n0: int, rows: int, vals: torch.Tensor, s: torch.Tensor) -> None:
    dst = out[n0:n0 + rows]
    if out.dtype == torch.uint8:                # int4, packed like the storage
        _store_rows(out, "int4", n0, rows, vals)
    elif out.dtype == torch.int8 or out.dtype == torch.float8_e4m3fn:
        dst.copy_(vals.to(out.dtype))          # grid values
    else:
        dst.copy_((vals.to(torch.float32) * s).to(out.dtype))   # dequantized, RNE to out's dtype


@register("quant_probe", NAME)
def quant_probe(q: torch.Tensor, scale: torch.Tensor, fmt: str, shape: tuple[int, int], group_size: int,
                seed: int, key: int, query: int, eps: float, sign: int, dist: str, out: torch.Tensor,
                saturated: torch.Tensor) -> None:
    """out <- probe weights of (query, sign), out of place (grid values, dequantized, or int4 packed into
    uint8 [N, Kp/2]); saturated += number of clamped elements."""
    n, k = shape
    eps_t = _scalar(eps, q.device)
    for n0, rows in _row_chunks(n, k):
        s = _scale_rows(scale, fmt, group_size, n0, rows, k)
        d = N.direction(_z(seed, key, query, dist, n0, rows, k, q.device), eps_t, s)
        v = _v(seed, key, query, C.STREAM_QUZO_PROBE, n0, rows, k, q.device)
        vals = _values_rows(q, fmt, n0, rows, k)
        if fmt == "fp8":
            p, hit = N.probe_fp8(vals, d, v, sign)
        else:
            p, hit = N.probe_int(vals, N.sr_int(d, v), sign, C.QMAX[fmt])
        saturated += hit.sum()
        _write_probe(out, n0, rows, p, s)


@register("quant_update_", NAME)
def quant_update_(q: torch.Tensor, scale: torch.Tensor, fmt: str, shape: tuple[int, int], group_size: int,
                  seed: int, key: int, coeffs: Sequence[float], lr: float, eps: float, form: str, dist: str,
                  saturated: torch.Tensor) -> None:
    """q <- Q(q - x) in place, x the update target of `form`; saturated += number of clamped elements."""
    n, k = shape
    dev = q.device
    eps_t, lr_t = _scalar(eps, dev), _scalar(lr, dev)
    cs = [_scalar(c, dev) for c in coeffs]
    for n0, rows in _row_chunks(n, k):
        s = _scale_rows(scale, fmt, group_size, n0, rows, k)
        acc = None
        for qi, c in enumerate(cs):
            z = _z(seed, key, qi, dist, n0, rows, k, dev)
            if form == "single":
                term = z * c
            else:
                term = N.paper_term(fmt, N.direction(z, eps_t, s),
                                    _v(seed, key, qi, C.STREAM_QUZO_UPDATE, n0, rows, k, dev), c)
            acc = term if acc is None else acc + term
        x = N.update_target(form, acc, lr_t, eps_t, s)
        v = _v(seed, key, 0, C.STREAM_UPDATE_SR, n0, rows, k, dev)
        new, hit = N.update_values(fmt, _values_rows(q, fmt, n0, rows, k), x, v)
        saturated += hit.sum()
        _store_rows(q, fmt, n0, rows, new)


@register("quantize_activations", NAME)
def quantize_activations(x: torch.Tensor, fmt: str, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 / e4m3 activations (numerics.quantize_activations)."""
    return N.quantize_activations(x, fmt, v)
