"""Quantized matmuls of QuantLinear's forward paths and the activation quantization they need: thin wrappers
of the declared ops (zokernels.ops.matmul, zokernels.ops.quant: contract, validation, backend dispatch).

    W8A8 (int8 weights)  : xq = R(x / s_m), s_m = amax_m / 127; y = int32(xq @ wq^T) * s_m * s_n + b[n]
    FP8  (e4m3 weights)  : xq = RN_e4m3(x / s_m), s_m = amax_m / 448 (SR_e4m3 with uniforms v if given);
                           y = float32(sum_k xq[m, k] wq[n, k]) * s_m * s_n + b[n]
    W4A16 (int4 weights) : y = x @ DT(q * s)^T + b, DT the activation dtype (fp16 / bf16 / fp32),
                           float32 accumulation; the dequantized weight exists one tile at a time (triton)

`backend=` ("auto" | "reference" | "torch" | "triton", MATMUL_BACKENDS) follows the registry's one policy:
"auto" (or $ZOKERNELS_BACKEND) takes the first of triton (CUDA; the interpreter is never automatic), torch
(torch._int_mm, torch._scaled_mm where they run, dequantize + torch.matmul for W4A16), reference (exact
int64 / float64 sums, float32 W4A16) that can run the call; a backend named explicitly runs the call or
raises BackendUnavailable with every backend's reason. Which one ran: zokernels.backends.registry.last_backend.
"""
from __future__ import annotations

import torch

from .. import contract as C
from .. import numerics as N
from .. import ops
from ..backends import registry
from . import formats as F

MATMUL_BACKENDS = ("auto", "reference", "torch", "triton")

__all__ = ["MATMUL_BACKENDS", "activation_uniforms", "fp8_matmul", "int_mm_available", "pack_values_int4",
           "quantize_activations", "quantize_activations_fp8", "scaled_mm_available", "w4a16_matmul",
           "w8a8_matmul"]


def check_backend(backend: str) -> str:
    if backend not in MATMUL_BACKENDS:
        raise ValueError(f"matmul backend must be one of {MATMUL_BACKENDS}, got {backend!r}")
    return backend


# ----------------------------------------------------------------------------- activations
def quantize_activations(x: torch.Tensor, v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: s_m = amax_m / 127 (1 where 0), xq = R(x / s_m) in [-127, 127].
    R: nearest (v None) or SR with uniforms v [M, K]. Returns (int8 [M, K], float32 [M])."""
    return ops.quantize_activations(x, "int8", v)


def quantize_activations_fp8(x: torch.Tensor, v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3: s_m = amax_m / 448 (1 where 0), xq = RN_e4m3(x / s_m) (SR_e4m3 with uniforms v [M, K]).
    Returns (float8_e4m3fn [M, K], float32 [M])."""
    return ops.quantize_activations(x, "fp8", v)


def activation_uniforms(shape, seed: int, key: int, query: int, device) -> torch.Tensor:
    """The activation SR uniforms of a probe: STREAM_ACT_SR, query `query`, the layer key, j = m * K + k."""
    return ops.uniform(tuple(shape), seed, key, query, stream=C.STREAM_ACT_SR, device=device)


# ----------------------------------------------------------------------------- availability
def int_mm_available(device: torch.device) -> bool:
    """The torch backend's W8A8 (torch._int_mm) runs on this device (probed once)."""
    return registry.why_not("w8a8_matmul", "torch", torch.device(device)) is None


def scaled_mm_available(device: torch.device) -> bool:
    """The torch backend's FP8 (torch._scaled_mm, e4m3 x e4m3 -> float32) runs on this device (probed once)."""
    return registry.why_not("fp8_matmul", "torch", torch.device(device)) is None


# ----------------------------------------------------------------------------- matmuls
def w8a8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, backend: str = "auto") -> torch.Tensor:
    """y = (xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias, float32 [M, N]: int8 x int8 ->
    int32 accumulation (exact), dequant and bias in the epilogue. xq [M, K], wq [N, K] int8."""
    return ops.w8a8_matmul(xq, x_scale, wq, w_scale, bias, backend=check_backend(backend))


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, backend: str = "auto",
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y = float32(xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias ([M, N] in out_dtype);
    xq [M, K], wq [N, K] float8_e4m3fn, scales float32 [M] and [N] (or [N, 1])."""
    return ops.fp8_matmul(xq, x_scale, wq, w_scale, bias, out_dtype=out_dtype, backend=check_backend(backend))


def w4a16_matmul(x: torch.Tensor, qw: F.QuantizedWeight, bias: torch.Tensor | None, backend: str = "auto",
                 packed: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x @ DT(q * s)^T + bias, x [M, K]; q the int4 weight qw (or `packed`, uint8 [N, Kp / 2] in
    qw's layout, e.g. probe weights), s qw.scale [N, Kp / G]. DT: x's dtype if fp16/bf16/fp32, else
    float32 (x is cast). out_dtype defaults to DT."""
    if qw.fmt != "int4":
        raise ValueError(f"w4a16_matmul needs an int4 weight, not {qw.fmt!r}")
    packed = qw.q if packed is None else packed
    if packed.dtype != torch.uint8 or packed.shape != qw.q.shape:
        raise ValueError(f"packed int4 weights must be uint8 {tuple(qw.q.shape)} like qw.q, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    return ops.w4a16_matmul(x, packed, qw.scale, qw.shape, qw.group_size, bias, out_dtype=out_dtype,
                            backend=check_backend(backend))


def pack_values_int4(qw: F.QuantizedWeight, vals: torch.Tensor) -> torch.Tensor:
    """Grid values int [N, K] (in -8..7) -> uint8 [N, Kp / 2] in qw's layout (padding columns 0)."""
    return N.pack_int4_padded(vals, qw.padded_k)
