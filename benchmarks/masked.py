"""Masked (MaZO) kernels against the dense kernels on the same weights, GB/s on the bytes touched.

Weights: the seven projection matrices of `masked_layers` LLaMA-7B decoder layers (q/k/v/o 4096x4096,
gate/up 11008x4096, down 4096x11008: the matrices MaZO masks), N(0, 0.02^2) values. Masks come from
uniform random scores, as scattered at the element level as importance scores are: `row_topk`
(element masks, "rows" format: per-row column ids) and `block_topk` (top blocks of `block` >= 16
contiguous columns per row), at each ratio of `masked_ratios`.

Per backend (triton, cuda if it has masked kernels, reference on small sets) and dtype (bf16, fp32):

    perturb_                   dense perturb_           vs  masked_perturb_
    zo_update_ restore+update  dense zo_update_         vs  masked_zo_update_     (1 query, restore, nearest)
    probe copy                 dense perturbed_copy into a scratch (the dense drift-free probe)
                           vs  masked_perturbed_copy into a persistent scratch (what ZOSGD does with masks)
                           vs  masked_perturbed_copy with outs=None (a fresh clone + masked writes)

Byte model (P = bytes of the weights, es = element size, I = bytes of the mask index, S = number of
32-byte sectors of the weights holding at least one masked element, counted exactly from the mask,
per tensor from its 32-byte-aligned start):

    dense perturb_, zo_update_, perturbed_copy      2P           read + write every element
    masked perturb_, zo_update_, persistent copy    2 * 32 * S + I   DRAM moves whole sectors: read the
                                                                 touched sectors, write them back (or
                                                                 the same sectors of the scratch)
    masked copy, fresh (outs=None)                  2P + 2 * 32 * S + I   clone + masked writes
    moved (for reference)                           2 * es * count + I    the masked elements alone

A scattered element mask at ratio r touches 1 - (1 - r)^(32 / es) of the sectors (10% of bf16: 81%),
a block mask about r. GB/s = touched bytes / median time; "vs dense" = median time / the dense
kernel's median time (same backend, dtype, weights). Not in the model: a partial-sector write into a
sector the kernel did not read (the persistent scratch) can make the memory system fetch the sector
first (ECC granules), i.e. up to 32 * S more bytes read; Nsight Compute's DRAM counters would show it.
"""
from __future__ import annotations

import math

import torch

from zokernels import mazo, ops
from zokernels.backends import registry
from zokernels.contract import param_key

from .config import DTYPES, Config
from .micro import SEED, free_memory, usable_backends
from .record import Results
from .shapes import ShapeSet, llama7b, make_params
from .timing import copy_bandwidth, time_adaptive

SECTOR = 32
PROJECTED_GRAD = 0.37
K_PERTURB = "perturb_"
K_UPDATE = "zo_update_ restore+update"
K_COPY_DENSE = "probe copy: dense perturbed_copy"
K_COPY_PERSISTENT = "probe copy: masked, persistent scratch"
K_COPY_FRESH = "probe copy: masked, fresh clone"
DENSE_OF = {K_PERTURB: K_PERTURB, K_UPDATE: K_UPDATE, K_COPY_PERSISTENT: K_COPY_DENSE, K_COPY_FRESH: K_COPY_DENSE}
BYTES_FORMULA = {K_PERTURB: "2*32*S + I", K_UPDATE: "2*32*S + I", K_COPY_PERSISTENT: "2*32*S + I",
                 K_COPY_FRESH: "2P + 2*32*S + I"}


def masked_shapes(layers: int, width_div: int) -> ShapeSet:
    """The projection matrices of `layers` LLaMA-7B decoder layers."""
    full = llama7b(layer_scale=layers / 32, width_div=width_div)
    params = tuple((n, s) for n, s in full.params if n.endswith("_proj.weight"))
    n = len(params) // 7
    suffix = "" if width_div == 1 else f"-width/{width_div}"
    return ShapeSet(f"llama-7b-proj-{n}layer{suffix}", params,
                    f"LLaMA-7B q/k/v/o/gate/up/down of {n} decoder layer(s), hidden {params[0][1][1]}")


def rule_name(rule: str, block: int) -> str:
    return "rows" if rule == "row_topk" else f"blocks{block}"


