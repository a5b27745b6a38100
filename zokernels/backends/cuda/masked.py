"""Masked ops of the CUDA backend (MaZO): one launch per (op, group), whatever the mix of mask formats.

Table: int64 [T, MASK_COLS] (csrc/zo_masked.cuh): the dense row (ptr, out, numel, key, offset, first chunk,
lr|wd bits) then index ptr, format | int32-index << 8, k, ncols, npb, block, work items. Work items:
rows = one element per index entry; blocks = npb Philox blocks per entry (npb = B/4 when every run starts
and ends on a 4-element boundary, else (B + 2) // 4 + 1, the most blocks a run of B columns can span);
bits = the tensor's Philox blocks. Masks are duck-typed (kind, shape, index, block; zokernels.mazo.masks).
Called with CPU tensors, the kernels' grid runs on the host (tests); zokernels.ops never routes CPU here.
"""
from __future__ import annotations

import torch

from ... import contract as C
from .._common import Group, UpdateSpec, chunk_table
from ..registry import register
from . import missing_entry, _DIST_TAG, _DTYPE_TAG, LAUNCHES, NOT_BUILT, _ext, _f32_bits, _signed64, _tables



def _geometry(mask, offset: int, numel: int) -> tuple[int, int, int, int, int]:
    """(format, k, ncols, npb, work items) of a mask on a tensor at `offset`."""
    fmt = _ext.MASK_FORMATS[mask.kind]
    ncols = C.matrix_shape(mask.shape)[1]
    if mask.kind == "bits":
        items = ((offset + numel - 1) >> 2) - (offset >> 2) + 1 if numel else 0
        return fmt, 0, ncols, 1, items
    k = int(mask.index.shape[1])
    if mask.kind == "rows":
        return fmt, k, ncols, 1, mask.index.numel()
    b = int(mask.block)
    aligned = offset % 4 == 0 and ncols % 4 == 0 and b % 4 == 0
    npb = b // 4 if aligned else (b + 2) // 4 + 1
    return fmt, k, ncols, npb, mask.index.numel() * npb


def _rows(tensors, outs, masks, keys, offsets, lrs, wds) -> tuple:
    rows = []
    for i, (t, m, key, off) in enumerate(zip(tensors, masks, keys, offsets)):
        fmt, k, ncols, npb, items = _geometry(m, off, t.numel())
        if not items or not t.numel():
            continue
        if m.index.dtype not in (torch.int16, torch.int32, torch.uint8) or not m.index.is_contiguous():
            raise ValueError(f"mask {i}: index must be a contiguous int16/int32 (rows, blocks) or uint8 (bits) "
                             f"tensor, got {m.index.dtype}")
        dst = outs[i] if outs is not None else t
        lr = lrs[i] if lrs else 0.0
        wd = wds[i] if wds else 0.0
        rows.append((t.data_ptr(), dst.data_ptr(), t.numel(), _signed64(key), off,
                     _signed64(_f32_bits(lr) | _f32_bits(wd) << 32), m.index.data_ptr(),
                     fmt | (256 if m.index.dtype == torch.int32 else 0), k, ncols, npb, int(m.block), items))
    return tuple(rows)


def _table(device: torch.device, rows: tuple) -> tuple[torch.Tensor, int]:
    """(int64 [T, MASK_COLS] table on `device`, CUDA blocks), cached like the dense tables."""
    def build():
        firsts, chunks = chunk_table([(0, r[-1]) for r in rows], _ext.MASK_CHUNK_ITEMS)
        flat = []
        for (src, dst, numel, key, off, lr_wd, idx, fmt, k, ncols, npb, block, items), first in zip(rows, firsts):
            flat += [src, dst, numel, key, off, first, lr_wd, idx, fmt, k, ncols, npb, block, items, 0, 0]
        return torch.tensor(flat, dtype=torch.int64).view(-1, _ext.MASK_COLS).to(device), chunks.shape[0]

    return _tables.get(("masked", device, rows), build)


def _launch(name: str, op: str, group: Group, masks: list, outs, dist: str, stochastic: bool, *, seed: int,
            scale: float = 0.0, query: int = 0, sr_stream: int = 0, spec: UpdateSpec | None = None) -> None:
    if _ext is None:
        raise RuntimeError(NOT_BUILT)
    rows = _rows(group.tensors, outs, masks, group.keys, group.offsets, group.lrs, group.wds)
    if not rows:
        return
    device = group.device
    table, chunks = _table(device, rows)
    coeffs = None
    restore_scale, restore_query = None, 0
    if spec is not None:
        coeffs = torch.tensor(spec.coeffs, dtype=torch.float32).to(device) if spec.coeffs else None
        restore_scale, restore_query = spec.restore_scale, spec.restore_query
    args = (_ext.OPS[op], _DTYPE_TAG[group.dtype], _DIST_TAG[dist], bool(stochastic and group.dtype != torch.float32),
            table.data_ptr(), len(rows), chunks, seed, scale, query, sr_stream,
            0 if coeffs is None else coeffs.data_ptr(), 0 if coeffs is None else coeffs.numel(),
            restore_scale is not None, restore_scale or 0.0, restore_query)
    if device.type == "cpu":
        _ext.host_masked_launch(*args)
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        _ext.launch_masked(*args, index, torch.cuda.current_stream(device).cuda_stream)
    LAUNCHES[name] += 1


_masked_kernels = missing_entry("launch_masked", "masked (MaZO)")


@register("masked_perturb_", "cuda", supports=_masked_kernels)
@register("masked_perturbed_copy", "cuda", supports=_masked_kernels)
def masked_perturb_(group: Group, masks: list, outs: list[torch.Tensor] | None, seed: int, scale: float,
                    query: int, dist: str, rounding: str, sr_stream: int) -> None:
    """dst[m] = R(theta[m] + scale * z_query[m]) on masked m; dst = theta (outs None) or outs[i]."""
    _launch("masked_perturb_", "perturb", group, masks, outs, dist, rounding == "stochastic", seed=seed,
            scale=scale, query=query, sr_stream=sr_stream)


@register("masked_zo_update_", "cuda", supports=_masked_kernels)
def masked_zo_update_(group: Group, masks: list, spec: UpdateSpec) -> None:
    """theta[m] <- R(theta'[m] - lr (sum_q c_q z_q[m] + wd theta'[m])) on masked m; one launch per group."""
    _launch("masked_zo_update_", "zo_update", group, masks, None, spec.dist, spec.rounding == "stochastic",
            seed=spec.seed, sr_stream=spec.sr_stream, spec=spec)
