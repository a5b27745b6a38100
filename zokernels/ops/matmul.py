"""Quantized matmuls of QuantLinear's forward paths, declared once, validated here, dispatched by the registry.

    w8a8_matmul : y = float32(sum_k xq[m, k] wq[n, k]) * sx[m] * sw[n] + b[n]    xq, wq int8; int32 sums (exact)
    fp8_matmul  : the same formula with float8_e4m3fn xq, wq                       float32 (or exact) sums
    w4a16_matmul: y = sum_k x[m, k] * DT(q[n, k] * s[n, k // G]) + b[n]            q int4 packed, DT x's dtype,
                                                                                   float32 accumulation
Epilogue in float32 in that order (acc * sx, * sw, + b), then the output dtype.

Backend kernels (registered under the op's name; call properties for `supports`):
    w8a8_matmul(xq, x_scale, wq, w_scale, bias, out_dtype) -> [M, N]                 {}
        triton: int8 tl.dot; torch: torch._int_mm (+ the epilogue in torch); reference: exact int64
        (CUDA: float64) sums. All three agree bitwise.
    fp8_matmul(xq, x_scale, wq, w_scale, bias, out_dtype) -> [M, N]                  {}
        triton: e4m3 tl.dot, float32 accumulation (sm_89+); torch: torch._scaled_mm with unit scales and
        float32 output; reference: e4m3 products summed in float64 (exact for K < 2^17).
    w4a16_matmul(x, packed, scale, k, group_size, bias, out_dtype) -> [M, N]         {dtype}
        triton: the weight dequantized one tile at a time; torch: the whole weight dequantized to DT, then
        torch.matmul in DT; reference: float32 dequant + float32 matmul.
Operands reach the kernels contiguous, scales float32 [M] / [N] (W4A16: [N, Kp / G]), bias float32 [N] or None,
x (W4A16) already in DT.
"""
from __future__ import annotations

import torch

from ..backends import registry
from . import _checks as K
from ._checks import FLOAT_DTYPES, OpError

MATMUL_OPS = ("w8a8_matmul", "fp8_matmul", "w4a16_matmul")
W4A16_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

for _op, _summary in (
        ("w8a8_matmul", "int8 x int8 -> int32 (exact), y = acc * s_m * s_n + b"),
        ("fp8_matmul", "e4m3 x e4m3 -> float32, y = acc * s_m * s_n + b"),
        ("w4a16_matmul", "y = x @ DT(q * s)^T + b, q int4 packed, float32 accumulation")):
    registry.declare(_op, _summary)


def check_operands(x: torch.Tensor, k: int, n: int, x_scale: torch.Tensor | None, w: torch.Tensor,
                   w_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    """x [M, k], x_scale [M] (if any), w_scale [n] (or [n, G]: checked by the caller), bias [n], all on w's
    device: the kernels read raw memory from these sizes, so a mismatch must raise here."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != k:
        raise OpError(f"expected activations [M, {k}] for a weight {tuple(w.shape)}, got {tuple(x.shape)}")
    m = x.shape[0]
    if x_scale is not None and x_scale.numel() != m:
        raise OpError(f"x_scale must have {m} values (one per row of x), got {x_scale.numel()}")
    if w_scale.ndim == 1 or w_scale.shape[-1] == 1:
        if w_scale.numel() != n:
            raise OpError(f"w_scale must have {n} values (one per output row), got {w_scale.numel()}")
    if bias is not None and bias.numel() != n:
        raise OpError(f"bias must have {n} values, got {bias.numel()}")
    others = [t for t in (x, x_scale, w_scale, bias) if t is not None]
    if any(t.device != w.device for t in others):
        raise OpError(f"all operands must be on one device, got {sorted({str(t.device) for t in others + [w]})}")


def _f32_vector(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).reshape(-1).contiguous()


def _scaled(op: str, dtype: torch.dtype, xq, x_scale, wq, w_scale, bias, out_dtype, backend: str) -> torch.Tensor:
    if not isinstance(xq, torch.Tensor) or not isinstance(wq, torch.Tensor) or xq.dtype != dtype or wq.dtype != dtype:
        raise TypeError(f"{op} takes {dtype} operands, got {getattr(xq, 'dtype', type(xq).__name__)} and "
                        f"{getattr(wq, 'dtype', type(wq).__name__)}")
    if wq.ndim != 2:
        raise OpError(f"expected a weight [N, K], got shape {tuple(wq.shape)}")
    check_operands(xq, wq.shape[1], wq.shape[0], x_scale, wq, w_scale, bias)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    return K.run(op, xq.device, backend, {}, xq.contiguous(), _f32_vector(x_scale), wq.contiguous(),
                 _f32_vector(w_scale), None if bias is None else _f32_vector(bias), out_dtype)


@torch.no_grad()
def w8a8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, *, out_dtype: torch.dtype = torch.float32,
                backend: str = "auto") -> torch.Tensor:
    """y = (xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias, [M, N] in out_dtype: xq [M, K], wq [N, K]
    int8, int32 accumulation (exact), the epilogue in float32; scales [M] and [N] (or [N, 1])."""
    return _scaled("w8a8_matmul", torch.int8, xq, x_scale, wq, w_scale, bias, out_dtype, backend)


@torch.no_grad()
def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None, *, out_dtype: torch.dtype = torch.float32,
               backend: str = "auto") -> torch.Tensor:
    """y = float32(xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias, [M, N] in out_dtype; xq [M, K],
    wq [N, K] float8_e4m3fn, scales [M] and [N] (or [N, 1])."""
    return _scaled("fp8_matmul", torch.float8_e4m3fn, xq, x_scale, wq, w_scale, bias, out_dtype, backend)


@torch.no_grad()
def w4a16_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, shape, group_size: int,
                 bias: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """y = x @ DT(q * s)^T + bias for the int4 weight of logical shape (N, K): packed uint8 [N, Kp / 2]
    (element 2i in the low nibble, Kp = K rounded up to group_size, padding nibbles 0), s = scale float32
    [N, Kp / group_size]; x [M, K]. DT: x's dtype if fp16/bf16/fp32, else float32 (x is cast); float32
    accumulation; out_dtype defaults to DT."""
    n, k = (int(d) for d in shape)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.ndim != 2:
        raise OpError(f"packed int4 weights must be uint8 [N, Kp / 2], got {getattr(packed, 'dtype', type(packed))} "
                      f"{tuple(getattr(packed, 'shape', ()))}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
        raise OpError(f"int4 needs a positive even group_size, got {group_size}")
    kp = -(-k // group_size) * group_size
    if tuple(packed.shape) != (n, kp // 2) or tuple(scale.shape) != (n, kp // group_size):
        raise OpError(f"inconsistent int4 layout: weight {(n, k)} with group_size={group_size} needs packed "
                      f"{(n, kp // 2)} and scale {(n, kp // group_size)}, got {tuple(packed.shape)} and "
                      f"{tuple(scale.shape)}")
    if not isinstance(x, torch.Tensor):
        raise OpError(f"x must be a tensor, got {type(x).__name__}")
    check_operands(x, k, n, None, packed, scale, bias)
    dt = x.dtype if x.dtype in W4A16_DTYPES else torch.float32
    out_dtype = dt if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    return K.run("w4a16_matmul", x.device, backend, {"dtype": dt}, x.to(dt).contiguous(), packed.contiguous(),
                 scale.to(torch.float32).contiguous(), k, group_size, None if bias is None else _f32_vector(bias),
                 out_dtype)
