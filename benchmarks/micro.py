"""Microbenchmarks: each kernel's GB/s against the device copy bandwidth of the same run.

Bytes per call (P = bytes of the parameter set, in its dtype) count what the algorithm must move:
    perturb_                      2P  (read + write params)
    zo_update_ (any q, restore)   2P  (z is regenerated in registers, never read from memory)
    perturbed_copy                2P  (read params + write scratch)
    ZO step sweeps, ours          6P  (3 passes)
    ZO step sweeps, MeZO          12P (4 sweeps x 2P + 4 x P z writes)
    ZO step sweeps, foreach       10P (P z writes + 3 x 3P foreach_add)
    RNG only (fill_perturbation)  4 bytes written per element (float32 z)
"""
from __future__ import annotations

import gc

import torch

from zokernels import contract as C
from zokernels.backends import registry

from .baselines import ForeachZO, MeZO
from .config import DTYPE_NAMES, DTYPES, Config
from .ours import STEP_BYTES_FORMULA, OursDriftFree, OursInPlace
from .record import Results
from .shapes import ShapeSet, make_params
from .timing import copy_bandwidth, time_adaptive

SEED = 0x5EED_2024
PROJECTED_GRAD = 0.37

K_PERTURB = "perturb_"
K_RESTORE_UPDATE = "zo_update_ restore+update"
K_RESTORE_UPDATE_SR = "zo_update_ restore+update SR"
K_COPY = "perturbed_copy (per tensor)"
K_STEP_INPLACE = "step sweeps in-place"
K_STEP_DRIFTFREE = "step sweeps drift-free"
K_STEP = "step sweeps"


def k_update_q(q: int) -> str:
    return f"zo_update_ q={q}"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def usable_backends(cfg: Config, res: Results) -> list[str]:
    names = []
    for name in cfg.backends:
        reason = registry.not_supported(name, cfg.device)
        if reason is None and name == "triton" and cfg.device.type == "cpu":
            reason = "Triton on CPU runs in the interpreter, a correctness tool: not benchmarked"
        if reason is None:
            names.append(name)
        else:
            res.skip(f"backend {name} on {cfg.device}", reason)
    return names


def run_micro(cfg: Config, res: Results) -> None:
    dev = cfg.device
    try:
        copy = copy_bandwidth(dev, cfg.copy_bytes, cfg.warmup, max(cfg.repeats, 5))
    except Exception as e:  # noqa: BLE001 — without the copy line no percentage means anything
        res.error("copy bandwidth", e)
        return
    res.data["copy_bandwidth"] = copy
    free_memory(dev)
    backends = usable_backends(cfg, res)
    rng_rates(cfg, res, backends, copy["gbps"])
    res.checkpoint()
    if not cfg.compile_dtypes:
        res.skip("foreach+compile baseline", "no --compile-dtypes (default on CPU: inductor's C++ compile "
                 "takes minutes there)")
    if "fp32" in cfg.dtypes:
        res.skip("zo_update_ restore+update SR, fp32", "stochastic rounding applies to 16-bit parameters only")
    sets = cfg.shape_sets()
    # priority under the time budget: model lists before single tensors, fp16 last
    order = sorted(((i, s, d) for i, s in enumerate(sets) for d in cfg.dtypes),
                   key=lambda isd: (isd[2] == "fp16", isd[0], cfg.dtypes.index(isd[2])))
    for _, shapes, dtype_name in order:
        what = f"micro {shapes.name} {dtype_name}"
        if cfg.micro_seconds_left() <= 0:
            res.skip(what, "time budget for the micro part used up (--time-budget, --e2e-reserve)")
            continue
        try:
            run_set(cfg, res, shapes, DTYPES[dtype_name], backends, copy["gbps"])
        except Exception as e:  # noqa: BLE001 — one failing set must not end the run
            res.error(what, e)
        free_memory(dev)
        res.checkpoint()


def rng_rates(cfg: Config, res: Results, backends: list[str], copy_gbps: float) -> None:
    """Elements/s of z generation alone (fill_perturbation into a preallocated float32 buffer), and
    torch's own normal_ for scale: a kernel slower than its RNG is compute bound."""
    dev, n = cfg.device, cfg.rng_numel
    out = torch.empty(n, dtype=torch.float32, device=dev)
    cases = [("torch normal_", "torch", lambda: out.normal_())]
    for name in backends:
        if name == "reference" and n > cfg.reference_max_numel:
            res.skip(f"rng {name}", f"{n} elements > --reference-max-numel {cfg.reference_max_numel}")
            continue
        fill = registry.resolve("perturbation", dev, name).fn
        cases.append(("fill_perturbation gaussian", name,
                      lambda fill=fill: fill(out, SEED, 12345, 0, C.STREAM_Z, "gaussian", 0)))
    for kernel, backend, fn in cases:
        try:
            t = time_adaptive(fn, dev, cfg.warmup, cfg.repeats, cfg.case_seconds)
        except Exception as e:  # noqa: BLE001
            res.error(f"rng {backend}", e)
            continue
        sec = t.median_ms * 1e-3
        res.add("rng", {"kernel": kernel, "backend": backend, "numel": n, **t.as_dict(),
                        "elements_per_s": n / sec, "gbps": 4 * n / sec / 1e9,
                        "pct_copy_bw": 100 * 4 * n / sec / 1e9 / copy_gbps,
                        "bytes_formula": "4 bytes written per element (float32)"})
    del out


def _memory_ok(cfg: Config, need: int) -> str | None:
    if cfg.device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(cfg.device)
    if need > 0.92 * free:
        return f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


