"""QuZO quantized-weight ops of the Triton backend: host side (kernels: quant_kernels.py, imported lazily).

The ops and their contract: zokernels/ops/quant.py (module docstring); element math: the reference
backend's quant.py (zokernels/numerics.py), reproduced bitwise. One launch per weight and op; saturation
counts are atomically added to the caller's int64 [1] tensor (no host sync).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ... import contract as C
from ... import numerics as N
from ..registry import register
from . import _KIND, NAME, _c1_high, _i32, _launch, _pointer, _seed_words, kernels_module

FMT = {"int8": 0, "int4": 1, "fp8": 2}
OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3, torch.float8_e4m3fn: 4,
            torch.uint8: 5}
# Philox rows per program (tile of 4 * BLOCKS elements; int4 writes: 4 * BLOCKS bytes). GPU: not yet measured
# on a GPU; smaller than the dense kernels' 512 because
# the update keeps several Philox states live per element. Interpreter: big tiles are faster.
BLOCKS_GPU = 256
BLOCKS_INTERPRETER = 1024

def _kernels():
    return kernels_module("quant_kernels")


def _blocks(device: torch.device, numel: int) -> int:
    """Philox rows per program; the interpreter's cost grows with the tile, so small weights get small tiles
    there (on the GPU one fixed tile: each BLOCKS value is another compiled kernel)."""
    if device.type != "cpu":
        return BLOCKS_GPU
    return min(BLOCKS_INTERPRETER, 1 << max(0, (-(-numel // 4) - 1).bit_length()))


def _key_words(key: int) -> tuple[int, int]:
    return _i32(key & C.MASK32), _i32(key >> 32)


def _storage(t: torch.Tensor) -> torch.Tensor:
    """fp8 as uint8 bit patterns, bfloat16 as int16 (exact loads/stores in the interpreter too)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else _pointer(t)


def _geometry(q: torch.Tensor, scale: torch.Tensor, fmt: str, group_size: int) -> tuple[int, int, int]:
    """(bytes per storage row (int4) or 0, scale columns, GROUP constexpr)."""
    kb = q.shape[1] if fmt == "int4" else 0
    return kb, scale.shape[1], (group_size if fmt == "int4" else 1)


def _tile_programs(numel: int, blocks: int) -> int:
    rows = -(-numel // 4)
    return -(-rows // blocks)


def _write_programs(fmt: str, n: int, k: int, kb: int, blocks: int) -> tuple[int, bool]:
    """(programs, QUAD) of the ops that write the storage (quantize, update): int4 with K % 4 != 0 takes the
    byte-pair layout (4 * blocks storage bytes per program), everything else the tile."""
    quad = fmt == "int4" and k % 4 == 0
    if fmt == "int4" and not quad:
        return -(-(n * kb) // (4 * blocks)), quad
    return _tile_programs(n * k, blocks), quad


@register("quant_quantize", NAME)
def quant_quantize(w: torch.Tensor, scale: torch.Tensor, fmt: str, group_size: int, rounding: str, seed: int,
                   key: int, out: torch.Tensor) -> None:
    """out <- storage of R(w / s) (nearest or SR with STREAM_QUANT_SR, query 0); int4 padding nibbles 0."""
    qk = _kernels()
    n, k = w.shape
    kb, scols, group = _geometry(out, scale, fmt, group_size)
    blocks = _blocks(w.device, n * k)
    programs, quad = _write_programs(fmt, n, k, kb, blocks)
    if programs == 0:
        return
    if quad and kb * 2 > k:
        out[:, k // 2:].zero_()   # padding bytes: the tile path writes only the bytes of real columns
    _launch(qk.quantize_kernel, (programs,), w.device, _pointer(w), scale, _storage(out), n, k, kb, scols,
            *_seed_words(seed), *_key_words(key), _c1_high(0, C.STREAM_QUANT_SR),
            QMAX=C.QMAX[fmt], FMT=FMT[fmt], GROUP=group, KIND=_KIND[w.dtype], STOCHASTIC=rounding == "stochastic",
            QUAD=quad, BLOCKS=blocks)


@register("quant_probe", NAME)
def quant_probe(q: torch.Tensor, scale: torch.Tensor, fmt: str, shape: tuple[int, int], group_size: int,
                seed: int, key: int, query: int, eps: float, sign: int, dist: str, out: torch.Tensor,
                saturated: torch.Tensor) -> None:
    """out <- probe weights of (query, sign) (grid values, dequantized, or int4 packed into uint8 [N, Kp/2]);
    saturated += clamped elements. Packed int4 with K % 4 != 0: int8 grid values, then packed in torch."""
    qk = _kernels()
    n, k = shape
    kb, scols, group = _geometry(q, scale, fmt, group_size)
    blocks = _blocks(q.device, n * k)
    programs = _tile_programs(n * k, blocks)
    if programs == 0:
        return
    if out.dtype == torch.uint8:
        if k % 4:
            vals = torch.empty(shape, dtype=torch.int8, device=q.device)
            quant_probe(q, scale, fmt, shape, group_size, seed, key, query, eps, sign, dist, vals, saturated)
            out.copy_(N.pack_int4_padded(vals, 2 * kb))
            return
        if 2 * kb > k:
            out[:, k // 2:].zero_()   # padding bytes: the tile writes only the bytes of real columns
    _launch(qk.probe_kernel, (programs,), q.device, _storage(q), scale, _storage(out), saturated, n, k, kb, scols,
            *_seed_words(seed), *_key_words(key), _c1_high(query, C.STREAM_Z),
            _c1_high(query, C.STREAM_QUZO_PROBE), C.round_f32(eps), int(sign),
            QMAX=C.QMAX[fmt], FMT=FMT[fmt], GROUP=group, OUT=OUT_KIND[out.dtype], GAUSSIAN=dist == "gaussian",
            BLOCKS=blocks)


@register("quant_update_", NAME)
def quant_update_(q: torch.Tensor, scale: torch.Tensor, fmt: str, shape: tuple[int, int], group_size: int,
                  seed: int, key: int, coeffs: Sequence[float], lr: float, eps: float, form: str, dist: str,
                  saturated: torch.Tensor) -> None:
    """q <- Q(q - x) in place (x of form single | paper, queries looped inside); saturated += clamped."""
    qk = _kernels()
    n, k = shape
    kb, scols, group = _geometry(q, scale, fmt, group_size)
    blocks = _blocks(q.device, n * k)
    programs, quad = _write_programs(fmt, n, k, kb, blocks)
    if programs == 0:
        return
    c = torch.tensor(list(coeffs) or [0.0], dtype=torch.float32).to(q.device)
    _launch(qk.update_kernel, (programs,), q.device, _storage(q), scale, c, saturated, len(coeffs), n, k, kb, scols,
            *_seed_words(seed), *_key_words(key), _c1_high(0, C.STREAM_UPDATE_SR), C.round_f32(lr),
            C.round_f32(eps),
            QMAX=C.QMAX[fmt], FMT=FMT[fmt], GROUP=group, PAPER=form == "paper", GAUSSIAN=dist == "gaussian",
            QUAD=quad, BLOCKS=blocks)
