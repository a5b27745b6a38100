"""QuZO quantized-weight ops of the CUDA backend (csrc/zo_quant.cuh): one launch per weight and op.

The ops and their contract: zokernels/ops/quant.py (module docstring); element math: the reference backend's
quant.py (zokernels/numerics.py), reproduced bitwise. Saturation counts are added to the caller's int64 [1]
tensor with one atomic per warp (no host sync). Called with CPU tensors, the same element code runs on the host (tests).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..registry import register
from . import _DIST_TAG, _DTYPE_TAG, NAME, NOT_BUILT, _ext, missing_entry

_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.uint8: 4}  # QO_*; grid: QO_GRID
_quant_kernels = missing_entry("launch_quant", "QuZO quantized-weight")
_packed_out = missing_entry("QUANT_OUT_PACKED", "packed int4 probe output (quant_probe into uint8 [N, Kp/2])")


def _probe_supported(device: torch.device, call: dict) -> str | None:
    """supports() of quant_probe: the quant kernels, and for call out "packed-int4" the packed output."""
    return _quant_kernels(device, call) or (_packed_out(device, call) if call.get("out") == "packed-int4" else None)


def _geometry(q: torch.Tensor, scale: torch.Tensor, fmt: str, group_size: int) -> tuple[int, int, int]:
    """(storage bytes per row for int4 else 0, scale columns, group size for int4 else 1)."""
    if fmt == "int4":
        return q.shape[1], scale.shape[1], group_size
    return 0, scale.shape[1], 1


def _run(*, op: str, fmt: str, n: int, k: int, q: torch.Tensor, scale: torch.Tensor, group_size: int,
         seed: int, key: int, dist: str = "gaussian", out_kind: int = 0, w: torch.Tensor | None = None,
         stochastic: bool = False, paper: bool = False, out: torch.Tensor | None = None,
         saturated: torch.Tensor | None = None, query: int = 0, eps: float = 0.0, lr: float = 0.0, sign: int = 1,
         coeffs: torch.Tensor | None = None) -> None:
    if _ext is None:
        raise RuntimeError(NOT_BUILT)
    kb, scale_cols, group = _geometry(q, scale, fmt, group_size)
    args = (_ext.QUANT_OPS[op], _ext.QUANT_FORMATS[fmt], _DIST_TAG[dist], out_kind,
            _DTYPE_TAG[w.dtype] if w is not None else 0, stochastic, paper, n, k, kb, scale_cols, group,
            0 if w is None else w.data_ptr(), q.data_ptr(), scale.data_ptr(), 0 if out is None else out.data_ptr(),
            0 if saturated is None else saturated.data_ptr(), seed, key, query, eps, lr, sign,
            0 if coeffs is None else coeffs.data_ptr(), 0 if coeffs is None else coeffs.numel())
    device = q.device
    if device.type == "cpu":
        _ext.host_quant(*args)
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        _ext.launch_quant(*args, index, torch.cuda.current_stream(device).cuda_stream)


@register("quant_quantize", NAME, supports=_quant_kernels)
def quant_quantize(w: torch.Tensor, scale: torch.Tensor, fmt: str, group_size: int, rounding: str, seed: int,
                   key: int, out: torch.Tensor) -> None:
    """out <- storage of R(w / s) (nearest or SR with STREAM_QUANT_SR, query 0); int4 padding nibbles 0."""
    n, k = w.shape
    _run(op="quantize", fmt=fmt, n=n, k=k, q=out, scale=scale, group_size=group_size, seed=seed, key=key,
         w=w, stochastic=rounding == "stochastic")


@register("quant_probe", NAME, supports=_probe_supported)
def quant_probe(q: torch.Tensor, scale: torch.Tensor, fmt: str, shape: tuple[int, int], group_size: int,
                seed: int, key: int, query: int, eps: float, sign: int, dist: str, out: torch.Tensor,
                saturated: torch.Tensor) -> None:
    """out <- probe weights of (query, sign) (grid values, dequantized, or int4 packed into uint8 [N, Kp/2]);
    saturated += clamped elements."""
    n, k = shape
    out_kind = _OUT_KIND.get(out.dtype, _ext.QUANT_OUT_GRID if _ext is not None else 3)
    _run(op="probe", fmt=fmt, n=n, k=k, q=q, scale=scale, group_size=group_size, seed=seed, key=key, dist=dist,
         out_kind=out_kind, out=out, saturated=saturated, query=query, eps=eps, sign=sign)


@register("quant_update_", NAME, supports=_quant_kernels)
def quant_update_(q: torch.Tensor, scale: torch.Tensor, fmt: str, shape: tuple[int, int], group_size: int,
                  seed: int, key: int, coeffs: Sequence[float], lr: float, eps: float, form: str, dist: str,
                  saturated: torch.Tensor) -> None:
    """q <- Q(q - x) in place (x of form single | paper, queries looped inside); saturated += clamped."""
    n, k = shape
    c = torch.tensor(list(coeffs), dtype=torch.float32).to(q.device) if coeffs else None
    _run(op="update", fmt=fmt, n=n, k=k, q=q, scale=scale, group_size=group_size, seed=seed, key=key, dist=dist,
         paper=form == "paper", saturated=saturated, eps=eps, lr=lr, coeffs=c)
