"""Triton kernels of the masked ops (MaZO). Imported lazily by masked.py, after triton is known to work.

One program per chunk-table entry (tensor t, first work item). FORMAT picks what a program covers:

  0 rows:   BLOCKS (row, i) pairs p = first .. first + BLOCKS - 1 of a [rows, k] column-id table;
            column c = idx[p], local element r * ncols + c, j = offset + local; z from Philox block
            j >> 2, lane j & 3: one Philox call per element (scattered elements rarely share a block).
  1 blocks: BLOCKS // NPB mask entries (row, block id) x NPB Philox blocks each, as a [BLOCKS, 4] tile:
            the run of BCOLS contiguous columns starting at j0 = offset + r * ncols + id * BCOLS spans
            Philox blocks (j0 >> 2) + 0 .. NPB - 1, one Philox call per 4 elements; lanes outside the
            run (or past the row's end) are masked off. ALIGNED (host-checked: offset, ncols, BCOLS and
            every weight/out delta multiples of 4): j0 is then a multiple of 4, the mask is constant over
            each Philox block and its 4 elements are one aligned vector; the hints let the compiler see
            it (sm_90 PTX, bf16, triton 3.9: ld/st.global.v2 and 0 bar.sync; without: scalar accesses
            and 23 / 31 bar.sync (perturb / update) converting the tile's layout through shared memory).
  2 bits:   a dense [BLOCKS, 4] tile of Philox blocks like the dense kernels; an element moves iff its
            bit (local & 7) of byte idx[local >> 3] is set.

Tensor table (int64, TAB per tensor): weight delta, index delta, k (entries per row; 1 for bits),
ncols, key bits, offset, count (pairs / entries / numel), out delta. Unmasked elements are neither
loaded nor stored, so they never change, bitwise.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _block_words, _box_muller, _half_open_unit, _load_f32, _rademacher, _round_store, _v_tile, _z_tile

TAB = tl.constexpr(8)


@triton.jit
def _pick(lane, r0, r1, r2, r3):
    return tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))


@triton.jit
def _z_elem(j, c1_high, key_lo, key_hi, k0, k1, GAUSSIAN: tl.constexpr, PRECISE: tl.constexpr):
    """z of global indices j (int64 [N]): Box-Muller of (R0, R1) for lanes 0, 1, of (R2, R3) for 2, 3."""
    r0, r1, r2, r3 = _block_words(j >> 2, c1_high, key_lo, key_hi, k0, k1)
    lane = j & 3
    if GAUSSIAN:
        low = lane < 2
        za, zb = _box_muller(tl.where(low, r0, r2), tl.where(low, r1, r3), PRECISE)
        z = tl.where((lane & 1) == 0, za, zb)
    else:
        z = _rademacher(_pick(lane, r0, r1, r2, r3))
    return z


@triton.jit
def _v_elem(j, c1_high, key_lo, key_hi, k0, k1):
    r0, r1, r2, r3 = _block_words(j >> 2, c1_high, key_lo, key_hi, k0, k1)
    return _half_open_unit(_pick(j & 3, r0, r1, r2, r3))


@triton.jit
def _coords(idx_ptr, tab_ptr, chunk_ptr, FORMAT: tl.constexpr, BLOCKS: tl.constexpr, NPB: tl.constexpr,
            BCOLS: tl.constexpr, ALIGNED: tl.constexpr):
    """(t, b, j, local, emask, weight delta, out delta, key words): b = Philox blocks of a tile
    (FORMAT 1, 2) and j = global indices of the elements (FORMAT 0); local = j - offset."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunk_ptr + 2 * pid)
    first = tl.load(chunk_ptr + 2 * pid + 1)
    w_delta = tl.load(tab_ptr + TAB * t)
    i_delta = tl.load(tab_ptr + TAB * t + 1)
    k = tl.load(tab_ptr + TAB * t + 2)
    ncols = tl.load(tab_ptr + TAB * t + 3)
    key = tl.load(tab_ptr + TAB * t + 4)
    offset = tl.load(tab_ptr + TAB * t + 5)
    count = tl.load(tab_ptr + TAB * t + 6)
    o_delta = tl.load(tab_ptr + TAB * t + 7)
    key_lo = (key & 0xFFFFFFFF).to(tl.uint32)
    key_hi = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    if FORMAT == 0:
        p = first + tl.arange(0, BLOCKS).to(tl.int64)
        emask = p < count
        col = tl.load(idx_ptr + i_delta + p, mask=emask, other=0).to(tl.int64)
        local = (p // k) * ncols + col
        j = local + offset
        b = j >> 2
    elif FORMAT == 1:
        if ALIGNED:
            w_delta = tl.multiple_of(w_delta, 4)
            o_delta = tl.multiple_of(o_delta, 4)
            ncols = tl.multiple_of(ncols, 4)
            offset = tl.multiple_of(offset, 4)
        r = tl.arange(0, BLOCKS).to(tl.int64)
        e = first + r // NPB
        valid = e < count
        blk = tl.load(idx_ptr + i_delta + e, mask=valid, other=0).to(tl.int64)
        row_start = (e // k) * ncols
        j0 = offset + row_start + blk * BCOLS
        b = (j0 >> 2) + r % NPB
        j = b[:, None] * 4 + tl.arange(0, 4).to(tl.int64)[None, :]
        local = j - offset
        emask = (valid[:, None] & (j >= j0[:, None]) & (j < j0[:, None] + BCOLS)
                 & (local - row_start[:, None] < ncols))
    else:
        b = first + tl.arange(0, BLOCKS).to(tl.int64)
        j = b[:, None] * 4 + tl.arange(0, 4).to(tl.int64)[None, :]
        local = j - offset
        inside = (local >= 0) & (local < count)
        byte = tl.load(idx_ptr + i_delta + (local >> 3), mask=inside, other=0).to(tl.int32)
        emask = inside & (((byte >> (local & 7).to(tl.int32)) & 1) != 0)
    return t, b, j, local, emask, w_delta, o_delta, key_lo, key_hi


@triton.jit
def _z(b, j, c1_high, key_lo, key_hi, k0, k1, FORMAT: tl.constexpr, GAUSSIAN: tl.constexpr,
       PRECISE: tl.constexpr):
    if FORMAT == 0:
        z = _z_elem(j, c1_high, key_lo, key_hi, k0, k1, GAUSSIAN, PRECISE)
    else:
        z = _z_tile(b, c1_high, key_lo, key_hi, k0, k1, GAUSSIAN, PRECISE)
    return z


@triton.jit
def _v(b, j, c1_high, key_lo, key_hi, k0, k1, FORMAT: tl.constexpr):
    if FORMAT == 0:
        v = _v_elem(j, c1_high, key_lo, key_hi, k0, k1)
    else:
        v = _v_tile(b, c1_high, key_lo, key_hi, k0, k1)
    return v


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "c1_z", "c1_sr"])
def masked_perturb_kernel(w_ptr, out_ptr, idx_ptr, tab_ptr, chunk_ptr, seed_lo, seed_hi, c1_z, c1_sr, scale,
                          FORMAT: tl.constexpr, KIND: tl.constexpr, GAUSSIAN: tl.constexpr,
                          STOCHASTIC: tl.constexpr, COPY: tl.constexpr, BLOCKS: tl.constexpr, NPB: tl.constexpr,
                          BCOLS: tl.constexpr, PRECISE: tl.constexpr, ALIGNED: tl.constexpr):
    """out[m] = R(theta[m] + scale * z[m]) on masked m; out is theta unless COPY."""
    t, b, j, local, emask, w_delta, o_delta, key_lo, key_hi = _coords(idx_ptr, tab_ptr, chunk_ptr, FORMAT, BLOCKS,
                                                                      NPB, BCOLS, ALIGNED)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    z = _z(b, j, c1_z.to(tl.uint32, bitcast=True), key_lo, key_hi, k0, k1, FORMAT, GAUSSIAN, PRECISE)
    theta = _load_f32(w_ptr + w_delta + local, emask, KIND)
    x = theta + scale * z
    if STOCHASTIC:
        v = _v(b, j, c1_sr.to(tl.uint32, bitcast=True), key_lo, key_hi, k0, k1, FORMAT)
    else:
        v = x
    if COPY:
        dst = out_ptr + o_delta + local
    else:
        dst = w_ptr + w_delta + local
    _round_store(dst, x, v, emask, KIND, STOCHASTIC)


