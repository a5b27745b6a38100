"""Runs every op of a GPU backend once over odd sizes, offsets >= 2^32 and every dtype, plus a group whose
sizes, views and offsets are multiples of 4 (the vectorized paths), for tools that watch kernels from outside
(PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, so memcheck sees overruns past it):

    compute-sanitizer --tool memcheck --error-exitcode 3 python -m zokernels.selfcheck
    compute-sanitizer --tool memcheck --error-exitcode 3 python -m zokernels.selfcheck --backend triton
    compute-sanitizer --tool racecheck python -m zokernels.selfcheck
"""
from __future__ import annotations

import argparse

import torch

from . import contract as C
from . import ops


ODD_SIZES = [278011, 1037, 1, 4099, 3]
ODD_OFFSETS = [(1 << 32) + 3, 5, (1 << 40) + 1, 0, (1 << 49) + 2]


def _odd_group(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[int]]:
    return [torch.randn(n, device="cuda").to(dtype) for n in ODD_SIZES], ODD_OFFSETS


def _quad_group(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[int]]:
    """Views of one buffer at multiples of 4 elements (the last one ends the allocation) and a separate
    tensor; sizes and offsets multiples of 4: the Triton kernels' ALIGNED path, the CUDA kernels' 4-wide
    accesses."""
    flat = torch.randn(278012 + 4100 + 4, device="cuda").to(dtype)
    return list(torch.split(flat, [278012, 4100, 4])) + [torch.randn(1036, device="cuda").to(dtype)], \
        [1 << 32, 8, 0, (1 << 40) + 4]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m zokernels.selfcheck")
    ap.add_argument("--backend", choices=("cuda", "triton"), default="cuda")
    backend = ap.parse_args(argv).backend
    for make in (_odd_group, _quad_group):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            params, offsets = make(dtype)
            keys = [C.param_key(f"p{i}") for i in range(len(params))]
            for rounding in ("nearest", "stochastic"):
                for dist in ("gaussian", "rademacher"):
                    kw = dict(dist=dist, offsets=offsets, rounding=rounding, backend=backend)
                    ops.perturb_(params, 1, 1e-3, keys, query=2, **kw)
                    ops.perturbed_copy(params, 1, -1e-3, keys, query=2, **kw)
                    ops.zo_update_(params, 1, keys, (0.5, -0.5), 1e-3, 0.01, restore_scale=-1e-3,
                                   restore_query=2, **kw)
            if dtype != torch.float32:
                ops.stochastic_round(torch.randn(4099, device="cuda"), dtype, 1, 2, 0, (1 << 32) + 1,
                                     backend=backend)
    _masked(ODD_OFFSETS, [C.param_key(f"p{i}") for i in range(len(ODD_OFFSETS))], backend)
    _quant(backend)
    for dist in ("gaussian", "rademacher"):
        ops.perturbation((4099,), 1, 2, 0, dist, 3, device="cuda", backend=backend)
        ops.perturbation((4100,), 1, 2, 0, dist, 8, device="cuda", backend=backend)
    ops.uniform((4099,), 1, 2, 0, 3, device="cuda", backend=backend)
    torch.cuda.synchronize()
    print(f"zokernels {backend} selfcheck: all ops ran")


def _masked(offsets, keys, backend: str) -> None:
    """Every mask format (rows int16/int32, blocks aligned/unaligned, bits) in one masked launch."""
    from .mazo import masks as M

    g = torch.Generator().manual_seed(0)
    shapes = [(61, 1317), (3, 40001), (9, 333), (12, 512), (2053,)]
    scores = [torch.rand(s, generator=g) for s in shapes]
    masks = [M.row_topk(scores[0], 0.1), M.row_topk(scores[1], 0.05), M.block_topk(scores[2], 0.3, 16),
             M.block_topk(scores[3], 0.25, 32), M.bits_topk(scores[4], 0.3)]
    masks = [m.to("cuda") for m in masks]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        params = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
        for rounding in ("nearest", "stochastic"):
            kw = dict(offsets=offsets, rounding=rounding, backend=backend)
            ops.masked_perturb_(params, masks, 1, 1e-3, keys, query=2, **kw)
            ops.masked_perturbed_copy(params, masks, 1, -1e-3, keys, query=2, outs=[p.clone() for p in params], **kw)
            ops.masked_zo_update_(params, masks, 1, keys, (0.5, -0.5), 1e-3, 0.01, restore_scale=-1e-3,
                                  restore_query=2, dist="rademacher", **kw)


def _quant(backend: str) -> None:
    """Every quantized-weight format and op (odd K, int4 padding, saturation counters)."""
    from .quant import formats as F
    from .quant import ops as QO

    w = torch.randn(1031, 203, device="cuda")
    for fmt in ("int8", "int4", "fp8"):
        for rounding in ("nearest", "stochastic"):
            qw = F.quantize_weight(w, fmt, rounding=rounding, seed=1, key=2, group_size=32, backend=backend)
        for out_dtype in (None, torch.float32, torch.bfloat16, torch.float16) + ((torch.uint8,) if fmt == "int4" else ()):
            QO.probe_weights(qw, 1, 2, 3, 0.5, -1, out_dtype=out_dtype, backend=backend)
        for form in ("single", "paper"):
            QO.update_(qw, 1, 2, (0.5, -1.0), 1e-2, 1e-3, form, backend=backend)


if __name__ == "__main__":
    main()
