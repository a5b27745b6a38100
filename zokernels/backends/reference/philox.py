"""Contract element math in plain torch int64/float32 ops (CPU or GPU), one chunk at a time.

uint32 values live in int64 tensors; 32x32-bit products are split into 16-bit halves so that no
int64 product overflows (torch's int64 multiply would wrap, but we do not rely on it).
"""
from __future__ import annotations

import torch

from ... import contract as C

_M32 = C.MASK32


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for a < 2^32 (int64 tensor) and a constant m < 2^32."""
    p_lo = (a & 0xFFFF) * m           # < 2^48
    p_hi = (a >> 16) * m              # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & _M32


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
               k0: int, k1: int, rounds: int = C.PHILOX_ROUNDS):
    """Philox4x32-R on int64 tensors holding uint32 values; key (k0, k1) is a pair of Python ints."""
    for r in range(rounds):
        if r:
            k0 = (k0 + C.PHILOX_W0) & _M32
            k1 = (k1 + C.PHILOX_W1) & _M32
        hi0, lo0 = _mulhilo(c0, C.PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, C.PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def block_words(first_block: int, n_blocks: int, seed: int, key: int, query: int, stream: int,
                device: torch.device):
    """Philox outputs (R0..R3), each an int64 tensor of n_blocks, for blocks first_block + i."""
    b = torch.arange(first_block, first_block + n_blocks, dtype=torch.int64, device=device)
    c0 = b & _M32
    c1 = ((b >> 32) & 0xFFFF) | ((query << 16) | (stream << 28))
    c2 = torch.full_like(b, key & _M32)
    c3 = torch.full_like(b, (key >> 32) & _M32)
    k0, k1 = C.philox_key(seed)
    return philox4x32(c0, c1, c2, c3, k0, k1)


def open_unit(r: torch.Tensor) -> torch.Tensor:
    """u = ((r >> 9) * 2 + 1) * 2^-24, exactly, in float32: (0, 1)."""
    return ((r >> 9) * 2 + 1).to(torch.float32) * C.TWO_POW_M24


def half_open_unit(r: torch.Tensor) -> torch.Tensor:
    """v = (r >> 8) * 2^-24, exactly, in float32: [0, 1)."""
    return (r >> 8).to(torch.float32) * C.TWO_POW_M24


def box_muller(ra: torch.Tensor, rb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z0 = sqrt(-2 ln u(ra)) cos(2pi u(rb)), z1 = ... sin(...), in float32."""
    radius = torch.sqrt(torch.log(open_unit(ra)) * -2.0)
    theta = open_unit(rb) * C.TWO_PI_F32
    return radius * torch.cos(theta), radius * torch.sin(theta)


def lanes_to_elements(words: tuple[torch.Tensor, ...], skip: int, n: int) -> torch.Tensor:
    """Interleave per-lane tensors [nb] x 4 into elements [4 nb]; drop `skip` leading lanes, keep n."""
    return torch.stack(words, dim=1).reshape(-1)[skip:skip + n]


def z_range(offset: int, n: int, seed: int, key: int, query: int, stream: int, dist: str,
            device: torch.device) -> torch.Tensor:
    """float32 z for global elements [offset, offset + n)."""
    first = offset >> 2
    nb = ((offset + n - 1) >> 2) - first + 1
    r0, r1, r2, r3 = block_words(first, nb, seed, key, query, stream, device)
    if dist == "gaussian":
        z0, z1 = box_muller(r0, r1)
        z2, z3 = box_muller(r2, r3)
        lanes = (z0, z1, z2, z3)
    else:
        lanes = tuple((1 - 2 * (r >> 31)).to(torch.float32) for r in (r0, r1, r2, r3))
    return lanes_to_elements(lanes, offset & 3, n)


def uniform_range(offset: int, n: int, seed: int, key: int, query: int, stream: int,
                  device: torch.device) -> torch.Tensor:
    """float32 SR uniforms v in [0, 1) for global elements [offset, offset + n)."""
    first = offset >> 2
    nb = ((offset + n - 1) >> 2) - first + 1
    words = block_words(first, nb, seed, key, query, stream, device)
    return lanes_to_elements(tuple(half_open_unit(r) for r in words), offset & 3, n)


def stochastic_round(x: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 x to `dtype` up in magnitude with probability (|x| - lo) / (hi - lo).

    lo: the largest-magnitude `dtype` value <= |x|; hi: the next one. The rule picks hi iff
    v * (hi - lo) < |x| - lo, both sides exact in float32. hi = inf never wins (saturation).
    """
    if dtype == torch.float32:
        return x
    a = x.abs()
    if dtype == torch.bfloat16:
        lo_bits = a.view(torch.int32) & -65536
        lo = lo_bits.view(torch.float32)
        hi = (lo_bits + 0x10000).view(torch.float32)
    elif dtype == torch.float16:
        r16 = a.to(torch.float16)
        rb = r16.view(torch.int16)
        lo16 = torch.where(r16.to(torch.float32) > a, rb - 1, rb)
        lo = lo16.view(torch.float16).to(torch.float32)
        hi = (lo16 + 1).view(torch.float16).to(torch.float32)
    else:
        raise TypeError(f"stochastic rounding to {dtype} is not part of the contract")
    mag = torch.where(v * (hi - lo) < a - lo, hi, lo)
    out = torch.where(torch.isnan(x), x, torch.copysign(mag, x))
    return out.to(dtype)


def round_to(x: torch.Tensor, dtype: torch.dtype, rounding: str, v_fn) -> torch.Tensor:
    """Round float32 x to dtype: nearest (a cast) or stochastic with uniforms from v_fn()."""
    if dtype == torch.float32:
        return x
    if rounding == "nearest":
        return x.to(dtype)
    return stochastic_round(x, v_fn(), dtype)


def zo_updated(theta: torch.Tensor, z_of_query, coeffs, lr: float, wd: float, restore_scale: float | None,
               restore_query: int) -> torch.Tensor:
    """theta' - lr * (sum_q coeffs[q] * z_q + wd * theta') in float32, theta' = theta + restore_scale * z_rq
    (theta' = theta when restore_scale is None); z_of_query(q) gives z_q for theta's elements."""
    if restore_scale is not None:
        theta = theta + z_of_query(restore_query) * restore_scale
    acc = torch.zeros_like(theta)
    for q, c in enumerate(coeffs):
        acc = z_of_query(q) * c if q == 0 else acc + z_of_query(q) * c
    return theta - (acc + theta * wd) * lr
