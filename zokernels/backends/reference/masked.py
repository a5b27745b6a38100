"""Masked ops of the reference backend (MaZO): the dense contract's math at a gathered set of
element indices, chunked by mask entries. Masks are duck-typed (kind, shape, index, block):

    rows:   j_local = r * ncols + index[r, i]
    blocks: j_local = r * ncols + index[r, i] * block + u, u < block, column < ncols
    bits:   j_local = e where bit (e & 7) of index[e >> 3] is set

and j = offset + j_local. z(j) takes Philox block j >> 2, lane j & 3 — the value the dense ops give.
"""
from __future__ import annotations

import math

import torch

from ... import contract as C
from .._common import Group, UpdateSpec
from ..registry import register
from .philox import box_muller, half_open_unit, philox4x32, round_to, zo_updated  # the package's `philox` is the op

CHUNK = 1 << 20  # masked elements per chunk



def mask_chunks(mask):
    """int64 local flat indices of the masked elements, ascending, in chunks of ~CHUNK."""
    rows, ncols = C.matrix_shape(mask.shape)
    idx = mask.index
    dev = idx.device
    if mask.kind == "rows":
        k = idx.shape[1]
        step = max(1, CHUNK // max(k, 1))
        for r0 in range(0, rows, step):
            r = torch.arange(r0, min(rows, r0 + step), dtype=torch.int64, device=dev)[:, None]
            yield (r * ncols + idx[r0:r0 + step].to(torch.int64)).reshape(-1)
    elif mask.kind == "blocks":
        kb, block = idx.shape[1], mask.block
        step = max(1, CHUNK // max(kb * block, 1))
        u = torch.arange(block, dtype=torch.int64, device=dev)
        for r0 in range(0, rows, step):
            r = torch.arange(r0, min(rows, r0 + step), dtype=torch.int64, device=dev)[:, None, None]
            cols = idx[r0:r0 + step].to(torch.int64)[:, :, None] * block + u
            j = r * ncols + cols
            yield j[(cols < ncols).expand_as(j)]
    elif mask.kind == "bits":
        shifts = torch.arange(8, dtype=torch.int32, device=dev)
        n = math.prod(mask.shape)
        for b0 in range(0, idx.numel(), CHUNK // 8):
            bits = ((idx[b0:b0 + CHUNK // 8].to(torch.int32)[:, None] >> shifts) & 1).reshape(-1)
            e = bits.nonzero().reshape(-1) + b0 * 8
            yield e[e < n]
    else:
        raise ValueError(f"unknown mask kind {mask.kind!r}")


def _words(j: torch.Tensor, seed: int, key: int, query: int, stream: int):
    """Philox words (R0..R3) of the blocks j >> 2 (one call per element)."""
    b = j >> 2
    c0 = b & C.MASK32
    c1 = ((b >> 32) & 0xFFFF) | ((query << 16) | (stream << 28))
    c2 = torch.full_like(b, key & C.MASK32)
    c3 = torch.full_like(b, (key >> 32) & C.MASK32)
    k0, k1 = C.philox_key(seed)
    return philox4x32(c0, c1, c2, c3, k0, k1)


def z_at(j: torch.Tensor, seed: int, key: int, query: int, stream: int, dist: str) -> torch.Tensor:
    """float32 z of global indices j (int64): lanes 0, 1 from Box-Muller of (R0, R1), 2, 3 of (R2, R3)."""
    r0, r1, r2, r3 = _words(j, seed, key, query, stream)
    lane = j & 3
    if dist == "gaussian":
        low = lane < 2
        za, zb = box_muller(torch.where(low, r0, r2), torch.where(low, r1, r3))
        return torch.where((lane & 1) == 0, za, zb)
    r = torch.where(lane == 0, r0, torch.where(lane == 1, r1, torch.where(lane == 2, r2, r3)))
    return (1 - 2 * (r >> 31)).to(torch.float32)


def uniform_at(j: torch.Tensor, seed: int, key: int, query: int, stream: int) -> torch.Tensor:
    r0, r1, r2, r3 = _words(j, seed, key, query, stream)
    lane = j & 3
    r = torch.where(lane == 0, r0, torch.where(lane == 1, r1, torch.where(lane == 2, r2, r3)))
    return half_open_unit(r)


@register("masked_perturb_", "reference")
@register("masked_perturbed_copy", "reference")
def masked_perturb_(group: Group, masks: list, outs: list[torch.Tensor] | None, seed: int, scale: float,
                    query: int, dist: str, rounding: str, sr_stream: int) -> None:
    """dst[m] = R(theta[m] + scale * z_query[m]); dst = theta (outs None) or outs[i]."""
    for i, (t, key, off, mask) in enumerate(zip(group.tensors, group.keys, group.offsets, masks)):
        src = t.view(-1)
        dst = src if outs is None else outs[i].view(-1)
        for loc in mask_chunks(mask):
            if not loc.numel():
                continue
            j = loc + off
            x = src[loc].to(torch.float32) + z_at(j, seed, key, query, C.STREAM_Z, dist) * scale
            dst[loc] = round_to(x, t.dtype, rounding, lambda: uniform_at(j, seed, key, query, sr_stream))


@register("masked_zo_update_", "reference")
def masked_zo_update_(group: Group, masks: list, spec: UpdateSpec) -> None:
    for t, key, off, lr, wd, mask in zip(group.tensors, group.keys, group.offsets, group.lrs, group.wds, masks):
        flat = t.view(-1)
        for loc in mask_chunks(mask):
            if not loc.numel():
                continue
            j = loc + off
            new = zo_updated(flat[loc].to(torch.float32), lambda q: z_at(j, spec.seed, key, q, C.STREAM_Z, spec.dist),
                             spec.coeffs, lr, wd, spec.restore_scale, spec.restore_query)
            flat[loc] = round_to(new, t.dtype, spec.rounding,
                                   lambda: uniform_at(j, spec.seed, key, 0, spec.sr_stream))
