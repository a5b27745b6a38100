"""Triton kernels of the QuZO quantized-weight ops (zokernels/ops/quant.py docstring; element math of
zokernels/backends/reference/quant.py, reproduced bitwise). Imported only by quant.py, after it
checked that triton and the dense kernels load.

Addressing (all index math int64, tails masked):
  tile  (int8, fp8, and int4 reads): program p covers Philox blocks p * BLOCKS .. + BLOCKS - 1 as a
        [BLOCKS, 4] tile of logical elements j = 4 b + lane (one Philox call serves 4 elements, as in
        kernels.py); n = j // K, k = j - n K. int4 reads fetch the byte n * KB + k // 2 and its nibble.
  quads (int4 writes when K % 4 == 0, the LLM case): the tile as above; Philox block b is the columns
        4m .. 4m + 3 of one row, i.e. storage bytes 2m and 2m + 1, assembled from the lanes and written by
        this program only.
  pairs (int4 writes otherwise: quantize, update): program element = one storage byte (n, i) of the packed
        [N, KB] rows, i.e. the logical elements k = 2i, 2i + 1, both computed by the same program
        element, so no two programs write one byte; nibbles at k >= K (padding) are written as 0.
        z / v of element j come from the Philox block j >> 2 and its lane (gather; 2 Philox calls
        per byte instead of 1 per 4 elements).
Formats (FMT): 0 int8, 1 int4, 2 fp8. fp8 storage is addressed as uint8 bit patterns and e4m3 is
encoded/decoded in integer math (exact in the interpreter and on the GPU alike).
Divisions are tl.div_rn (IEEE round-to-nearest; plain `/` is div.full.f32, approximate, on the GPU).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ... import contract as C
from .kernels import _load_f32, _round_store, _v_tile, _z_tile
from .masked_kernels import _v_elem as _v_at  # z / v of arbitrary element indices j (lane j & 3 of block j >> 2)
from .masked_kernels import _z_elem as _z_at

SR_CLAMP = tl.constexpr(C.SR_CLAMP)
E4M3_MAX = tl.constexpr(C.E4M3_MAX)
E4M3_MIN_NORMAL = tl.constexpr(0.015625)    # 2^-6
STREAM_QUZO_UPDATE = tl.constexpr(C.STREAM_QUZO_UPDATE)

FMT_INT8 = 0
FMT_INT4 = 1
FMT_FP8 = 2
# probe outputs (OUT): 0 float32, 1 bfloat16 (int16 bits), 2 float16 (as kernels.KIND), 3 int8 grid values,
# 4 e4m3 grid values (uint8 bits), 5 int4 packed like the storage (K % 4 == 0)
OUT_INT8 = 3
OUT_E4M3 = 4
OUT_INT4_PACKED = 5


# ----------------------------------------------------------------------------- integer rounding
@triton.jit
def _sr_int(x, v):
    """floor(x) + [v < x - floor(x)] of x clamped to +-2^30, as an integer-valued float32."""
    x = tl.minimum(tl.maximum(x, -SR_CLAMP), SR_CLAMP)
    lo = tl.floor(x)
    return lo + tl.where(v < x - lo, 1.0, 0.0)


@triton.jit
def _rn_int(x):
    """Round half to even (torch.round) of |x| < 2^31, as int32."""
    lo = tl.floor(x)
    f = x - lo
    lo_i = lo.to(tl.int32)
    up = (f > 0.5) | ((f == 0.5) & ((lo_i & 1) == 1))
    return lo_i + up.to(tl.int32)


# ----------------------------------------------------------------------------- e4m3 in integer math
@triton.jit
def _e4m3_value(bits):
    """Value (float32) of e4m3 magnitude bits 0..0x7E: (bits + 120 * 8) << 20 for normals, bits * 2^-9 below."""
    normal = ((bits + 960) << 20).to(tl.float32, bitcast=True)
    return tl.where(bits >= 8, normal, bits.to(tl.float32) * 0.001953125)


@triton.jit
def _e4m3_bits_down(a):
    """Bits (int32) of the largest e4m3 value <= a, for 0 <= a <= 448."""
    normal = (a.to(tl.int32, bitcast=True) >> 20) - 960
    sub = (a * 512.0).to(tl.int32)
    return tl.where(a >= E4M3_MIN_NORMAL, normal, sub)


@triton.jit
def _with_sign(mag_bits, x):
    """e4m3 bits (int32 0..255): magnitude bits with the sign of float32 x; NaN x -> 0x7F | sign."""
    sign = ((x.to(tl.int32, bitcast=True) >> 24) & 0x80)
    return tl.where(x != x, 0x7F, mag_bits) | sign


@triton.jit
def _sr_e4m3(x, v):
    """SR of float32 x to e4m3 bits: lo = largest e4m3 <= |x|, hi = next (<= 448); hi iff v (hi - lo) < |x| - lo."""
    a = tl.abs(x)
    lo_b = _e4m3_bits_down(tl.minimum(a, E4M3_MAX))
    hi_b = tl.minimum(lo_b + 1, 0x7E)
    lo = _e4m3_value(lo_b)
    hi = _e4m3_value(hi_b)
    up = (v * (hi - lo) < a - lo) & (hi_b > lo_b)
    return _with_sign(tl.where(up, hi_b, lo_b), x)


@triton.jit
def _rn_e4m3(x):
    """Round to nearest even of float32 x clamped to +-448, as e4m3 bits (2|x| vs lo + hi: both exact)."""
    a = tl.minimum(tl.abs(x), E4M3_MAX)
    lo_b = _e4m3_bits_down(a)
    hi_b = tl.minimum(lo_b + 1, 0x7E)
    mid = _e4m3_value(lo_b) + _e4m3_value(hi_b)
    up = ((a * 2.0 > mid) | ((a * 2.0 == mid) & ((lo_b & 1) == 1))) & (hi_b > lo_b)
    return _with_sign(tl.where(up, hi_b, lo_b), x)


@triton.jit
def _e4m3_decode(bits):
    """float32 value of e4m3 bits (int32 0..255); 0x7F / 0xFF are NaN."""
    mag = bits & 0x7F
    val = _e4m3_value(tl.minimum(mag, 0x7E))
    nan = (mag * 0 + 0x7FC00000).to(tl.float32, bitcast=True)   # a NaN constexpr global trips triton's checks
    val = tl.where(mag == 0x7F, nan, val)
    return tl.where((bits & 0x80) != 0, -val, val)


# ----------------------------------------------------------------------------- addressing, random numbers
@triton.jit
def _key_words(lo, hi):
    return lo.to(tl.uint32, bitcast=True), hi.to(tl.uint32, bitcast=True)


@triton.jit
def _tile_elements(NK, BLOCKS: tl.constexpr):
    """Philox blocks b [BLOCKS] and elements j [BLOCKS, 4] of this program, mask j < NK."""
    b = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)
    j = b[:, None] * 4 + tl.arange(0, 4).to(tl.int64)[None, :]
    return b, j, j < NK


@triton.jit
def _scale_index(n, k, SCOLS, GROUP: tl.constexpr, FMT: tl.constexpr):
    if FMT == 1:
        return n * SCOLS + k // GROUP
    else:
        return n * SCOLS


@triton.jit
def _z_of(b, j, c1h, key_lo, key_hi, k0, k1, GAUSSIAN: tl.constexpr, PRECISE: tl.constexpr,
          GATHER: tl.constexpr):
    if GATHER:
        z = _z_at(j, c1h, key_lo, key_hi, k0, k1, GAUSSIAN, PRECISE)
    else:
        z = _z_tile(b, c1h, key_lo, key_hi, k0, k1, GAUSSIAN, PRECISE)
    return z


@triton.jit
def _v_of(b, j, c1h, key_lo, key_hi, k0, k1, GATHER: tl.constexpr):
    if GATHER:
        v = _v_at(j, c1h, key_lo, key_hi, k0, k1)
    else:
        v = _v_tile(b, c1h, key_lo, key_hi, k0, k1)
    return v


@triton.jit
def _nibble(byte, k):
    """Signed int4 value of logical column k from its storage byte (int32)."""
    nib = (byte >> ((k & 1) * 4).to(tl.int32)) & 0xF
    return tl.where(nib >= 8, nib - 16, nib)


@triton.jit
def _load_grid(q_ptr, n, k, j, mask, KB, FMT: tl.constexpr):
    """Grid value of element (n, k): int32 (int8, int4) or float32 (fp8)."""
    if FMT == 0:
        val = tl.load(q_ptr + j, mask=mask, other=0).to(tl.int32)
    elif FMT == 1:
        byte = tl.load(q_ptr + n * KB + (k >> 1), mask=mask, other=0).to(tl.int32)
        val = _nibble(byte, k)
    else:
        val = _e4m3_decode(tl.load(q_ptr + j, mask=mask, other=0).to(tl.int32))
    return val


@triton.jit
def _store_int4_tile(q_ptr, b, vals, mask, NK, K, KB):
    """int4 writes of a tile when K % 4 == 0: Philox block b holds columns 4m .. 4m + 3 of one row, i.e. the
    storage bytes 2m (lanes 0, 1) and 2m + 1 (lanes 2, 3), which no other program writes."""
    lane = tl.arange(0, 4)[None, :]
    nib = tl.where(mask, vals & 0xF, 0) << ((lane & 1) * 4)
    lo = tl.sum(tl.where(lane < 2, nib, 0), axis=1)
    hi = tl.sum(tl.where(lane >= 2, nib, 0), axis=1)
    j0 = b * 4
    n0 = j0 // K
    addr = q_ptr + n0 * KB + ((j0 - n0 * K) >> 1)
    tl.store(addr, lo.to(tl.uint8), mask=j0 < NK)
    tl.store(addr + 1, hi.to(tl.uint8), mask=j0 < NK)


@triton.jit
def _pair_bytes(N, KB, BLOCKS: tl.constexpr):
    """pairs layout: this program's storage bytes [4 BLOCKS] of the packed [N, KB] rows, their mask, row n and
    byte i within the row (logical columns 2i, 2i + 1)."""
    byte = tl.program_id(0).to(tl.int64) * (BLOCKS * 4) + tl.arange(0, BLOCKS * 4).to(tl.int64)
    n = byte // KB
    return byte, byte < N.to(tl.int64) * KB, n, byte - n * KB


@triton.jit
def _count(sat_ptr, hit, mask):
    tl.atomic_add(sat_ptr, tl.sum(tl.where(mask & hit, 1, 0)).to(tl.int64))


# ----------------------------------------------------------------------------- element stages
@triton.jit
def _quantize_value(x, v, QMAX: tl.constexpr, FMT: tl.constexpr, STOCHASTIC: tl.constexpr):
    """R(x) on the grid: int32 value (int formats, x clamped to +-QMAX first) or e4m3 bits (fp8)."""
    if FMT == 2:
        if STOCHASTIC:
            r = _sr_e4m3(x, v)
        else:
            r = _rn_e4m3(x)
    else:
        xc = tl.minimum(tl.maximum(x, -QMAX), QMAX)
        if STOCHASTIC:
            r = _sr_int(xc, v).to(tl.int32)
        else:
            r = _rn_int(xc)
    return r


@triton.jit
def _update_target(b, j, s, coeff_ptr, n_coeffs, lr, eps, key_lo, key_hi, k0, k1, FMT: tl.constexpr,
                   PAPER: tl.constexpr, GAUSSIAN: tl.constexpr, PRECISE: tl.constexpr, GATHER: tl.constexpr):
    """x: single (sum_q z_q c_q) * lr / s; paper (sum_q D2_q c_q) * lr / eps, D2_q = Q2((z_q eps) / s)."""
    acc = tl.zeros_like(s)
    for qi in range(0, n_coeffs):
        c = tl.load(coeff_ptr + qi)
        c1z = tl.cast(qi, tl.uint32) << 16   # stream 0 (STREAM_Z); qi is a python int under the interpreter
        z = _z_of(b, j, c1z, key_lo, key_hi, k0, k1, GAUSSIAN, PRECISE, GATHER)
        if PAPER:
            d = tl.div_rn(z * eps, s)
            v2 = _v_of(b, j, c1z | (STREAM_QUZO_UPDATE << 28), key_lo, key_hi, k0, k1, GATHER)
            if FMT == 2:
                d2 = _e4m3_decode(_sr_e4m3(d, v2))
            else:
                d2 = _sr_int(d, v2)
            term = d2 * c
        else:
            term = z * c
        acc = tl.where(qi == 0, term, acc + term)  # the reference starts from the first term, not 0 + term
    if PAPER:
        x = tl.div_rn(acc * lr, eps)
    else:
        x = tl.div_rn(acc * lr, s)
    return x


@triton.jit
def _updated(qv, x, v, QMAX: tl.constexpr, FMT: tl.constexpr):
    """(new grid value: int32 | e4m3 bits, saturated?) of Q(q - x)."""
    if FMT == 2:
        y = qv - x
        new = _sr_e4m3(y, v)
        hit = tl.abs(y) > QMAX
    else:
        raw = qv - _sr_int(x, v).to(tl.int32)
        new = tl.minimum(tl.maximum(raw, -QMAX), QMAX)
        hit = new != raw
    return new, hit


# ----------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["N", "K", "KB", "SCOLS", "seed_lo", "seed_hi", "key_lo", "key_hi"])
def quantize_kernel(w_ptr, scale_ptr, out_ptr, N, K, KB, SCOLS, seed_lo, seed_hi, key_lo, key_hi, c1_sr,
                    QMAX: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, KIND: tl.constexpr,
                    STOCHASTIC: tl.constexpr, QUAD: tl.constexpr, BLOCKS: tl.constexpr, PRECISE: tl.constexpr):
    """out <- storage of R(w / s): RNE or SR (uniforms of c1_sr = STREAM_QUANT_SR, query 0). int4: tile
    path when QUAD (K % 4 == 0; the host zeroes the padding bytes), else byte pairs."""
    k0, k1 = _key_words(seed_lo, seed_hi)
    kl, kh = _key_words(key_lo, key_hi)
    c1 = c1_sr.to(tl.uint32, bitcast=True)
    if FMT == 1 and not QUAD:
        # pairs: program element = storage byte (n, i) of [N, KB]
        byte, bmask, n, i = _pair_bytes(N, KB, BLOCKS)
        packed = tl.zeros([BLOCKS * 4], dtype=tl.int32)
        for e in tl.static_range(2):
            k = 2 * i + e
            m = bmask & (k < K)
            j = n * K + k
            s = tl.load(scale_ptr + n * SCOLS + k // GROUP, mask=m, other=1.0)
            x = tl.div_rn(_load_f32(w_ptr + j, m, KIND), s)
            if STOCHASTIC:
                v = _v_at(j, c1, kl, kh, k0, k1)
            else:
                v = x
            r = _quantize_value(x, v, QMAX, FMT, STOCHASTIC)
            packed = packed | (tl.where(m, r & 0xF, 0) << (4 * e))
        tl.store(out_ptr + byte, packed.to(tl.uint8), mask=bmask)
    else:
        NK = N.to(tl.int64) * K
        b, j, mask = _tile_elements(NK, BLOCKS)
        n = j // K
        s = tl.load(scale_ptr + _scale_index(n, j - n * K, SCOLS, GROUP, FMT), mask=mask, other=1.0)
        x = tl.div_rn(_load_f32(w_ptr + j, mask, KIND), s)
        if STOCHASTIC:
            v = _v_tile(b, c1, kl, kh, k0, k1)
        else:
            v = x
        r = _quantize_value(x, v, QMAX, FMT, STOCHASTIC)
        if FMT == 0:
            tl.store(out_ptr + j, r.to(tl.int8), mask=mask)
        elif FMT == 1:
            _store_int4_tile(out_ptr, b, r, mask, NK, K, KB)
        else:
            tl.store(out_ptr + j, r.to(tl.uint8), mask=mask)


@triton.jit(do_not_specialize=["N", "K", "KB", "SCOLS", "seed_lo", "seed_hi", "key_lo", "key_hi", "c1_z", "c1_v",
                                "sign"])
def probe_kernel(q_ptr, scale_ptr, out_ptr, sat_ptr, N, K, KB, SCOLS, seed_lo, seed_hi, key_lo, key_hi,
                 c1_z, c1_v, eps, sign, QMAX: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr,
                 OUT: tl.constexpr, GAUSSIAN: tl.constexpr, BLOCKS: tl.constexpr, PRECISE: tl.constexpr):
    """out <- probe weights: int clamp(q + sign SR((z eps) / s)); fp8 SR_e4m3(q + d sign); sat += clamped."""
    k0, k1 = _key_words(seed_lo, seed_hi)
    kl, kh = _key_words(key_lo, key_hi)
    NK = N.to(tl.int64) * K
    b, j, mask = _tile_elements(NK, BLOCKS)
    n = j // K
    k = j - n * K
    s = tl.load(scale_ptr + _scale_index(n, k, SCOLS, GROUP, FMT), mask=mask, other=1.0)
    z = _z_tile(b, c1_z.to(tl.uint32, bitcast=True), kl, kh, k0, k1, GAUSSIAN, PRECISE)
    v = _v_tile(b, c1_v.to(tl.uint32, bitcast=True), kl, kh, k0, k1)
    d = tl.div_rn(z * eps, s)
    qv = _load_grid(q_ptr, n, k, j, mask, KB, FMT)
    if FMT == 2:
        x = qv + d * sign.to(tl.float32)
        bits = _sr_e4m3(x, v)
        hit = tl.abs(x) > QMAX
        val = _e4m3_decode(bits)
    else:
        raw = qv + _sr_int(d, v).to(tl.int32) * sign
        p = tl.minimum(tl.maximum(raw, -QMAX), QMAX)
        hit = p != raw
        val = p.to(tl.float32)
    _count(sat_ptr, hit, mask)
    if OUT == 3:
        tl.store(out_ptr + j, p.to(tl.int8), mask=mask)
    elif OUT == 4:
        tl.store(out_ptr + j, bits.to(tl.uint8), mask=mask)
    elif OUT == 5:
        _store_int4_tile(out_ptr, b, p, mask, NK, K, KB)
    else:
        y = val * s
        _round_store(out_ptr + j, y, y, mask, OUT, False)


@triton.jit(do_not_specialize=["n_coeffs", "N", "K", "KB", "SCOLS", "seed_lo", "seed_hi", "key_lo", "key_hi",
                                "c1_sr"])
def update_kernel(q_ptr, scale_ptr, coeff_ptr, sat_ptr, n_coeffs, N, K, KB, SCOLS, seed_lo, seed_hi,
                  key_lo, key_hi, c1_sr, lr, eps, QMAX: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr,
                  PAPER: tl.constexpr, GAUSSIAN: tl.constexpr, QUAD: tl.constexpr, BLOCKS: tl.constexpr,
                  PRECISE: tl.constexpr):
    """q <- Q(q - x) in place (x: _update_target; Q: SR with c1_sr = STREAM_UPDATE_SR, query 0);
    sat += clamped. int4: tile path when QUAD (K % 4 == 0), else byte pairs with gathered Philox words."""
    k0, k1 = _key_words(seed_lo, seed_hi)
    kl, kh = _key_words(key_lo, key_hi)
    c1 = c1_sr.to(tl.uint32, bitcast=True)
    if FMT == 1 and not QUAD:
        byte, bmask, n, i = _pair_bytes(N, KB, BLOCKS)
        old = tl.load(q_ptr + byte, mask=bmask, other=0).to(tl.int32)
        packed = tl.zeros([BLOCKS * 4], dtype=tl.int32)
        for e in tl.static_range(2):
            k = 2 * i + e
            m = bmask & (k < K)
            j = n * K + k
            s = tl.load(scale_ptr + n * SCOLS + k // GROUP, mask=m, other=1.0)
            x = _update_target(byte, j, s, coeff_ptr, n_coeffs, lr, eps, kl, kh, k0, k1, FMT, PAPER, GAUSSIAN,
                               PRECISE, True)
            v = _v_at(j, c1, kl, kh, k0, k1)
            new, hit = _updated(_nibble(old, k), x, v, QMAX, FMT)
            _count(sat_ptr, hit, m)
            packed = packed | (tl.where(m, new & 0xF, 0) << (4 * e))
        tl.store(q_ptr + byte, packed.to(tl.uint8), mask=bmask)
    else:
        NK = N.to(tl.int64) * K
        b, j, mask = _tile_elements(NK, BLOCKS)
        n = j // K
        k = j - n * K
        s = tl.load(scale_ptr + _scale_index(n, k, SCOLS, GROUP, FMT), mask=mask, other=1.0)
        x = _update_target(b, j, s, coeff_ptr, n_coeffs, lr, eps, kl, kh, k0, k1, FMT, PAPER, GAUSSIAN,
                           PRECISE, False)
        v = _v_tile(b, c1, kl, kh, k0, k1)
        new, hit = _updated(_load_grid(q_ptr, n, k, j, mask, KB, FMT), x, v, QMAX, FMT)
        _count(sat_ptr, hit, mask)
        if FMT == 0:
            tl.store(q_ptr + j, new.to(tl.int8), mask=mask)
        elif FMT == 1:
            _store_int4_tile(q_ptr, b, new, mask, NK, K, KB)
        else:
            tl.store(q_ptr + j, new.to(tl.uint8), mask=mask)
