"""Triton W8A8 matmul: int8 x int8 -> int32 tl.dot accumulation, dequant + bias epilogue.

    y[m, n] = float32(sum_k xq[m, k] wq[n, k]) * sx[m] * sw[n] (+ b[n])

the same float32 operation order as zokernels.quant.ops.w8a8_matmul's torch/reference path (FP
contraction off), so all paths agree bitwise on the integer part and to rounding on the epilogue.
Tails (M, N, K not multiples of the tiles) are masked loads with 0 fill. Runs on CUDA, or on CPU
tensors under TRITON_INTERPRET=1 (tests; int8 tl.dot is exact there). triton is imported lazily.
"""
from __future__ import annotations

import os

import torch

# GPU tiles: an untuned starting point (no GPU was available to measure); 16 is tl.dot's minimum.
GPU_TILES = (64, 64, 64)
INTERPRETER_TILES = (32, 32, 32)
_kernel = None
_error: str | None = None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _build():
    global _kernel, _error
    if _kernel is not None or _error is not None:
        return _kernel
    try:
        import triton
        import triton.language as tl
    except Exception as e:  # noqa: BLE001
        _error = f"triton is not importable ({type(e).__name__}: {e}); pip install triton"
        return None

    @triton.jit
    def w8a8_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
        rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
        rk = tl.arange(0, BK).to(tl.int64)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros([BM, BN], dtype=tl.int32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            k_ok = kk < K
            a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
            b = tl.load(b_ptr + rn[None, :] * stride_bn + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
            acc += tl.dot(a, b, out_dtype=tl.int32)
        sa = tl.load(sa_ptr + rm, mask=m_ok, other=0.0)
        sb = tl.load(sb_ptr + rn, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])

    _kernel = w8a8_kernel
    return _kernel


def unavailable_reason(device: torch.device) -> str | None:
    """None if the Triton W8A8 kernel can run on `device`, else why not."""
    device = torch.device(device)
    if device.type == "cpu" and not _interpreted():
        return "CPU tensors need TRITON_INTERPRET=1 (set before importing triton)"
    if device.type == "cuda" and _interpreted():
        return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only"
    if device.type not in ("cpu", "cuda"):
        return f"the triton kernels run on CUDA (or CPU under the interpreter), not {device.type}"
    if _build() is None:
        return _error
    return None


def w8a8(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
         bias: torch.Tensor | None) -> torch.Tensor:
    """y = (xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias (float32 [M, N]); xq [M, K], wq [N, K] int8."""
    reason = unavailable_reason(xq.device)
    if reason is not None:
        raise RuntimeError(f"triton W8A8 matmul unavailable: {reason}")
    xq, wq = xq.contiguous(), wq.contiguous()
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=xq.device)
    if m == 0 or n == 0:
        return out
    bm, bn, bk = INTERPRETER_TILES if xq.device.type == "cpu" else GPU_TILES
    sa = x_scale.to(torch.float32).contiguous()
    sb = w_scale.to(torch.float32).reshape(-1).contiguous()
    b = bias.to(torch.float32).contiguous() if bias is not None else sb
    grid = (-(-m // bm), -(-n // bn))
    kwargs = {} if xq.device.type == "cpu" else {"enable_fp_fusion": False}
    _build()[grid](xq, wq, sa, sb, b, out, m, n, k, xq.stride(0), wq.stride(0), out.stride(0),
                   HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, **kwargs)
    return out
