"""Cost of masked probes and updates vs dense, per mask format and ratio (MaZO).

For one [rows, cols] weight: time of
  dense_copy       perturbed_copy (the dense drift-free probe scratch)
  fresh_masked     masked_perturbed_copy(outs=None): clone + masked writes (dense traffic)
  persistent       masked_perturbed_copy(outs=scratch): masked writes into a persistent scratch
  inplace          masked_perturb_ (MeZO-style in-place masked pass)
  update           masked_zo_update_ (1 query)  vs  dense zo_update_
and GB/s on the bytes the masked kernel actually touches (weights read + written + index bytes;
the 32-byte-sector view: a scattered mask touches more sectors than it moves elements).

    python examples/mazo_costs.py                        # CPU, reference backend
    python examples/mazo_costs.py --device cuda --backend triton --rows 4096 --cols 4096
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from zokernels import mazo, ops


def timed(fn, reps: int, sync) -> float:
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def sectors_touched(mask, elem_bytes: int) -> int:
    """32-byte sectors holding at least one masked element (per parameter)."""
    per = 32 // elem_bytes
    loc = mask.local_indices()
    return int(torch.unique(loc // per).numel())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1536)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="reference")
    ap.add_argument("--ratios", default="0.01,0.1,0.5,1.0")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.cols, generator=g).to(dtype).to(dev)
    scores = torch.rand(w.shape, generator=g)
    es = w.element_size()
    kw = dict(rounding="stochastic", backend=args.backend)
    dense = {
        "dense_copy": timed(lambda: ops.perturbed_copy(w, 1, 1e-3, 2, **kw), args.reps, sync),
        "dense_update": timed(lambda: ops.zo_update_(w, 1, 2, [0.1], 0.0, **kw), args.reps, sync),
    }
    print(f"{args.rows}x{args.cols} {args.dtype} on {dev} ({args.backend}): dense perturbed_copy "
          f"{dense['dense_copy'] * 1e3:.1f} ms, dense zo_update_ {dense['dense_update'] * 1e3:.1f} ms")
    print("| rule | ratio | fresh_masked ms | persistent ms | inplace ms | update ms | persistent / dense copy "
          "| sectors touched | GB/s (persistent, bytes moved) |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for rule in ("row_topk", "block_topk", "bits"):
        for ratio in [float(r) for r in args.ratios.split(",")]:
            m = mazo.build_masks({"w": scores}, ratio, rule, block=args.block)["w"].to(dev)
            scratch = w.clone()
            r = {"rule": rule, "ratio": ratio, "count": m.count, "index_bytes": m.nbytes}
            r["fresh_masked"] = timed(lambda: ops.masked_perturbed_copy(w, m, 1, 1e-3, 2, **kw), args.reps, sync)
            r["persistent"] = timed(lambda: ops.masked_perturbed_copy(w, m, 1, 1e-3, 2, outs=[scratch], **kw),
                                    args.reps, sync)
            r["inplace"] = timed(lambda: ops.masked_perturb_(scratch, m, 1, 1e-3, 2, **kw), args.reps, sync)
            r["update"] = timed(lambda: ops.masked_zo_update_(scratch, m, 1, 2, [0.1], 0.0, **kw), args.reps, sync)
            moved = 2 * m.count * es + m.nbytes
            r["sector_fraction"] = sectors_touched(m.to("cpu"), es) / (-(-w.numel() * es // 32))
            r["gbps_moved"] = moved / r["persistent"] / 1e9
            rows.append(r)
            print(f"| {rule} | {ratio} | {r['fresh_masked'] * 1e3:.1f} | {r['persistent'] * 1e3:.1f} | "
                  f"{r['inplace'] * 1e3:.1f} | {r['update'] * 1e3:.1f} | {r['persistent'] / dense['dense_copy']:.2f} | "
                  f"{r['sector_fraction']:.2f} | {r['gbps_moved']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "dense": dense, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
