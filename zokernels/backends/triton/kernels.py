"""Triton kernels of the perturbation contract (zokernels/contract.py). Imported only by the
backend package, after it checked that triton is importable.

Every multi-tensor kernel runs one program per entry of a chunk table: program p handles Philox
blocks b = first_block[p] .. first_block[p] + BLOCKS - 1 of tensor t[p], as a [BLOCKS, 4] tile
(rows: Philox blocks, columns: lanes), so one Philox call serves 4 elements. Element (b, lane) has
global index j = 4 b + lane and address base + delta[t] + (j - offset[t]), masked to
0 <= j - offset[t] < numel[t]. All index math is int64.

Tensor table (int64, 4 per tensor): element delta of data_ptr from the base pointer, numel,
key (uint64 as int64 bits), global offset. Storage kinds (KIND): 0 float32, 1 bfloat16 handled
as int16 bit patterns (exact conversions on GPU and interpreter alike), 2 float16.

Precise math: PRECISE selects libdevice log/cos/sin by name on GPU, so the contract's float32 libm
never depends on how a Triton version lowers tl.log/cos/sin (sm_90 PTX of fill z, triton 3.6.0 and
3.9.0: no .approx instruction with or without PRECISE, i.e. today tl.* lower to precise code too);
under the interpreter libdevice returns None, and tl.* are numpy's float32 functions. sqrt is
tl.sqrt_rn in both. Launch with enable_fp_fusion=False so that no
multiply-add is contracted and float32 arithmetic follows the reference step by step.

PTX for sm_90 compiled offline (triton 3.9, no GPU at hand; tests/test_triton_backend.py checks it): the
kernels' own float32 ops are mul.rn/add.rn (no contraction), no approximate instructions. A thread owns
whole Philox blocks: the four lanes are joined in registers (_lanes), and when every delta, numel and
offset of a launch is a multiple of 4 (ALIGNED, the usual case: parameters of 4k elements from the caching
allocator) the hints let the compiler prove each block's 4 elements one aligned vector: one 8-byte (16-bit)
or 16-byte (float32) load and store per block and no shared-memory layout conversion (update bf16 before
this: 47 bar.sync and 4 scalar 2-byte loads per block; unaligned launches now: 5-17 bar.sync, scalar).
Throughput: pending GPU measurement (benchmarks/gpu_session.sh).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from ... import contract as C

PHILOX_M0 = tl.constexpr(C.PHILOX_M0)
PHILOX_M1 = tl.constexpr(C.PHILOX_M1)
PHILOX_W0 = tl.constexpr(C.PHILOX_W0)
PHILOX_W1 = tl.constexpr(C.PHILOX_W1)
PHILOX_ROUNDS = tl.constexpr(C.PHILOX_ROUNDS)
TWO_POW_M24 = tl.constexpr(C.TWO_POW_M24)
TWO_PI_F32 = tl.constexpr(C.TWO_PI_F32)
TAB_WIDTH = tl.constexpr(4)

KIND_F32 = 0
KIND_BF16 = 1
KIND_F16 = 2


# ----------------------------------------------------------------------------- element math
@triton.jit
def _philox10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 words (contract.philox4x32_py)."""
    for r in tl.static_range(PHILOX_ROUNDS):
        if r > 0:
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _block_words(b, c1_high, key_lo, key_hi, k0, k1):
    """R0..R3 of Philox blocks b (int64 [BLOCKS]); c1_high = query << 16 | stream << 28 (uint32)."""
    c0 = (b & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((b >> 32) & 0xFFFF).to(tl.uint32) | c1_high
    c2 = tl.zeros_like(c0) + key_lo
    c3 = tl.zeros_like(c0) + key_hi
    return _philox10(c0, c1, c2, c3, k0, k1)


@triton.jit
def _open_unit(r):
    """u = ((r >> 9) * 2 + 1) * 2^-24, exact float32 in (0, 1)."""
    return ((r >> 9) * 2 + 1).to(tl.int32, bitcast=True).to(tl.float32) * TWO_POW_M24


@triton.jit
def _half_open_unit(r):
    """v = (r >> 8) * 2^-24, exact float32 in [0, 1)."""
    return (r >> 8).to(tl.int32, bitcast=True).to(tl.float32) * TWO_POW_M24


@triton.jit
def _box_muller(ra, rb, PRECISE: tl.constexpr):
    """z0 = sqrt(-2 ln u(ra)) cos(2pi u(rb)), z1 = same with sin."""
    theta = _open_unit(rb) * TWO_PI_F32
    if PRECISE:
        radius = tl.sqrt_rn(libdevice.log(_open_unit(ra)) * -2.0)
        z0 = radius * libdevice.cos(theta)
        z1 = radius * libdevice.sin(theta)
    else:
        radius = tl.sqrt_rn(tl.log(_open_unit(ra)) * -2.0)
        z0 = radius * tl.cos(theta)
        z1 = radius * tl.sin(theta)
    return z0, z1


@triton.jit
def _rademacher(r):
    """z = 1 - 2 * (r >> 31)."""
    return (1 - 2 * (r >> 31).to(tl.int32)).to(tl.float32)


@triton.jit
def _lanes(w0, w1, w2, w3):
    """[BLOCKS] x 4 -> [BLOCKS, 4] with column l = w_l."""
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [w0.shape[0], 4])


