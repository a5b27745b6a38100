"""MaZO's mask rules: masks (zokernels.masks.ParamMask) from importance scores, top-k per row, per block of
columns, or over the whole parameter. The mask type, its files and its fingerprint: zokernels.masks."""
from __future__ import annotations

import math
from typing import Mapping

import torch

from ..contract import matrix_shape
from ..masks import (FORMAT, KINDS, MIN_BLOCK, ParamMask, from_dense, index_dtype, load_masks,  # noqa: F401
                     masks_fingerprint, pack_bits, resolve_masks, rows_from_columns, save_masks, unpack_bits)

RULES = ("row_topk", "block_topk", "bits")


def _clean(scores: torch.Tensor) -> torch.Tensor:
    s = scores.detach().to(torch.float32)
    return torch.nan_to_num(s, nan=-math.inf)


def row_topk(scores: torch.Tensor, ratio: float) -> ParamMask:
    """Top k = max(1, round(ratio * ncols)) columns of every row (ties: torch.topk's choice)."""
    rows, ncols = matrix_shape(scores.shape)
    k = min(ncols, max(1, round(ratio * ncols)))
    s = _clean(scores).reshape(rows, ncols)
    cols = torch.topk(s, k, dim=1, sorted=False).indices
    return ParamMask("rows", tuple(scores.shape),
                     torch.sort(cols, dim=1).values.to(index_dtype(ncols)).contiguous())


def block_topk(scores: torch.Tensor, ratio: float, block: int = MIN_BLOCK) -> ParamMask:
    """Top kb = max(1, round(ratio * nblocks)) blocks of `block` contiguous columns per row, ranked by
    the mean score of the block (the last, partial block by the mean of its columns)."""
    if block < MIN_BLOCK:
        raise ValueError(f"block must be >= {MIN_BLOCK} columns (a 32-byte sector holds 16 bf16 weights)")
    rows, ncols = matrix_shape(scores.shape)
    nblocks = -(-ncols // block)
    kb = min(nblocks, max(1, round(ratio * nblocks)))
    s = _clean(scores).reshape(rows, ncols)
    pad = nblocks * block - ncols
    valid = torch.ones(rows, ncols, device=s.device)
    if pad:
        s = torch.nn.functional.pad(s, (0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad))
    s = torch.where(torch.isinf(s) & (s < 0), torch.zeros_like(s), s)  # NaN scores count as 0 in a block mean
    mean = s.view(rows, nblocks, block).sum(-1) / valid.view(rows, nblocks, block).sum(-1)
    ids = torch.topk(mean, kb, dim=1, sorted=False).indices
    return ParamMask("blocks", tuple(scores.shape), torch.sort(ids, dim=1).values.to(index_dtype(nblocks)).contiguous(),
                     block)


def bits_topk(scores: torch.Tensor, ratio: float) -> ParamMask:
    """Top max(1, round(ratio * numel)) elements of the whole parameter, as a bits mask."""
    s = _clean(scores).reshape(-1)
    k = min(s.numel(), max(1, round(ratio * s.numel())))
    flags = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
    flags[torch.topk(s, k, sorted=False).indices] = True
    return ParamMask("bits", tuple(scores.shape), pack_bits(flags))


def build_masks(scores: Mapping[str, torch.Tensor], ratio: float = 0.1, rule: str = "row_topk",
                block: int = MIN_BLOCK) -> dict[str, ParamMask]:
    """Masks from importance scores (higher = more important), one per parameter name.

    rule: "row_topk" (MaZO: top ratio*ncols of each row), "block_topk" (top blocks of `block`
    contiguous columns per row, block >= 16), "bits" (top ratio*numel of the whole parameter)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    out = {}
    for name, s in scores.items():
        if rule == "row_topk":
            out[name] = row_topk(s, ratio)
        elif rule == "block_topk":
            out[name] = block_topk(s, ratio, block)
        else:
            out[name] = bits_topk(s, ratio)
    return out
