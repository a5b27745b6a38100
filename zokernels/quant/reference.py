"""Quantized element math in plain torch (any device): the executable spec of zokernels.quant.

Integer formats are exact integer arithmetic (int32/int64 temporaries); FP8 e4m3 rounding is exact
float32 arithmetic on the e4m3 grid. Uniforms v in [0, 1) come from the contract's Philox mapping
(zokernels.ops.uniform), so every rounding here is reproducible and replayable from (seed, stream,
query, key, element index).
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0
E4M3_NAN_BITS = 0x7F  # e4m3fn has no inf: 0x7F / 0xFF are NaN, 0x7E = 448 is the largest finite


def sr_to_int(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding of float32 x to the integers: floor(x) + [v < x - floor(x)] (int32).

    x - floor(x) is exact in float32, v is a multiple of 2^-24, so P(up) = frac(x) to 2^-24 and
    E[SR(x)] = x. |x| must stay below 2^31 (callers clamp first)."""
    lo = torch.floor(x)
    return (lo + (v < (x - lo)).to(torch.float32)).to(torch.int32)


def rn_to_int(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (torch.round) to int32."""
    return torch.round(x).to(torch.int32)


def _e4m3_bits_down(a: torch.Tensor) -> torch.Tensor:
    """Bits (int16, 0..0x7E) of the largest e4m3 value <= a, for 0 <= a (float32, finite)."""
    a = torch.clamp(a, max=E4M3_MAX)
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
    return torch.clamp(x, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


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


def int_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 a [M, K] x int8 b [K, N] -> int32, exact (int64 accumulation; |sum| < 2^31 for K < 2^17)."""
    if a.is_cuda:  # no int64 GEMM on CUDA: float64 is exact for |sum| < 2^53
        return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)
    return (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)
