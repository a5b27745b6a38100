"""Weight formats of zokernels.quant and quantization of a float weight into them.

    int8: q in [-127, 127] (int8), one scale per output row:      w ~ q * s_n,  s_n = amax_n / 127
    int4: q in [-7, 7], two per byte (uint8, element 2i in the low nibble), one scale per group of
          `group_size` consecutive input columns of a row:       w ~ q * s_{n,g}, s_{n,g} = amax / 7
    fp8 : q in float8_e4m3fn (|q| <= 448), one scale per row:     w ~ q * s_n,  s_n = amax_n / 448

The grids are symmetric (-127..127, -7..7): a perturbation +-d then has the same clamp on both sides.
int4 rows are zero-padded to a multiple of group_size (stored, never perturbed). Quantization rounds
x = w / s to nearest or stochastically; SR uniforms: stream STREAM_QUANT_SR (4), query 0, the weight's
key, element index j = n * K + k of the logical [N, K] weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import contract as C
from .. import numerics as N
from .. import ops
from ..ops.quant import check_format, padded_k

FORMATS = C.QUANT_FORMATS
QMAX = C.QMAX
GROUP_SIZES = (32, 64, 128)   # int4 groups quantize_weight accepts (the kernels take any positive even size)


@dataclass
class QuantizedWeight:
    """q: int8 [N, K] | uint8 [N, Kp / 2] (int4) | float8_e4m3fn [N, K]; scale: float32 [N, 1] or
    [N, Kp / group_size] (int4). shape = (N, K) logical."""

    fmt: str
    q: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]
    group_size: int = 0

    @property
    def padded_k(self) -> int:
        return self.q.shape[1] * 2 if self.fmt == "int4" else self.shape[1]

    @property
    def qmax(self) -> float:
        return QMAX[self.fmt]

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()


def compute_scale(w: torch.Tensor, fmt: str, group_size: int = 128) -> torch.Tensor:
    """float32 amax / qmax per row (int8, fp8) or per (row, group) (int4); all-zero blocks get 1."""
    w = w.detach().to(torch.float32)
    n, k = w.shape
    if fmt == "int4":
        kp = padded_k(k, fmt, group_size)
        w = torch.nn.functional.pad(w, (0, kp - k)).reshape(n, kp // group_size, group_size)
        amax = w.abs().amax(dim=2)
    else:
        amax = w.abs().amax(dim=1, keepdim=True)
    scale = amax / QMAX[fmt]
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def scale_full(qw: QuantizedWeight) -> torch.Tensor:
    """The scale of every logical element, float32 [N, K]."""
    n, k = qw.shape
    if qw.fmt == "int4":
        return N.group_scales(qw.scale, qw.group_size, k)
    return qw.scale.expand(n, k)


def values(qw: QuantizedWeight) -> torch.Tensor:
    """Grid values of the logical weight: int32 [N, K] (int formats) or float32 [N, K] (fp8)."""
    if qw.fmt == "int4":
        return N.unpack_int4(qw.q)[:, :qw.shape[1]].to(torch.int32)
    if qw.fmt == "int8":
        return qw.q.to(torch.int32)
    return qw.q.to(torch.float32)


def store_values_(qw: QuantizedWeight, vals: torch.Tensor) -> None:
    """Write grid values (already in range) back into qw.q, in place (int4: repack, padding stays 0)."""
    if qw.fmt == "int4":
        qw.q.copy_(N.pack_int4_padded(vals, qw.padded_k))
    elif qw.fmt == "int8":
        qw.q.copy_(vals.to(torch.int8))
    else:
        qw.q.copy_(vals.to(torch.float8_e4m3fn))


def to_grid(qw_or_fmt, x: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """Round float32 x onto the format's grid (clamped to +-qmax): stochastic if v is given, else RN.
    int formats -> int32, fp8 -> float32 e4m3 values."""
    fmt = qw_or_fmt.fmt if isinstance(qw_or_fmt, QuantizedWeight) else qw_or_fmt
    r = N.quantize_values(check_format(fmt), x, v)
    return r.to(torch.float32) if fmt == "fp8" else r


def dequantize(qw: QuantizedWeight, vals: torch.Tensor | None = None) -> torch.Tensor:
    """w = q * s in float32 [N, K] (of `vals` instead of the stored q if given)."""
    vals = values(qw) if vals is None else vals
    return vals.to(torch.float32) * scale_full(qw)


def quantize_weight(w: torch.Tensor, fmt: str, *, rounding: str = "nearest", seed: int = 0, key: int = 0,
                    group_size: int = 128, backend: str = "auto") -> QuantizedWeight:
    """Quantize a float weight [N, K]: q = R(w / s) clamped to the symmetric grid, s = compute_scale.
    R: nearest, or stochastic with the uniforms of (seed, STREAM_QUANT_SR, query 0, key, j = nK + k).
    The element math runs in the backend the registry picks for zokernels.ops.quant_quantize (`backend`)."""
    check_format(fmt)
    C.check_rounding(rounding)
    if w.ndim != 2:
        raise ValueError(f"quantize_weight takes a 2-d weight, got shape {tuple(w.shape)}")
    if fmt == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"quantize_weight: the weight has {bad} NaN/inf elements; a row's scale would be "
                         "inf or its values lost (fix the weights before quantizing)")
    n, k = w.shape
    group_size = group_size if fmt == "int4" else 0
    scale = compute_scale(w, fmt, group_size).contiguous()
    q = ops.quant_quantize(w, scale, fmt, group_size, rounding, seed, key, backend=backend)
    return QuantizedWeight(fmt, q, scale, (n, k), group_size)
