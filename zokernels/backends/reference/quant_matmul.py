"""Reference backend: the quantized matmuls in plain torch (any device), exact where the formats allow.
The ops and their contract: zokernels/ops/matmul.py.

    w8a8 : int8 x int8 summed exactly (int64; CUDA has no int64 GEMM: float64, exact for |sum| < 2^53)
    fp8  : e4m3 products have <= 8 significant bits within 2^-18..2^18, so float64 sums are exact for K < 2^17
    w4a16: the weight dequantized to float32, x in float32, float32 matmul (any activation dtype)
then the float32 epilogue acc * s_m * s_n + b (numerics.matmul_epilogue) and the output dtype.
"""
from __future__ import annotations

import torch

from ... import numerics as N
from ..registry import register

NAME = "reference"


def int_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 a [M, K] x int8 b [K, N] -> int32, exact (|sum| < 2^31 for K < 2^17)."""
    if a.is_cuda:
        return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)
    return (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)


@register("w8a8_matmul", NAME)
def w8a8_matmul(xq, x_scale, wq, w_scale, bias, out_dtype) -> torch.Tensor:
    return N.matmul_epilogue(int_matmul_exact(xq, wq.t()), x_scale, w_scale, bias).to(out_dtype)


@register("fp8_matmul", NAME)
def fp8_matmul(xq, x_scale, wq, w_scale, bias, out_dtype) -> torch.Tensor:
    acc = xq.to(torch.float64) @ wq.to(torch.float64).t()
    return N.matmul_epilogue(acc, x_scale, w_scale, bias).to(out_dtype)


@register("w4a16_matmul", NAME)
def w4a16_matmul(x, packed, scale, k, group_size, bias, out_dtype) -> torch.Tensor:
    y = x.to(torch.float32) @ N.dequantize_int4(packed, scale, group_size, k).t()
    return (y + bias if bias is not None else y).to(out_dtype)
