"""Element math of the quantized formats, in plain torch (any device): the executable spec of the QuZO ops.

Contract layer (imports torch and zokernels.contract only): the reference backend builds its quantized ops
from these functions, zokernels.quant's formats and its CPU step cache (zokernels/quant/ops.py) reuse them,
and the torch backend's W4A16 path unpacks int4 with them. Backends may not import each other or anything
above the contract, and zokernels.quant sits above the backends, so the one definition of this math lives
here, beside zokernels.contract.

Integer formats are exact integer arithmetic (int32/int64 temporaries); FP8 e4m3 rounding is exact float32
arithmetic on the e4m3 grid. Uniforms v in [0, 1) come from the contract's Philox mapping (stream and
element index per op: docs/perturbation.md section 4), so every rounding here is reproducible. Every
float32 operation is one IEEE op in the order written (the Triton and CUDA kernels follow the same order,
which makes them bitwise equal to these functions with Rademacher z).
"""
from __future__ import annotations

import torch

from . import contract as C

E4M3_NAN_BITS = 0x7F  # e4m3fn has no inf: 0x7F / 0xFF are NaN, 0x7E = 448 is the largest finite


# ----------------------------------------------------------------------------- rounding
def sr_to_int(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding of float32 x to the integers: floor(x) + [v < x - floor(x)] (int32).

    x - floor(x) is exact in float32, v is a multiple of 2^-24, so P(up) = frac(x) to 2^-24 and
    E[SR(x)] = x. |x| must stay below 2^31 (callers clamp first: sr_int)."""
    lo = torch.floor(x)
    return (lo + (v < (x - lo)).to(torch.float32)).to(torch.int32)


def sr_int(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SRI: sr_to_int of x clamped to +-SR_CLAMP (2^30) first (int32)."""
    return sr_to_int(torch.clamp(x, -C.SR_CLAMP, C.SR_CLAMP), v)


def rn_to_int(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (torch.round) to int32."""
    return torch.round(x).to(torch.int32)


def _e4m3_bits_down(a: torch.Tensor) -> torch.Tensor:
    """Bits (int16, 0..0x7E) of the largest e4m3 value <= a, for 0 <= a (float32, finite)."""
    a = torch.clamp(a, max=C.E4M3_MAX)
    r = a.to(torch.float8_e4m3fn)
    bits = r.view(torch.uint8).to(torch.int16)
    return torch.where(r.to(torch.float32) > a, bits - 1, bits)


def _e4m3_value(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def sr_to_e4m3(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SR of float32 x to float8_e4m3fn: lo = largest e4m3 <= |x|, hi = next; hi iff
    v (hi - lo) < |x| - lo (the contract's 16-bit rule on the e4m3 grid). |x| >= 448 saturates."""
    a = x.abs()
    lo_bits = _e4m3_bits_down(a)
    lo = _e4m3_value(lo_bits)
    hi_bits = torch.clamp(lo_bits + 1, max=E4M3_NAN_BITS - 1)
    hi = _e4m3_value(hi_bits)
    up = (v * (hi - lo) < a - lo) & (hi_bits > lo_bits)
    mag = torch.where(up, hi, lo)
    return torch.copysign(mag, x).to(torch.float8_e4m3fn)


def rn_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even on the e4m3 grid, saturating at +-448."""
    return torch.clamp(x, -C.E4M3_MAX, C.E4M3_MAX).to(torch.float8_e4m3fn)


# ----------------------------------------------------------------------------- int4 storage
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], last dim even -> uint8 [..., K/2]: element 2i in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError("pack_int4 needs an even last dimension")
    n = (q.to(torch.int32) & 0xF)
    return (n[..., 0::2] | (n[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 [..., K] in [-8, 7] (sign-extended nibbles)."""
    b = p.to(torch.int32)
    lo = b & 0xF
    hi = (b >> 4) & 0xF
    out = torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return torch.where(out >= 8, out - 16, out).to(torch.int8)


def pack_int4_padded(vals: torch.Tensor, padded_k: int) -> torch.Tensor:
    """Grid values int [N, K] (in -8..7) -> uint8 [N, padded_k / 2], the padding columns K.. written as 0."""
    return pack_int4(torch.nn.functional.pad(vals.to(torch.int32), (0, padded_k - vals.shape[-1])))


def group_scales(scale: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """float32 [N, K] scale of every element from int4 group scales [N, Kp / group_size]."""
    return scale.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :k]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """w = q * s in float32 [N, K] of packed int4 storage uint8 [N, Kp / 2] and its group scales."""
    return unpack_int4(packed)[:, :k].to(torch.float32) * group_scales(scale, group_size, k)


# ----------------------------------------------------------------------------- QuZO element math
# Per element of the logical [N, K] weight: s its scale, q (vals) its grid value, z / v the contract's
# z and uniforms of the stream each op names (zokernels/ops/quant.py). Scalars (eps, lr, c) are float32
# 0-dim tensors on the weight's device (on CUDA, `tensor / python_scalar` multiplies by the reciprocal).
def quantize_values(fmt: str, x: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """R(x), x = w / s, on fmt's grid: int formats int32 of RN / SRI(clamp(x, +-qmax)); fp8 float8_e4m3fn of
    RNE_e4m3(clamp(x, +-448)) / SR_e4m3(x) (saturating). v None: round to nearest, else SR with v."""
    if fmt == "fp8":
        return sr_to_e4m3(x, v) if v is not None else rn_to_e4m3(x)
    qmax = C.QMAX[fmt]
    x = torch.clamp(x, -qmax, qmax)
    return sr_to_int(x, v) if v is not None else rn_to_int(x)


def direction(z: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """d = (z * eps) / s: the perturbation in grid units (float32)."""
    return (z * eps) / s


def probe_int(vals: torch.Tensor, d1: torch.Tensor, sign: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer probe weights: raw = q + sign * D1 (D1 = SRI(d, v) int32), p = clamp(raw, +-qmax);
    returns (p int32, clamped mask)."""
    raw = vals + d1 * int(sign)
    p = torch.clamp(raw, -int(qmax), int(qmax))
    return p, p != raw


def probe_fp8(vals: torch.Tensor, d: torch.Tensor, v: torch.Tensor, sign: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 probe weights: x = q + d * sign, p = SR_e4m3(x, v); returns (p float8_e4m3fn, mask |x| > 448)."""
    x = vals + d * float(sign)
    return sr_to_e4m3(x, v), x.abs() > C.E4M3_MAX


def paper_term(fmt: str, d: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One query's term of the paper-form update: D2 * c, D2 = Q2(d) = SR_e4m3(d, v) (fp8) or SRI(d, v)."""
    d2 = sr_to_e4m3(d, v) if fmt == "fp8" else sr_int(d, v)
    return d2.to(torch.float32) * c


def update_target(form: str, acc: torch.Tensor | None, lr: torch.Tensor, eps: torch.Tensor,
                  s: torch.Tensor) -> torch.Tensor:
    """x = the update in grid units before its final rounding: single (acc * lr) / s, paper (acc * lr) / eps;
    acc = sum_q term_q starting from the q = 0 term (None: no queries, x = 0)."""
    if acc is None:
        return torch.zeros(s.shape, dtype=torch.float32, device=s.device)
    return (acc * lr) / (s if form == "single" else eps)


def update_values(fmt: str, vals: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q' = Q(q - x) with the uniforms v of STREAM_UPDATE_SR: int q - SRI(x, v) clamped to +-qmax (int32);
    fp8 SR_e4m3(q - x, v) (float8_e4m3fn). Returns (q', clamped mask: int q' != raw, fp8 |q - x| > 448)."""
    if fmt == "fp8":
        y = vals - x
        return sr_to_e4m3(y, v), y.abs() > C.E4M3_MAX
    raw = vals - sr_int(x, v)
    new = torch.clamp(raw, -int(C.QMAX[fmt]), int(C.QMAX[fmt]))
    return new, new != raw


def quantize_activations(x: torch.Tensor, fmt: str, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric: s_m = amax_m / qmax (1 where 0; qmax 127 for int8, 448 for fp8), xq = R(x / s_m);
    int8: RN or SR (v) of x / s_m clamped to +-127, int8; fp8: RNE_e4m3 or SR_e4m3 (v), float8_e4m3fn.
    Returns (xq [M, K], float32 s [M])."""
    x = x.to(torch.float32)
    s = x.abs().amax(dim=1) / C.QMAX[fmt]
    s = torch.where(s > 0, s, torch.ones_like(s))
    y = x / s[:, None]
    if fmt == "fp8":
        return (sr_to_e4m3(y, v) if v is not None else rn_to_e4m3(y)), s
    y = torch.clamp(y, -C.QMAX["int8"], C.QMAX["int8"])
    return (sr_to_int(y, v) if v is not None else rn_to_int(y)).to(torch.int8), s


def matmul_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """y = acc * s_m * s_n + b in float32, the Triton scaled-dot kernel's operation order."""
    y = acc.to(torch.float32) * x_scale.to(torch.float32)[:, None] * w_scale.to(torch.float32).reshape(1, -1)
    return y + bias.to(torch.float32) if bias is not None else y
