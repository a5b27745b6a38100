"""Quantized matmuls of QuantLinear's forward paths and their backend choice.

    W8A8 (int8 weights)  : zokernels.quant.ops.w8a8_matmul (re-exported here)
    FP8  (e4m3 weights)  : xq = RN_e4m3(x / s_m), s_m = amax_m / 448 (SR_e4m3 with uniforms v if given);
                           y = float32(sum_k xq[m, k] wq[n, k]) * s_m * s_n + b[n]
    W4A16 (int4 weights) : y = x @ DT(q * s)^T + b, DT the activation dtype (fp16 / bf16 / fp32),
                           float32 accumulation; the dequantized weight exists one tile at a time (triton)

Backends (an explicit `backend=` argument, "auto" picks):
    fp8  : "triton" (e4m3 tl.dot, sm_89+ or the interpreter), "torch" (torch._scaled_mm with unit
           scales and float32 output, then the same float32 epilogue; CUDA sm_89+ or CPU),
           "reference" (exact: e4m3 products summed in float64, then the float32 epilogue).
           auto: triton on CUDA when usable, else torch._scaled_mm when it works, else reference.
    w4a16: "triton", "torch" (dequantize the whole weight to DT and torch.matmul in DT: the fallback
           on a GPU without triton; holds one layer's dequantized weight), "reference" (float32
           dequant + float32 matmul, any activation dtype). auto: triton on CUDA when usable, torch
           on other GPUs, reference on CPU.
No silent fallback: a backend named explicitly either runs or raises with the reason.
"""
from __future__ import annotations

import torch

from . import formats as F
from . import reference as R
from .ops import activation_uniforms, choose_matmul, int_mm_available, quantize_activations, w8a8_matmul
from .triton_linear import check_operands  # imports no triton (the kernels are built on first use)

FP8_BACKENDS = ("auto", "reference", "torch", "triton")
W4A16_BACKENDS = ("auto", "reference", "torch", "triton")

__all__ = ["FP8_BACKENDS", "W4A16_BACKENDS", "activation_uniforms", "choose_fp8_backend", "choose_matmul",
           "choose_w4a16_backend", "fp8_matmul", "int_mm_available", "quantize_activations",
           "quantize_activations_fp8", "scaled_mm_available", "w4a16_matmul", "w8a8_matmul"]


