"""Which weights a pruning score keeps: the lowest scores of each output row go (Wanda's comparison group), either
to a sparsity (unstructured) or in N:M groups (exactly N kept of every M consecutive weights along the input
dimension, as NVIDIA's 2:4 sparse tensor cores read them). Pure functions of a score matrix [out, in]."""
from __future__ import annotations

import math
import re

import torch

from ..masks import ParamMask, index_dtype

PATTERNS = ("unstructured", "2:4", "4:8")
_NM = re.compile(r"^(\d+):(\d+)$")


class PruneError(ValueError):
    """Bad pruning input (model, sparsity, pattern, calibration): raised before any weight is touched."""


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", (N, M) for "N:M" (0 < N < M)."""
    if pattern == "unstructured":
        return None
    m = _NM.match(str(pattern))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise PruneError(f"pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. {PATTERNS[1:]}), "
                         f"got {pattern!r}")
    return int(m.group(1)), int(m.group(2))


def resolve_sparsity(sparsity: float | None, pattern: str) -> float:
    """The sparsity a pattern implies: N:M fixes it at 1 - N/M (a given sparsity must equal it); unstructured
    needs 0 <= sparsity < 1 (default 0.5)."""
    nm = parse_pattern(pattern)
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))
                                 or not math.isfinite(sparsity) or not 0.0 <= sparsity < 1.0):
        raise PruneError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if nm is None:
        return 0.5 if sparsity is None else float(sparsity)
    implied = 1.0 - nm[0] / nm[1]
    if sparsity is not None and abs(sparsity - implied) > 1e-9:
        raise PruneError(f"pattern {pattern} keeps {nm[0]} of every {nm[1]} weights: sparsity {implied:g}, "
                         f"not {sparsity:g} (leave sparsity unset with a pattern)")
    return implied


def kept_per_row(ncols: int, sparsity: float) -> int:
    """Weights each row keeps at `sparsity` (unstructured): ncols - round(sparsity * ncols)."""
    return ncols - int(round(sparsity * ncols))


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    """bool [out, in]: True where a weight is kept. Unstructured: the kept_per_row(in, sparsity) highest scores
    of every row; N:M: the N highest of every M consecutive columns of every row (ties: torch.topk's choice)."""
    if scores.ndim != 2:
        raise PruneError(f"scores must be a matrix [out, in], got shape {tuple(scores.shape)}")
    rows, ncols = scores.shape
    s = torch.nan_to_num(scores.detach().to(torch.float64), nan=-math.inf)
    nm = parse_pattern(pattern)
    keep = torch.zeros(rows, ncols, dtype=torch.bool, device=scores.device)
    if nm is None:
        k = kept_per_row(ncols, sparsity)
        if k:
            keep.scatter_(1, torch.topk(s, k, dim=1).indices, True)
        return keep
    n, m = nm
    if ncols % m:
        raise PruneError(f"pattern {n}:{m} needs the input dimension to be a multiple of {m}, got {ncols}")
    groups = s.view(rows, ncols // m, m)
    keep.view(rows, ncols // m, m).scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep


def rows_mask(keep: torch.Tensor) -> ParamMask:
    """A "rows" ParamMask (the masked kernels' form) of a keep matrix with the same count in every row."""
    rows, ncols = keep.shape
    counts = keep.sum(dim=1)
    if rows and bool((counts != counts[0]).any()):
        raise PruneError("a rows mask needs the same number of kept weights in every row")
    cols = keep.nonzero()[:, 1].view(rows, -1)  # row-major: ascending within each row
    return ParamMask("rows", (rows, ncols), cols.to(index_dtype(ncols)).contiguous())
