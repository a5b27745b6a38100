"""Masked ops of the Triton backend (MaZO): host side. Kernels: masked_kernels.py (imported lazily).

A Group's tensors are split into launch sets by mask format, index dtype and (block masks) run
geometry; one launch per set, tensors addressed from one base pointer plus int64 deltas, as in the
dense kernels. Masks are duck-typed (kind, shape, index, block; see zokernels.mazo.masks).
"""
from __future__ import annotations

import torch

from ... import contract as C
from .._common import Group, UpdateSpec, chunk_table, philox_span
from ..registry import register
from . import _KIND, _c1_high, _cached, _deltas, _i64, _launch, _lr_wd, _pointer, _seed_words, kernels_module

FORMATS = {"rows": 0, "blocks": 1, "bits": 2}
# Elements per program (rows), Philox rows per tile (blocks, bits). GPU values are not yet measured
# on a GPU; the interpreter prefers big tiles (fixed cost per tile operation).
BLOCKS_GPU = {0: 1024, 1: 512, 2: 512}
BLOCKS_INTERPRETER = {0: 4096, 1: 1024, 2: 1024}

def _kernels():
    return kernels_module("masked_kernels")



def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _geometry(mask, offset: int) -> tuple[int, int, int, bool]:
    """(FORMAT, NPB, BCOLS, quad runs) of a mask on a tensor at `offset`; quad runs (block masks only): every
    run starts and ends on a Philox block boundary (offset, ncols, block multiples of 4)."""
    fmt = FORMATS[mask.kind]
    if fmt != 1:
        return fmt, 1, 1, False
    ncols = C.matrix_shape(mask.shape)[1]
    quads = offset % 4 == 0 and ncols % 4 == 0 and mask.block % 4 == 0
    return fmt, _next_pow2(-(-mask.block // 4) + (0 if quads else 1)), mask.block, quads


def _launch_sets(group: Group, masks: list):
    """{(FORMAT, NPB, BCOLS, quad runs, index dtype): [positions in the group]} for non-empty tensors."""
    sets: dict[tuple, list[int]] = {}
    for i, (t, m, off) in enumerate(zip(group.tensors, masks, group.offsets)):
        if t.numel() and m.index.numel():
            sets.setdefault(_geometry(m, off) + (m.index.dtype,), []).append(i)
    return sets


def _tables(tensors, masks, keys, offsets, outs, fmt: int, npb: int, blocks: int, quads: bool):
    """(tensor table [T, 8], chunk table [P, 2], programs, ALIGNED) for one launch set. ALIGNED: block runs on
    Philox block boundaries (quads) and every weight/out delta a multiple of 4 elements, so each Philox block is
    one aligned vector of the base pointer's alignment (sm_90 PTX: ld/st.global.v2 for bf16, no bar.sync;
    with scalar accesses the [BLOCKS, 4] tile is converted between register layouts through shared memory:
    23 bar.sync in masked perturb bf16, 31 in update)."""
    base = 0
    w_d = _deltas(tensors, base)
    i_d = _deltas([m.index for m in masks], base)
    o_d = _deltas(outs, base) if outs is not None else w_d
    rows = []
    for t, m, k, off, wd, idd, od in zip(tensors, masks, keys, offsets, w_d, i_d, o_d):
        nrows, ncols = C.matrix_shape(m.shape)
        if fmt == 2:
            kk, count = 1, t.numel()
        else:
            kk, count = int(m.index.shape[1]), m.index.numel()
        rows.append((wd, idd, kk, ncols, _i64(k), off, count, od))
    device = tensors[0].device
    rows = tuple(rows)

    def build():
        tab = torch.tensor(rows, dtype=torch.int64).reshape(-1, 8)
        if fmt == 2:  # bits: the tensor's Philox blocks
            _, chunks = chunk_table([philox_span(r[5], r[6]) for r in rows], blocks)
        else:         # rows: one element per index entry; blocks: npb Philox blocks per entry
            _, chunks = chunk_table([(0, r[6]) for r in rows], blocks if fmt == 0 else blocks // npb)
        aligned = quads and all(r[0] % 4 == 0 and r[7] % 4 == 0 for r in rows)
        return tab.to(device), chunks.to(device), chunks.shape[0], aligned

    return _cached(("masked", device, fmt, npb, blocks, quads, rows), build)


def _blocks(device: torch.device, fmt: int, npb: int) -> int:
    b = (BLOCKS_INTERPRETER if device.type == "cpu" else BLOCKS_GPU)[fmt]
    return max(b, npb)


@register("masked_perturb_", "triton")
@register("masked_perturbed_copy", "triton")
def masked_perturb_(group: Group, masks: list, outs: list[torch.Tensor] | None, seed: int, scale: float,
                    query: int, dist: str, rounding: str, sr_stream: int) -> None:
    """dst[m] = R(theta[m] + scale * z_query[m]) on masked m; dst = theta (outs None) or outs[i]."""
    mk = _kernels()
    device = group.device
    stochastic = rounding == "stochastic" and group.dtype != torch.float32
    for (fmt, npb, bcols, quads, _), pos in _launch_sets(group, masks).items():
        tensors = [group.tensors[i] for i in pos]
        ms = [masks[i] for i in pos]
        o = [outs[i] for i in pos] if outs is not None else None
        blocks = _blocks(device, fmt, npb)
        tab, chunks, programs, aligned = _tables(tensors, ms, [group.keys[i] for i in pos],
                                                 [group.offsets[i] for i in pos], o, fmt, npb, blocks, quads)
        if not programs:
            continue
        src = _pointer(tensors[0])
        dst = _pointer(o[0]) if o is not None else src
        _launch(mk.masked_perturb_kernel, (programs,), device, src, dst, ms[0].index, tab, chunks,
                *_seed_words(seed), _c1_high(query, C.STREAM_Z), _c1_high(query, sr_stream), float(scale),
                FORMAT=fmt, KIND=_KIND[group.dtype], GAUSSIAN=dist == "gaussian", STOCHASTIC=stochastic,
                COPY=o is not None, BLOCKS=blocks, NPB=npb, BCOLS=bcols, ALIGNED=aligned)


@register("masked_zo_update_", "triton")
def masked_zo_update_(group: Group, masks: list, spec: UpdateSpec) -> None:
    """theta[m] <- R(theta'[m] - lr (sum_q c_q z_q[m] + wd theta'[m])) on masked m; one launch per set."""
    mk = _kernels()
    device = group.device
    stochastic = spec.rounding == "stochastic" and group.dtype != torch.float32
    restore = spec.restore_scale is not None
    coeffs = torch.tensor(list(spec.coeffs) or [0.0], dtype=torch.float32, device=device)
    for (fmt, npb, bcols, quads, _), pos in _launch_sets(group, masks).items():
        tensors = [group.tensors[i] for i in pos]
        ms = [masks[i] for i in pos]
        blocks = _blocks(device, fmt, npb)
        tab, chunks, programs, aligned = _tables(tensors, ms, [group.keys[i] for i in pos],
                                                 [group.offsets[i] for i in pos], None, fmt, npb, blocks, quads)
        if not programs:
            continue
        lrwd = _lr_wd([group.lrs[i] for i in pos], [group.wds[i] for i in pos], device)
        _launch(mk.masked_update_kernel, (programs,), device, _pointer(tensors[0]), ms[0].index, tab, chunks, lrwd,
                coeffs, len(spec.coeffs), *_seed_words(spec.seed),
                float(spec.restore_scale) if restore else 0.0,
                _c1_high(spec.restore_query if restore else 0, C.STREAM_Z), _c1_high(0, spec.sr_stream),
                FORMAT=fmt, KIND=_KIND[group.dtype], GAUSSIAN=spec.dist == "gaussian", STOCHASTIC=stochastic,
                RESTORE=restore, BLOCKS=blocks, NPB=npb, BCOLS=bcols, ALIGNED=aligned)