def run_set(cfg: Config, res: Results, shapes: ShapeSet, dtype: torch.dtype, backends: list[str],
            copy_gbps: float) -> None:
    dev, dname = cfg.device, DTYPE_NAMES[dtype]
    P = shapes.nbytes(dtype)
    elsize = P // shapes.numel
    why = _memory_ok(cfg, P + 2 * shapes.largest * elsize)
    if why:
        res.skip(f"micro {shapes.name} {dname}", why)
        return
    params = make_params(shapes, dtype, dev)
    base = {"shape_set": shapes.name, "shape_note": shapes.note, "numel": shapes.numel,
            "tensors": len(shapes.params), "dtype": dname, "param_bytes": P}

    def timed(impl: str, kernel: str, backend: str, fn, factor: int, formula: str) -> None:
        what = f"{impl}/{backend} {kernel} {shapes.name} {dname}"
        if cfg.micro_seconds_left() <= 0:
            res.skip(what, "time budget used up")
            return
        try:
            t = time_adaptive(fn, dev, cfg.warmup, cfg.repeats, cfg.case_seconds)
        except torch.cuda.OutOfMemoryError as e:
            res.error(what, e)
            free_memory(dev)
            return
        except Exception as e:  # noqa: BLE001
            res.error(what, e)
            return
        nbytes = factor * P
        gbps = nbytes / (t.median_ms * 1e-3) / 1e9
        res.add("micro", {**base, "impl": impl, "kernel": kernel, "backend": backend, "bytes": nbytes,
                          "bytes_formula": formula, **t.as_dict(), "gbps": gbps,
                          "pct_copy_bw": 100 * gbps / copy_gbps})

    with torch.no_grad():
        for name in backends:
            if name == "reference" and shapes.numel > cfg.reference_max_numel:
                res.skip(f"ours/reference {shapes.name} {dname}",
                         f"{shapes.numel} elements > --reference-max-numel {cfg.reference_max_numel} "
                         "(the pure-torch spec is not a performance path)")
                continue
            ours = OursInPlace(params, cfg.eps, cfg.lr, cfg.weight_decay, backend=name)
            sign = [1.0]

            def perturb(ours=ours):
                sign[0] = -sign[0]  # alternate so repeated calls do not walk the parameters away
                ours.perturb(SEED, sign[0] * cfg.eps)

            timed("ours", K_PERTURB, name, perturb, 2, "2P")
            timed("ours", K_RESTORE_UPDATE, name, lambda o=ours: o.update(SEED, PROJECTED_GRAD), 2, "2P")
            for q in cfg.queries:
                coeffs = [PROJECTED_GRAD / q] * q
                timed("ours", k_update_q(q), name, lambda o=ours, c=coeffs: _update_q(o, c), 2, "2P")
            if dtype != torch.float32:
                sr = OursInPlace(params, cfg.eps, cfg.lr, cfg.weight_decay, backend=name, rounding="stochastic")
                timed("ours", K_RESTORE_UPDATE_SR, name, lambda o=sr: o.update(SEED, PROJECTED_GRAD), 2, "2P")
            timed("ours", K_STEP_INPLACE, name, lambda o=ours: o.sweeps(SEED, PROJECTED_GRAD), 6,
                  STEP_BYTES_FORMULA)
            drift_free = OursDriftFree(params, cfg.eps, cfg.lr, cfg.weight_decay, backend=name)
            timed("ours", K_COPY, name, lambda o=drift_free: o.probe(SEED, cfg.eps), 2, "2P")
            timed("ours", K_STEP_DRIFTFREE, name, lambda o=drift_free: o.sweeps(SEED, PROJECTED_GRAD), 6,
                  STEP_BYTES_FORMULA)
            del ours, drift_free
            free_memory(dev)

        mezo = MeZO(params, cfg.eps, cfg.lr, cfg.weight_decay)
        timed("mezo", K_STEP, "torch", lambda: mezo.sweeps(SEED, PROJECTED_GRAD), MeZO.BYTES_FACTOR,
              MeZO.BYTES_FORMULA)
        del mezo
        free_memory(dev)
        tensors = [p.data for _, p in params]
        why = _memory_ok(cfg, P)
        if why:
            res.skip(f"foreach {shapes.name} {dname}", f"z buffers ({P / 2**30:.1f} GiB): {why}")
            return
        for compiled in (False, True):
            impl = "foreach+compile" if compiled else "foreach"
            if compiled and dname not in cfg.compile_dtypes:
                if cfg.compile_dtypes:
                    res.skip(f"{impl} {shapes.name} {dname}", f"torch.compile timed only for "
                             f"{cfg.compile_dtypes} (compile time; --compile-dtypes)")
                continue
            try:
                fe = ForeachZO(tensors, cfg.eps, cfg.lr, cfg.weight_decay, compiled=compiled)
            except Exception as e:  # noqa: BLE001 — torch.compile may fail on some stacks: record why
                res.skip(f"{impl} {shapes.name} {dname}", f"{type(e).__name__}: {str(e)[:300]}")
                free_memory(dev)
                continue
            timed(impl, K_STEP, "torch", lambda fe=fe: fe.sweeps(SEED, PROJECTED_GRAD), ForeachZO.BYTES_FACTOR,
                  ForeachZO.BYTES_FORMULA)
            fe.release()
            del fe
            free_memory(dev)
        if cfg.compile_dtypes and dev.type == "cuda":
            torch._dynamo.reset()
    del params, tensors


def _update_q(ours: OursInPlace, coeffs: list[float]) -> None:
    from zokernels import ops
    ops.zo_update_(ours.tensors, SEED, ours.keys, coeffs, ours.lr, ours.wds, rounding="nearest",
                   backend=ours.backend)