@triton.jit
def _z_words(b, c1_high, key_lo, key_hi, k0, k1, GAUSSIAN: tl.constexpr, PRECISE: tl.constexpr):
    r0, r1, r2, r3 = _block_words(b, c1_high, key_lo, key_hi, k0, k1)
    if GAUSSIAN:
        z0, z1 = _box_muller(r0, r1, PRECISE)
        z2, z3 = _box_muller(r2, r3, PRECISE)
    else:
        z0 = _rademacher(r0)
        z1 = _rademacher(r1)
        z2 = _rademacher(r2)
        z3 = _rademacher(r3)
    return z0, z1, z2, z3


@triton.jit
def _z_tile(b, c1_high, key_lo, key_hi, k0, k1, GAUSSIAN: tl.constexpr, PRECISE: tl.constexpr):
    z0, z1, z2, z3 = _z_words(b, c1_high, key_lo, key_hi, k0, k1, GAUSSIAN, PRECISE)
    return _lanes(z0, z1, z2, z3)


@triton.jit
def _v_tile(b, c1_high, key_lo, key_hi, k0, k1):
    r0, r1, r2, r3 = _block_words(b, c1_high, key_lo, key_hi, k0, k1)
    return _lanes(_half_open_unit(r0), _half_open_unit(r1), _half_open_unit(r2), _half_open_unit(r3))


