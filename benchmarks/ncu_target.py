"""One kernel call between cudaProfilerStart/Stop, for Nsight Compute (benchmarks/ncu.sh).

    python -m benchmarks.ncu_target --backend triton --kernel perturb_ --dtype bf16 --numel 268435456

Prints the bytes the micro benchmark counts for that call, to compare with ncu's DRAM bytes.
"""
from __future__ import annotations

import argparse

import torch

from zokernels import contract as C
from zokernels import ops
from zokernels.backends import registry

from .config import DTYPES

KERNELS = ("perturb_", "update_restore", "update_sr", "perturbed_copy", "update_q16", "fill_perturbation")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ncu_target", description=__doc__)
    ap.add_argument("--backend", default="triton", choices=("reference", "triton", "cuda"))
    ap.add_argument("--kernel", default="perturb_", choices=KERNELS)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--numel", type=int, default=1 << 28)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    x = torch.empty(args.numel, dtype=dtype, device=dev).normal_(0, 0.02)
    out = torch.empty_like(x)
    z32 = torch.empty(args.numel, dtype=torch.float32, device=dev)
    seed, key, b = 7, 12345, args.backend
    calls = {
        "perturb_": lambda: ops.perturb_(x, seed, 1e-3, key, backend=b),
        "update_restore": lambda: ops.zo_update_(x, seed, key, [0.5], 1e-6, rounding="nearest",
                                                 restore_scale=1e-3, backend=b),
        "update_sr": lambda: ops.zo_update_(x, seed, key, [0.5], 1e-6, rounding="stochastic",
                                            restore_scale=1e-3, backend=b),
        "perturbed_copy": lambda: ops.perturbed_copy(x, seed, 1e-3, key, outs=[out], backend=b),
        "update_q16": lambda: ops.zo_update_(x, seed, key, [0.03] * 16, 1e-6, rounding="nearest", backend=b),
        "fill_perturbation": lambda: registry.resolve("perturbation", dev, b).fn(z32, seed, key, 0, C.STREAM_Z,
                                                                                   "gaussian", 0),
    }
    fn = calls[args.kernel]
    fn()  # JIT / autotune outside the profiled range
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    counted = 4 * args.numel if args.kernel == "fill_perturbation" else 2 * x.numel() * x.element_size()
    print(f"counted bytes for {args.kernel} {args.dtype} {args.numel}: {counted} ({counted / 1e9:.3f} GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
