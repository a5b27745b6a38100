"""The quantized matmuls through torch's vendor kernels (the ops and their contract: zokernels/ops/matmul.py).

    w8a8 : torch._int_mm (cuBLASLt int8 on CUDA) -> int32, then the float32 epilogue in torch
    fp8  : torch._scaled_mm with unit tensor-wise scales and float32 output, then the same epilogue
    w4a16: the whole weight dequantized to the activation dtype DT (held for the call), torch.matmul in DT

Whether torch._int_mm / torch._scaled_mm run on a device is probed once per device type (CUDA: per compute
capability) by running them on the layout the matmuls use; `supports` returns the probe's reason.
"""
from __future__ import annotations

import torch

from ... import numerics as N
from ..registry import register
from . import NAME

_probed: dict = {}


def _probe(what: str, key, fn) -> str | None:
    """fn() -> None or the reason, run once per (what, key); an exception is the reason."""
    if (what, key) not in _probed:
        try:
            _probed[(what, key)] = fn()
        except Exception as e:  # noqa: BLE001 — any failure means: not on this build / device
            _probed[(what, key)] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return _probed[(what, key)]


def _device_key(device: torch.device):
    return (device.type, torch.cuda.get_device_capability(device) if device.type == "cuda" else None)


# ----------------------------------------------------------------------------- W8A8
def int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ w [N, K]^T with torch._int_mm -> int32 [M, N]. On CUDA the weight goes in as the transposed
    view w.t() (column-major [K, N]: cuBLASLt's "TN" int8 layout, the one PyTorch tests on CUDA 13; a
    row-major copy would be "NN", which CUDA 13's cuBLAS does not offer), with M > 16 and K, N multiples of 8
    by zero padding (of w itself, so the view stays column-major)."""
    m, k = a.shape
    n = w.shape[0]
    if a.is_cuda:
        mp, kp, np_ = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
        if (mp, kp, np_) != (m, k, n):
            a = torch.nn.functional.pad(a, (0, kp - k, 0, mp - m))
            w = torch.nn.functional.pad(w, (0, kp - k, 0, np_ - n))
        return torch._int_mm(a, w.t())[:m, :n]
    return torch._int_mm(a, w.t())


def _int_mm_reason(device: torch.device) -> str | None:
    a = torch.ones(17, 8, dtype=torch.int8, device=device)  # the layout the matmuls use, unpadded
    ok = bool((int_mm(a, torch.ones(8, 8, dtype=torch.int8, device=device)) == 8).all())
    return None if ok else "returned wrong sums"


def int_mm_unsupported(device: torch.device, call: dict) -> str | None:
    """supports() of W8A8: None if torch._int_mm runs int8 x int8 -> int32 here, else why not."""
    reason = _probe("int_mm", _device_key(device), lambda: _int_mm_reason(device))
    return None if reason is None else (f"torch._int_mm does not run int8 x int8 on {device.type} with torch "
                                        f"{torch.__version__} ({reason})")


@register("w8a8_matmul", NAME, supports=int_mm_unsupported)
def w8a8_matmul(xq, x_scale, wq, w_scale, bias, out_dtype) -> torch.Tensor:
    return N.matmul_epilogue(int_mm(xq, wq), x_scale, w_scale, bias).to(out_dtype)


# ----------------------------------------------------------------------------- FP8
def _pad_fp8(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad an e4m3 matrix (through its uint8 view: pad is not implemented for float8 everywhere)."""
    r, c = t.shape
    if (r, c) == (rows, cols):
        return t
    return torch.nn.functional.pad(t.view(torch.uint8), (0, cols - c, 0, rows - r)).view(torch.float8_e4m3fn)


def scaled_mm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
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


def _scaled_mm_reason(device: torch.device) -> str | None:
    a = torch.full((16, 16), 2.0, device=device).to(torch.float8_e4m3fn)
    return None if bool((scaled_mm(a, a) == 64.0).all()) else "returned wrong sums"


def scaled_mm_unsupported(device: torch.device, call: dict) -> str | None:
    """supports() of FP8: None if torch._scaled_mm runs e4m3 x e4m3 -> float32 here, else why not."""
    reason = _probe("scaled_mm", _device_key(device), lambda: _scaled_mm_reason(device))
    if reason is None:
        return None
    need = " (CUDA needs compute capability >= 8.9)" if device.type == "cuda" else ""
    return f"torch._scaled_mm does not run e4m3 on {device.type} with torch {torch.__version__}{need}: {reason}"


@register("fp8_matmul", NAME, supports=scaled_mm_unsupported)
def fp8_matmul(xq, x_scale, wq, w_scale, bias, out_dtype) -> torch.Tensor:
    return N.matmul_epilogue(scaled_mm(xq, wq), x_scale, w_scale, bias).to(out_dtype)


# ----------------------------------------------------------------------------- W4A16
@register("w4a16_matmul", NAME)
def w4a16_matmul(x, packed, scale, k, group_size, bias, out_dtype) -> torch.Tensor:
    w = N.dequantize_int4(packed, scale, group_size, k).to(x.dtype)
    y = (x @ w.t()).to(torch.float32)
    return (y + bias if bias is not None else y).to(out_dtype)