# ----------------------------------------------------------------------------- rounding, load, store
@triton.jit
def _bf16_bits_nearest(x):
    """Round-half-to-even of float32 x to bfloat16 bits (uint32 < 2^16); NaN -> 0x7FC0 like torch."""
    xb = x.to(tl.uint32, bitcast=True)
    rounded = (xb + 0x7FFF + ((xb >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded)


@triton.jit
def _bf16_bits_stochastic(x, v):
    """SR to bfloat16: lo = |x| bits & 0xFFFF0000, hi = lo + 1 ulp; hi iff v (hi - lo) < |x| - lo."""
    xb = x.to(tl.uint32, bitcast=True)
    ab = xb & 0x7FFFFFFF
    a = ab.to(tl.float32, bitcast=True)
    lo_b = ab & 0xFFFF0000
    hi_b = lo_b + 0x10000
    lo = lo_b.to(tl.float32, bitcast=True)
    hi = hi_b.to(tl.float32, bitcast=True)
    mag_b = tl.where(v * (hi - lo) < a - lo, hi_b, lo_b)
    out = (mag_b | (xb & 0x80000000)) >> 16
    return tl.where(x != x, 0x7FC0, out)


@triton.jit
def _f16_stochastic(x, v):
    """SR to float16 (returned as the exactly representable float32 value): lo/hi from the RN cast
    adjusted by one step of the float16 bit pattern; hi iff v (hi - lo) < |x| - lo; NaN stays NaN."""
    a = tl.abs(x)
    r16 = a.to(tl.float16)
    rb = r16.to(tl.int16, bitcast=True).to(tl.int32)
    lo_i = tl.where(r16.to(tl.float32) > a, rb - 1, rb)
    hi_i = lo_i + 1
    lo = lo_i.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = hi_i.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    mag = tl.where(v * (hi - lo) < a - lo, hi, lo)
    signed = (mag.to(tl.uint32, bitcast=True) | (x.to(tl.uint32, bitcast=True) & 0x80000000)).to(
        tl.float32, bitcast=True)
    return tl.where(x != x, x, signed)


@triton.jit
def _load_f32(ptr, mask, KIND: tl.constexpr):
    if KIND == 1:
        bits = tl.load(ptr, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        x = (bits << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _round_store(ptr, x, v, mask, KIND: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Store float32 x as KIND: float32 as is, 16-bit nearest-even or stochastic with uniforms v."""
    if KIND == 0:
        tl.store(ptr, x, mask=mask)
    elif KIND == 1:
        if STOCHASTIC:
            bits = _bf16_bits_stochastic(x, v)
        else:
            bits = _bf16_bits_nearest(x)
        tl.store(ptr, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        if STOCHASTIC:
            tl.store(ptr, _f16_stochastic(x, v).to(tl.float16), mask=mask)
        else:
            tl.store(ptr, x.to(tl.float16), mask=mask)


@triton.jit
def _tile(tab_ptr, chunk_ptr, BLOCKS: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's tensor index t, Philox blocks b [BLOCKS], local element index [BLOCKS, 4],
    mask, the tensor's pointer delta and its key words."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunk_ptr + 2 * pid)
    first_block = tl.load(chunk_ptr + 2 * pid + 1)
    delta = tl.load(tab_ptr + TAB_WIDTH * t)
    numel = tl.load(tab_ptr + TAB_WIDTH * t + 1)
    key = tl.load(tab_ptr + TAB_WIDTH * t + 2)
    offset = tl.load(tab_ptr + TAB_WIDTH * t + 3)
    if ALIGNED:
        delta = tl.multiple_of(delta, 4)
        numel = tl.multiple_of(numel, 4)
        offset = tl.multiple_of(offset, 4)
    b = first_block + tl.arange(0, BLOCKS).to(tl.int64)
    lane = tl.arange(0, 4).to(tl.int64)
    local = b[:, None] * 4 + lane[None, :] - offset
    mask = (local >= 0) & (local < numel)
    key_lo = (key & 0xFFFFFFFF).to(tl.uint32)
    key_hi = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return t, b, local, mask, delta, key_lo, key_hi


# ----------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["n", "k0", "k1"])
def philox_kernel(ctr_ptr, out_ptr, n, k0, k1, BLOCK: tl.constexpr):
    """out[i, :] = Philox4x32-10(ctr[i, :], (k0, k1)); int64 [n, 4] holding uint32 values."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = i < n
    c0 = tl.load(ctr_ptr + 4 * i, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(ctr_ptr + 4 * i + 1, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(ctr_ptr + 4 * i + 2, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(ctr_ptr + 4 * i + 3, mask=mask, other=0).to(tl.uint32)
    r0, r1, r2, r3 = _philox10(c0, c1, c2, c3, k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True))
    tl.store(out_ptr + 4 * i, r0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 1, r1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 2, r2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 3, r3.to(tl.int64), mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "c1_high"])
def fill_kernel(in_ptr, out_ptr, tab_ptr, chunk_ptr, seed_lo, seed_hi, c1_high,
                MODE: tl.constexpr, GAUSSIAN: tl.constexpr, KIND: tl.constexpr, BLOCKS: tl.constexpr,
                PRECISE: tl.constexpr, ALIGNED: tl.constexpr):
    """MODE 0: out = z (float32); 1: out = v (float32); 2: out = SR(in (float32), v) as KIND."""
    t, b, local, mask, delta, key_lo, key_hi = _tile(tab_ptr, chunk_ptr, BLOCKS, ALIGNED)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    c1h = c1_high.to(tl.uint32, bitcast=True)
    if MODE == 0:
        tl.store(out_ptr + delta + local, _z_tile(b, c1h, key_lo, key_hi, k0, k1, GAUSSIAN, PRECISE), mask=mask)
    elif MODE == 1:
        tl.store(out_ptr + delta + local, _v_tile(b, c1h, key_lo, key_hi, k0, k1), mask=mask)
    else:
        x = tl.load(in_ptr + delta + local, mask=mask, other=0.0)
        v = _v_tile(b, c1h, key_lo, key_hi, k0, k1)
        _round_store(out_ptr + delta + local, x, v, mask, KIND, True)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "c1_z", "c1_sr"])
def perturb_kernel(in_ptr, out_ptr, tab_ptr, out_delta_ptr, chunk_ptr, seed_lo, seed_hi, c1_z, c1_sr, scale,
                   KIND: tl.constexpr, GAUSSIAN: tl.constexpr, STOCHASTIC: tl.constexpr, COPY: tl.constexpr,
                   BLOCKS: tl.constexpr, PRECISE: tl.constexpr, ALIGNED: tl.constexpr):
    """out = R(theta + scale * z); in place when COPY is false (out_ptr is in_ptr)."""
    t, b, local, mask, delta, key_lo, key_hi = _tile(tab_ptr, chunk_ptr, BLOCKS, ALIGNED)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    z = _z_tile(b, c1_z.to(tl.uint32, bitcast=True), key_lo, key_hi, k0, k1, GAUSSIAN, PRECISE)
    theta = _load_f32(in_ptr + delta + local, mask, KIND)
    x = theta + scale * z
    if STOCHASTIC:
        v = _v_tile(b, c1_sr.to(tl.uint32, bitcast=True), key_lo, key_hi, k0, k1)
    else:
        v = x
    if COPY:
        out_delta = tl.load(out_delta_ptr + t)
        if ALIGNED:
            out_delta = tl.multiple_of(out_delta, 4)
    else:
        out_delta = delta
    _round_store(out_ptr + out_delta + local, x, v, mask, KIND, STOCHASTIC)


@triton.jit(do_not_specialize=["n_coeffs", "seed_lo", "seed_hi", "c1_restore", "c1_sr"])
def update_kernel(ptr, tab_ptr, chunk_ptr, lrwd_ptr, coeff_ptr, n_coeffs, seed_lo, seed_hi, restore_scale,
                  c1_restore, c1_sr, KIND: tl.constexpr, GAUSSIAN: tl.constexpr, STOCHASTIC: tl.constexpr,
                  RESTORE: tl.constexpr, BLOCKS: tl.constexpr, PRECISE: tl.constexpr, ALIGNED: tl.constexpr):
    """theta' = theta (+ restore_scale * z_restore); acc = c_0 z_0; acc = acc + c_q z_q (q = 1..);
    theta <- R(theta' - lr * (acc + wd * theta'))."""
    t, b, local, mask, delta, key_lo, key_hi = _tile(tab_ptr, chunk_ptr, BLOCKS, ALIGNED)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    theta = _load_f32(ptr + delta + local, mask, KIND)
    if RESTORE:
        theta = theta + restore_scale * _z_tile(b, c1_restore.to(tl.uint32, bitcast=True), key_lo, key_hi,
                                                k0, k1, GAUSSIAN, PRECISE)
    # acc = c_0 z_0 + c_1 z_1 + ... in the reference's order (it starts from the first term, not 0 + term;
    # +0 without terms). The four lanes are accumulated as [BLOCKS] vectors and joined once: a loop-carried
    # [BLOCKS, 4] tile got another register layout than the loads on sm_90 and cost shared-memory round trips
    # (PTX of the aligned bf16 update: 10 bar.sync with the tile, 0 with the lanes).
    c = tl.load(coeff_ptr)
    z0, z1, z2, z3 = _z_words(b, tl.cast(0, tl.uint32), key_lo, key_hi, k0, k1, GAUSSIAN, PRECISE)
    some = n_coeffs > 0
    a0, a1, a2, a3 = tl.where(some, z0 * c, 0.0), tl.where(some, z1 * c, 0.0), tl.where(some, z2 * c, 0.0), \
        tl.where(some, z3 * c, 0.0)
    for q in range(1, n_coeffs):
        c = tl.load(coeff_ptr + q)
        c1q = tl.cast(q, tl.uint32) << 16  # stream 0 (STREAM_Z); q is a python int under the interpreter
        z0, z1, z2, z3 = _z_words(b, c1q, key_lo, key_hi, k0, k1, GAUSSIAN, PRECISE)
        a0, a1, a2, a3 = a0 + z0 * c, a1 + z1 * c, a2 + z2 * c, a3 + z3 * c
    acc = _lanes(a0, a1, a2, a3)
    lr = tl.load(lrwd_ptr + 2 * t)
    wd = tl.load(lrwd_ptr + 2 * t + 1)
    new = theta - (acc + theta * wd) * lr
    if STOCHASTIC:
        v = _v_tile(b, c1_sr.to(tl.uint32, bitcast=True), key_lo, key_hi, k0, k1)
    else:
        v = new
    _round_store(ptr + delta + local, new, v, mask, KIND, STOCHASTIC)


@triton.jit
def runtime_loop_kernel(out_ptr, n):
    """out[0] = n, counted by a loop bounded by a runtime argument (the update kernels' coefficient loop):
    the interpreter self-check (triton 3.6's interpreter fails such loops with numpy >= 2.4)."""
    acc = tl.zeros((1,), dtype=tl.int32)
    for _ in range(0, n):
        acc += 1
    tl.store(out_ptr + tl.arange(0, 1), acc)


INTERPRETED = type(perturb_kernel).__name__ == "InterpretedFunction"