@triton.jit(do_not_specialize=["n_coeffs", "seed_lo", "seed_hi", "c1_restore", "c1_sr"])
def masked_update_kernel(w_ptr, idx_ptr, tab_ptr, chunk_ptr, lrwd_ptr, coeff_ptr, n_coeffs, seed_lo, seed_hi,
                         restore_scale, c1_restore, c1_sr, FORMAT: tl.constexpr, KIND: tl.constexpr,
                         GAUSSIAN: tl.constexpr, STOCHASTIC: tl.constexpr, RESTORE: tl.constexpr,
                         BLOCKS: tl.constexpr, NPB: tl.constexpr, BCOLS: tl.constexpr, PRECISE: tl.constexpr,
                         ALIGNED: tl.constexpr):
    """theta' = theta (+ restore_scale z_rq); acc = c_0 z_0 (+ c_q z_q); theta <- R(theta' - lr (acc + wd theta'))
    on masked elements."""
    t, b, j, local, emask, w_delta, o_delta, key_lo, key_hi = _coords(idx_ptr, tab_ptr, chunk_ptr, FORMAT, BLOCKS,
                                                                      NPB, BCOLS, ALIGNED)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    theta = _load_f32(w_ptr + w_delta + local, emask, KIND)
    if RESTORE:
        theta = theta + restore_scale * _z(b, j, c1_restore.to(tl.uint32, bitcast=True), key_lo, key_hi, k0, k1,
                                           FORMAT, GAUSSIAN, PRECISE)
    acc = tl.zeros_like(theta)
    for q in range(0, n_coeffs):
        c = tl.load(coeff_ptr + q)
        c1q = tl.cast(q, tl.uint32) << 16  # stream 0 (STREAM_Z)
        term = _z(b, j, c1q, key_lo, key_hi, k0, k1, FORMAT, GAUSSIAN, PRECISE) * c
        acc = tl.where(q == 0, term, acc + term)
    lr = tl.load(lrwd_ptr + 2 * t)
    wd = tl.load(lrwd_ptr + 2 * t + 1)
    new = theta - (acc + theta * wd) * lr
    if STOCHASTIC:
        v = _v(b, j, c1_sr.to(tl.uint32, bitcast=True), key_lo, key_hi, k0, k1, FORMAT)
    else:
        v = new
    _round_store(w_ptr + w_delta + local, new, v, emask, KIND, STOCHASTIC)