# ----------------------------------------------------------------------------- FP8
def quantize_activations_fp8(x: torch.Tensor, v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3: s_m = amax_m / 448 (1 where 0), xq = RN_e4m3(x / s_m) (SR_e4m3 with uniforms v [M, K]).
    Returns (float8_e4m3fn [M, K], float32 [M])."""
    x = x.to(torch.float32)
    s = x.abs().amax(dim=1) / R.E4M3_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    y = x / s[:, None]
    q = R.sr_to_e4m3(y, v) if v is not None else R.rn_to_e4m3(y)
    return q, s


_scaled_mm_ok: dict = {}


def _pad_fp8(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad an e4m3 matrix (through its uint8 view: pad is not implemented for float8 everywhere)."""
    r, c = t.shape
    if (r, c) == (rows, cols):
        return t
    return torch.nn.functional.pad(t.view(torch.uint8), (0, cols - c, 0, rows - r)).view(torch.float8_e4m3fn)


def _torch_scaled_mm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """float32 sum_k xq[m, k] wq[n, k] via torch._scaled_mm (unit tensor-wise scales, float32 output).
    On CUDA K and N must be multiples of 16: zero-pad (zeros add nothing to the sums)."""
    m, k = xq.shape
    n = wq.shape[0]
    if xq.is_cuda:
        kp, np_ = -(-k // 16) * 16, -(-n // 16) * 16
        xq, wq = _pad_fp8(xq, m, kp), _pad_fp8(wq, np_, kp)
    one = torch.ones((), dtype=torch.float32, device=xq.device)
    out = torch._scaled_mm(xq.contiguous(), wq.contiguous().t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return out[:, :n]


def scaled_mm_available(device: torch.device) -> bool:
    """torch._scaled_mm runs e4m3 x e4m3 -> float32 on this device type (probed once, cached)."""
    device = torch.device(device)
    key = (device.type, torch.cuda.get_device_capability(device) if device.type == "cuda" else None)
    if key not in _scaled_mm_ok:
        try:
            a = torch.full((16, 16), 2.0, device=device).to(torch.float8_e4m3fn)
            _scaled_mm_ok[key] = bool((_torch_scaled_mm(a, a) == 64.0).all())
        except Exception:  # noqa: BLE001 — any failure means: not on this build/device
            _scaled_mm_ok[key] = False
    return _scaled_mm_ok[key]


def _triton_reason(device: torch.device, kind: str) -> str | None:
    from . import triton_linear
    return triton_linear.unavailable_reason(device, kind)


def choose_fp8_backend(device: torch.device, backend: str = "auto") -> str:
    if backend not in FP8_BACKENDS:
        raise ValueError(f"fp8 matmul backend must be one of {FP8_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    device = torch.device(device)
    if device.type == "cuda" and _triton_reason(device, "fp8") is None:
        return "triton"
    return "torch" if scaled_mm_available(device) else "reference"


def _epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """acc * s_m * s_n + b in float32, the Triton kernels' operation order."""
    y = acc.to(torch.float32) * x_scale.to(torch.float32)[:, None] * w_scale.to(torch.float32).reshape(1, -1)
    return y + bias.to(torch.float32) if bias is not None else y


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, backend: str = "auto",
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y = float32(xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias ([M, N] in out_dtype);
    xq [M, K], wq [N, K] float8_e4m3fn, scales float32 [M] and [N] (or [N, 1])."""
    if xq.dtype != torch.float8_e4m3fn or wq.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8_matmul takes float8_e4m3fn operands, got {xq.dtype} and {wq.dtype}")
    if wq.ndim != 2:
        raise ValueError(f"expected a weight [N, K], got shape {tuple(wq.shape)}")
    check_operands(xq, wq.shape[1], wq.shape[0], x_scale, wq, w_scale, bias)
    which = choose_fp8_backend(xq.device, backend)
    if which == "triton":
        reason = _triton_reason(xq.device, "fp8")
        if reason is not None:
            raise RuntimeError(f"fp8 matmul backend 'triton' unavailable: {reason}")
        from . import triton_linear
        return triton_linear.fp8(xq, x_scale, wq, w_scale, bias, out_dtype=out_dtype)
    if which == "torch":
        if not scaled_mm_available(xq.device):
            raise RuntimeError(f"fp8 matmul backend 'torch': torch._scaled_mm does not run e4m3 on {xq.device} "
                               f"with torch {torch.__version__} (CUDA needs compute capability >= 8.9)")
        acc = _torch_scaled_mm(xq, wq)
    else:  # e4m3 products have <= 8 significant bits within 2^-18..2^18: float64 sums are exact for K < 2^17
        acc = xq.to(torch.float64) @ wq.to(torch.float64).t()
    return _epilogue(acc, x_scale, w_scale, bias).to(out_dtype)


# ----------------------------------------------------------------------------- W4A16
def choose_w4a16_backend(device: torch.device, backend: str = "auto") -> str:
    if backend not in W4A16_BACKENDS:
        raise ValueError(f"w4a16 matmul backend must be one of {W4A16_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    device = torch.device(device)
    if device.type == "cuda":
        return "triton" if _triton_reason(device, "w4a16") is None else "torch"
    return "reference"


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
    check_operands(x, qw.shape[1], qw.shape[0], None, packed, qw.scale, bias)
    dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    x = x.to(dt)
    out_dtype = dt if out_dtype is None else out_dtype
    which = choose_w4a16_backend(x.device, backend)
    if which == "triton":
        reason = _triton_reason(x.device, "w4a16")
        if reason is not None:
            raise RuntimeError(f"w4a16 matmul backend 'triton' unavailable: {reason}")
        from . import triton_linear
        return triton_linear.w4a16(x, packed, qw.scale, qw.group_size, bias, out_dtype=out_dtype)
    n, k = qw.shape
    vals = R.unpack_int4(packed)[:, :k]
    w = vals.to(torch.float32) * F.scale_full(qw)
    if which == "torch":
        y = (x @ w.to(dt).t()).to(torch.float32)
    else:
        y = x.to(torch.float32) @ w.t()
    return (y + bias.to(torch.float32) if bias is not None else y).to(out_dtype)


def pack_values_int4(qw: F.QuantizedWeight, vals: torch.Tensor) -> torch.Tensor:
    """Grid values int [N, K] (in -8..7) -> uint8 [N, Kp / 2] in qw's layout (padding columns 0)."""
    full = torch.nn.functional.pad(vals.to(torch.int32), (0, qw.padded_k - qw.shape[1]))
    return R.pack_int4(full)
