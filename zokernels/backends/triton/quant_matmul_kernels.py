"""Triton kernels of the quantized matmuls (zokernels/ops/matmul.py): W8A8 (int8), FP8 (e4m3) and W4A16 (int4).
Imported only by quant_matmul.py, after the backend checked that triton loads.

    scaled_dot: y[m, n] = float32(sum_k a[m, k] b[n, k]) * sa[m] * sb[n] (+ bias[n])
                IS_INT: int8 tl.dot -> int32 (W8A8); else e4m3 tl.dot -> float32 (FP8)
    w4a16     : y[m, n] = sum_k x[m, k] * DT(q[n, k] * s[n, k // GROUP]) (+ bias[n]), tl.dot in x's dtype DT
                -> float32

W8A8 / FP8: the same float32 epilogue order as the torch and reference backends (launched with FP
contraction off), so W8A8 agrees bitwise with them; FP8 accumulates in float32 in tile order (the exact
reference accumulates in float64). On sm_90 the wgmma fp8 sums are promoted to float32 every K tile
(max_num_imprecise_acc=BK) unless FAST_ACC.
W4A16: per K tile the kernel loads the packed bytes [BN, BK/2] of the tile, splits the nibbles (element 2i
in the low nibble), sign-extends them, multiplies by the tile's group scale (BK divides the group size, so
one scale per row and tile), casts to the activation dtype and accumulates tl.dot(x, w^T) in float32 (fp32
activations: input_precision="ieee", no TF32). The padding columns K..Kp of the packed weight are zero and
x is masked there. The dequantized weight only ever exists as one [BK, BN] tile in registers / shared memory.
Tails (M, N, K not multiples of the tiles) are masked loads with 0 fill; index math is int64. M_BUCKET (M
rounded up to a power of two) is only an autotuning key.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def scaled_dot_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K, M_BUCKET, stride_am, stride_bn,
                      stride_cm, IS_INT: tl.constexpr, HAS_BIAS: tl.constexpr, FAST_ACC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    rk = tl.arange(0, BK).to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    if IS_INT:
        acc = tl.zeros([BM, BN], dtype=tl.int32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IS_INT:
            acc += tl.dot(a, b, out_dtype=tl.int32)
        elif FAST_ACC:
            acc = tl.dot(a, b, acc)
        else:  # sm_90: promote the tensor cores' reduced-precision fp8 sums to float32 every K tile
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BK)
    sa = tl.load(sa_ptr + rm, mask=m_ok, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])

@triton.jit
def w4a16_kernel(x_ptr, p_ptr, s_ptr, bias_ptr, c_ptr, M, N, K, M_BUCKET, stride_xm, stride_pn, stride_sn,
                 stride_cm, GROUP: tl.constexpr, IEEE: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    rk = tl.arange(0, BK).to(tl.int64)
    rb = tl.arange(0, BK // 2).to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :],
                    other=0.0)
        # k0 + BK <= Kp (BK divides GROUP, which divides Kp): the packed bytes need no K mask
        p = tl.load(p_ptr + rn[:, None] * stride_pn + (k0 // 2 + rb)[None, :], mask=n_ok[:, None],
                    other=0).to(tl.int32)
        lo = p & 15
        hi = (p >> 4) & 15
        q = tl.interleave(lo - ((lo & 8) << 1), hi - ((hi & 8) << 1))        # [BN, BK], -8..7
        s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)
        w = (q.to(tl.float32) * s[:, None]).to(x.dtype)
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    y = acc
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