def sectors_touched(mask, elem_bytes: int, chunk: int = 1 << 22) -> int:
    """Number of 32-byte sectors of the (32-byte-aligned) parameter that hold >= 1 masked element.

    rows/blocks: every mask entry covers columns [c0, c1] of row r, i.e. sectors [f, l] with
    f = (r * ncols + c0) // per, l = (r * ncols + c1) // per; entries are ascending, so two consecutive
    entries share at most one sector (l_prev == f_next)."""
    per = SECTOR // elem_bytes
    if mask.kind == "bits":
        loc = mask.local_indices()
        return int(torch.unique(loc // per).numel())
    rows, ncols = mask.matrix
    idx = mask.index
    k = idx.shape[1]
    if k == 0:
        return 0
    width = 1 if mask.kind == "rows" else mask.block
    step = max(1, chunk // k)
    total, prev_last = 0, None
    for r0 in range(0, rows, step):
        r = torch.arange(r0, min(rows, r0 + step), dtype=torch.int64, device=idx.device)[:, None]
        c0 = idx[r0:r0 + step].to(torch.int64) * width
        c1 = torch.clamp(c0 + width, max=ncols) - 1
        first = ((r * ncols + c0) // per).reshape(-1)
        last = ((r * ncols + c1) // per).reshape(-1)
        total += int((last - first + 1).sum()) - int((first[1:] == last[:-1]).sum())
        if prev_last is not None and int(first[0]) == prev_last:
            total -= 1
        prev_last = int(last[-1])
    return total


def _sectors_of(t: torch.Tensor) -> int:
    return -(-t.numel() * t.element_size() // SECTOR)


def run_masked(cfg: Config, res: Results) -> None:
    res.data.setdefault("masked", [])
    dev = cfg.device
    if res.data.get("copy_bandwidth") is None:  # --only masked: the copy line is measured here
        try:
            res.data["copy_bandwidth"] = copy_bandwidth(dev, cfg.copy_bytes, cfg.warmup, max(cfg.repeats, 5))
        except Exception as e:  # noqa: BLE001
            res.error("copy bandwidth (masked)", e)
            return
    copy_gbps = res.data["copy_bandwidth"]["gbps"]
    backends, checks = [], Results({}, {})
    for name in usable_backends(cfg, checks):
        reason = next(filter(None, (registry.why_not(op, name, dev) for op in ops.MASKED_OPS)), None)
        if reason is not None:
            res.skip(f"masked {name}", reason)
            continue
        backends.append(name)
    for s in checks.data["skipped"]:
        res.skip(f"masked: {s['what']}", s["reason"])
    bad = [b for b in cfg.masked_blocks if b < mazo.masks.MIN_BLOCK]
    if bad:
        res.skip(f"masked block sizes {bad}", f"block masks need blocks >= {mazo.masks.MIN_BLOCK} columns")
        cfg.masked_blocks = [b for b in cfg.masked_blocks if b >= mazo.masks.MIN_BLOCK]
    shapes = masked_shapes(cfg.masked_layers, cfg.width_div)
    for dtype_name in [d for d in cfg.dtypes if d in ("bf16", "fp32")]:
        what = f"masked {shapes.name} {dtype_name}"
        if cfg.micro_seconds_left() <= 0:
            res.skip(what, "time budget used up (--time-budget, --e2e-reserve)")
            continue
        try:
            run_masked_set(cfg, res, shapes, DTYPES[dtype_name], backends, copy_gbps)
        except Exception as e:  # noqa: BLE001 — one failing set must not end the run
            res.error(what, e)
        free_memory(dev)
        res.checkpoint()


def run_masked_set(cfg: Config, res: Results, shapes: ShapeSet, dtype: torch.dtype, backends: list[str],
                   copy_gbps: float) -> None:
    res.data.setdefault("masked", [])
    dev, dname = cfg.device, next(k for k, v in DTYPES.items() if v == dtype)
    P = shapes.nbytes(dtype)
    params = make_params(shapes, dtype, dev, seed=7)
    tensors = [p.data for _, p in params]
    keys = [param_key(n) for n, _ in params]
    es = tensors[0].element_size()
    aligned = all(t.data_ptr() % SECTOR == 0 for t in tensors)
    total_sectors = sum(_sectors_of(t) for t in tensors)
    gen = torch.Generator(device=dev).manual_seed(11)
    scores = [torch.rand(t.shape, generator=gen, device=dev) for t in tensors]
    scratch = [t.clone() for t in tensors]  # the persistent probe scratch (equals W off the mask)
    base = {"shape_set": shapes.name, "shape_note": shapes.note, "numel": shapes.numel, "tensors": len(tensors),
            "dtype": dname, "param_bytes": P, "sectors_aligned": aligned}
    eps, lr = cfg.eps, cfg.lr

    def record(backend, rule, ratio, kernel, fn, touched, extra) -> dict | None:
        what = f"masked/{backend} {rule} {ratio} {kernel} {dname}"
        if cfg.micro_seconds_left() <= 0:
            res.skip(what, "time budget used up")
            return None
        try:
            t = time_adaptive(fn, dev, cfg.warmup, cfg.repeats, cfg.case_seconds)
        except Exception as e:  # noqa: BLE001
            res.error(what, e)
            free_memory(dev)
            return None
        gbps = touched / (t.median_ms * 1e-3) / 1e9
        return res.add("masked", {**base, "backend": backend, "rule": rule, "ratio": ratio, "kernel": kernel,
                                  **t.as_dict(), "bytes_touched": touched, "gbps": gbps,
                                  "pct_copy_bw": 100 * gbps / copy_gbps, **extra})

    with torch.no_grad():
        for name in backends:
            if name == "reference" and shapes.numel > cfg.reference_max_numel:
                res.skip(f"masked/reference {shapes.name} {dname}",
                         f"{shapes.numel} elements > --reference-max-numel {cfg.reference_max_numel}")
                continue
            sign = [1.0]

            def flip() -> float:
                sign[0] = -sign[0]  # alternate so repeated calls do not walk the weights away
                return sign[0] * eps

            dense_extra = {"count": shapes.numel, "mask_ratio": 1.0, "index_bytes": 0, "sectors": total_sectors,
                           "sector_fraction": 1.0, "bytes_moved": 2 * P, "bytes_formula": "2P", "vs_dense": 1.0}
            dense = {}
            for kernel, fn in (
                    (K_PERTURB, lambda: ops.perturb_(tensors, SEED, flip(), keys, backend=name)),
                    (K_UPDATE, lambda: ops.zo_update_(tensors, SEED, keys, [PROJECTED_GRAD], lr, 0.0,
                                                      rounding="nearest", restore_scale=eps, backend=name)),
                    (K_COPY_DENSE, lambda: ops.perturbed_copy(tensors, SEED, eps, keys, outs=scratch,
                                                              backend=name))):
                r = record(name, "dense", 1.0, kernel, fn, 2 * P, {**dense_extra, "dense_ms": None})
                if r is not None:
                    dense[kernel] = r["median_ms"]
                    r["dense_ms"] = r["median_ms"]
            for rule, block in [("row_topk", 1)] + [("block_topk", b) for b in cfg.masked_blocks]:
                rname = rule_name(rule, block)
                for ratio in cfg.masked_ratios:
                    masks = [mazo.build_masks({"w": s}, ratio, rule, **({"block": block} if block > 1 else {}))["w"]
                             for s in scores]
                    count = sum(m.count for m in masks)
                    index_bytes = sum(m.nbytes for m in masks)
                    sectors = sum(sectors_touched(m, es) for m in masks)
                    touched = 2 * SECTOR * sectors + index_bytes
                    extra = {"count": count, "mask_ratio": count / shapes.numel, "index_bytes": index_bytes,
                             "sectors": sectors, "sector_fraction": sectors / total_sectors,
                             "bytes_moved": 2 * es * count + index_bytes}
                    cases = (
                        (K_PERTURB, touched,
                         lambda m=masks: ops.masked_perturb_(tensors, m, SEED, flip(), keys, backend=name)),
                        (K_UPDATE, touched,
                         lambda m=masks: ops.masked_zo_update_(tensors, m, SEED, keys, [PROJECTED_GRAD], lr, 0.0,
                                                               rounding="nearest", restore_scale=eps, backend=name)),
                        (K_COPY_PERSISTENT, touched,
                         lambda m=masks: ops.masked_perturbed_copy(tensors, m, SEED, eps, keys, outs=scratch,
                                                                   backend=name)),
                        (K_COPY_FRESH, 2 * P + touched,
                         lambda m=masks: ops.masked_perturbed_copy(tensors, m, SEED, eps, keys, backend=name)))
                    for kernel, nbytes, fn in cases:
                        d = dense.get(DENSE_OF[kernel])
                        r = record(name, rname, ratio, kernel, fn, nbytes,
                                   {**extra, "bytes_formula": BYTES_FORMULA[kernel], "dense_ms": d})
                        if r is not None:
                            r["vs_dense"] = r["median_ms"] / d if d else None
                    del masks
                    free_memory(dev)


def expected_sector_fraction(ratio: float, elem_bytes: int) -> float:
    """1 - (1 - r)^(32 / es): the sector fraction of a uniformly scattered element mask (for the docs)."""
    return 1.0 - math.pow(1.0 - ratio, SECTOR // elem_bytes)
