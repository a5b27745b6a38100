"""Dispatch overhead of the ``torch.library.custom_op`` route against one fused pass (issue #13).

    python -m benchmarks.custom_op --out results/custom-op-cpu      # < 1 min on the 2-core CPU machine

Question: registering the ops with ``torch.library.custom_op`` makes them compose with ``torch.compile``;
is its dispatch overhead per launch negligible against one fused pass over a 1B-parameter group? One
process measures:

1. dispatch: a Python function that takes a list of tensors (plus seed: int, scale: float, like
   ``perturb_``) and mutates it in place, called directly vs. the same body registered as

       custom_op   torch.library.custom_op("zokernels_bench::...", mutates_args=("ts",)),
                   called as torch.ops.zokernels_bench.<name>
       library     torch.library.Library("zokernels_bench", "FRAGMENT").define("...(Tensor(a!)[] ts, int seed,
                   float scale) -> ()") + impl(..., "CompositeExplicitAutograd") (the lower-level route; for comparison)

   with 1-element float32 tensors (requires_grad False, under torch.no_grad(), as a ZO step runs), bodies
   "noop" (pass) and "add1" (ts[0].add_(scale): a tiny add on a 1-element tensor), lists of 1, 16 and 256
   tensors (a 1B-parameter model has ~200-300 parameter tensors; ops.py makes one backend call per device/dtype
   group). Timing: blocks of --calls calls, routes interleaved (rotating order), gc off; us/call = median over
   --blocks blocks (p10/p90 kept). Overhead = route median - direct median, same list and body. A line
   a + b * n_tensors is fitted to the overheads (least squares). Each route also records whether one call
   bumps the tensors' version counters (custom_op does it in Python, per mutated tensor).
2. pass: a memory-bound in-place pass ``t.add_(1.0)`` over float32 tensors of --sizes elements (bf16 at the
   largest size, for information), GB/s = 2 * bytes / time (read + write, the 2P that perturb_ / zo_update_
   move). One pass over 1B parameters is extrapolated as 2 * 1e9 * element size / (GB/s of the largest fp32
   size), fp32 and bf16, and for the GPU computed from the H100 SXM's published HBM3 bandwidth (3.35 TB/s: a
   datasheet figure, not a measurement; real kernels reach ~90% of it, so the pass is longer and the
   overhead's share smaller than the table says).
3. compile: ``torch.compile`` of f(ts, x) = (x * 2 + ts[0].sum() after op(ts, seed, scale)) with the op's
   body ``for t in ts: t.add_(scale)`` (a fake impl registered; the result compared with allclose, rtol = atol
   = 1e-5, as inductor may reorder the sum; the mutated tensors exactly), for custom_op, library and an opaque call (a
   ``torch.compiler.disable``d function: what dynamo sees of an extension call it cannot trace): graph
   count and graph breaks from torch._dynamo.explain, whether fullgraph=True compiles, whether the compiled
   result and the mutated tensors equal eager's, and inductor's missed re-inplacing counters (a missed
   re-inplace would copy the mutated tensors: a second pass over the group).

The overhead is host CPU time measured here; on a GPU it is the time before the launch, hidden only while
earlier kernels keep the GPU busy (not after the step's .item() sync). Outputs: <out>/custom_op.json and
<out>/custom_op.md (rewritten after every part: a killed run still leaves results).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import sys
import time
import traceback

if __package__ in (None, ""):  # `python benchmarks/custom_op.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"  # noqa: A001

import torch  # noqa: E402

from benchmarks.timing import device_info, percentile, time_adaptive, torch_threads  # noqa: E402

SCHEMA = 1
NS = "zokernels_bench"
SEED = 0x5EED_2024
SCALE = 0.5
PARAMS_1B = 1_000_000_000
H100_SXM_HBM3_BPS = 3.35e12   # NVIDIA H100 SXM5 datasheet: 3.35 TB/s HBM3 (published figure, not measured here)
H100_SOURCE = "published: NVIDIA H100 SXM5 datasheet, 3.35 TB/s HBM3 (peak; not a measurement)"
ROUTES = ("direct", "custom_op", "library")
BODIES = ("noop", "add1")
ES = {"fp32": 4, "bf16": 2}
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}

_OPS: dict = {}   # registered once per process (a second registration of the same name raises)


# ---------------------------------------------------------------------------------------------- the ops
def _body_noop(ts: list[torch.Tensor], seed: int, scale: float) -> None:
    pass


def _body_add1(ts: list[torch.Tensor], seed: int, scale: float) -> None:
    ts[0].add_(scale)


def _body_add_all(ts: list[torch.Tensor], seed: int, scale: float) -> None:
    for t in ts:
        t.add_(scale)


def _register() -> dict:
    """{body: {route: callable}} for the dispatch bodies and the compile body ("add_all"); the custom_op and
    library routes are called through torch.ops (OpOverloadPacket), as a caller of torch.ops would."""
    if _OPS:
        return _OPS
    lib = torch.library.Library(NS, "FRAGMENT")
    _OPS["_lib"] = lib   # keep the registrations alive
    ops_ns = getattr(torch.ops, NS)
    for name, body in (("noop", _body_noop), ("add1", _body_add1), ("add_all", _body_add_all)):
        torch.library.custom_op(f"{NS}::{name}", body, mutates_args=("ts",))
        lib.define(f"lib_{name}(Tensor(a!)[] ts, int seed, float scale) -> ()")
        lib.impl(f"lib_{name}", body, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NS}::lib_{name}", _body_noop, lib=lib)
        torch.library.register_fake(f"{NS}::{name}", _body_noop)
        _OPS[name] = {"direct": body, "custom_op": getattr(ops_ns, name), "library": getattr(ops_ns, f"lib_{name}")}
    return _OPS


# ------------------------------------------------------------------------------------------- 1. dispatch
def _stats(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"us_per_call": percentile(s, 50), "p10_us": percentile(s, 10), "p90_us": percentile(s, 90)}


def _bumps_version(fn, ts) -> bool:
    before = [t._version for t in ts]
    fn(ts, SEED, SCALE)
    return all(t._version > b for t, b in zip(ts, before))


def measure_dispatch(counts: list[int], calls: int, blocks: int) -> list[dict]:
    ops = _register()
    rows = []
    for body in BODIES:
        for n in counts:
            ts = [torch.zeros(1) for _ in range(n)]
            fns = ops[body]
            samples: dict[str, list[float]] = {r: [] for r in ROUTES}
            with torch.no_grad():
                bumps = {r: _bumps_version(fns[r], ts) for r in ROUTES}
                gc_was = gc.isenabled()
                gc.disable()
                try:
                    for b in range(-1, blocks):   # block -1: warmup, discarded
                        k = b % len(ROUTES)
                        for route in ROUTES[k:] + ROUTES[:k]:
                            f = fns[route]
                            t0 = time.perf_counter()
                            for _ in range(calls):
                                f(ts, SEED, SCALE)
                            dt = (time.perf_counter() - t0) / calls * 1e6
                            if b >= 0:
                                samples[route].append(dt)
                finally:
                    if gc_was:
                        gc.enable()
            direct = _stats(samples["direct"])["us_per_call"]
            for route in ROUTES:
                st = _stats(samples[route])
                rows.append({"body": body, "n_tensors": n, "route": route, **st,
                             "overhead_us": st["us_per_call"] - direct, "calls_per_block": calls,
                             "blocks": blocks, "bumps_version_counter": bumps[route]})
    return rows


def profile_custom_op(n: int, calls: int, top: int = 6) -> list[dict]:
    """cProfile of `calls` custom_op noop calls on n tensors: the functions with the most own time (where the
    overhead goes; cProfile inflates Python-heavy parts, so shares, not absolute times)."""
    import cProfile
    import pstats
    f = _register()["noop"]["custom_op"]
    ts = [torch.zeros(1) for _ in range(n)]
    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        for _ in range(calls):
            f(ts, SEED, SCALE)
        prof.disable()
    st = pstats.Stats(prof)
    total = st.total_tt or 1e-12
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{os.path.basename(k[0])}:{k[1]}({k[2]})", "ncalls": v[1], "tottime_share": v[2] / total}
            for k, v in rows]


def fit_overhead(rows: list[dict]) -> list[dict]:
    """overhead_us ~ a + b * n_tensors per (route, body), least squares over the measured counts."""
    fits = []
    for body in BODIES:
        for route in ROUTES[1:]:
            pts = [(r["n_tensors"], r["overhead_us"]) for r in rows if r["body"] == body and r["route"] == route]
            if len(pts) < 2:
                continue
            mx = sum(x for x, _ in pts) / len(pts)
            my = sum(y for _, y in pts) / len(pts)
            sxx = sum((x - mx) ** 2 for x, _ in pts)
            slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
            fits.append({"body": body, "route": route, "fixed_us": my - slope * mx, "per_tensor_us": slope,
                         "formula": "overhead_us ~ fixed_us + per_tensor_us * n_tensors"})
    return fits


# ----------------------------------------------------------------------------------------------- 2. pass
def measure_pass(sizes: list[int], repeats: int, case_seconds: float, bf16: bool) -> list[dict]:
    cases = [("fp32", n) for n in sizes] + ([("bf16", max(sizes))] if bf16 else [])
    rows = []
    cpu = torch.device("cpu")
    for dt, n in cases:
        t = torch.zeros(n, dtype=DT[dt])
        timing = time_adaptive(lambda: t.add_(1.0), cpu, warmup=2, repeats=repeats, case_seconds=case_seconds)
        moved = 2 * n * ES[dt]
        rows.append({"op": "t.add_(1.0)", "dtype": dt, "numel": n, "bytes_moved": moved, **timing.as_dict(),
                     "gbps": moved / (timing.median_ms * 1e-3) / 1e9,
                     "formula": "GB/s = 2 * numel * element_size / t (read + write)"})
        del t
        gc.collect()
    return rows


def pass_1b(pass_rows: list[dict]) -> list[dict]:
    fp32 = [r for r in pass_rows if r["dtype"] == "fp32"]
    ref = max(fp32, key=lambda r: r["numel"])
    out = []
    for dt in ("fp32", "bf16"):
        moved = 2 * PARAMS_1B * ES[dt]
        out.append({"target": "this CPU", "dtype": dt, "params": PARAMS_1B, "bytes_moved": moved,
                    "bandwidth_gbps": ref["gbps"], "pass_ms": moved / (ref["gbps"] * 1e9) * 1e3,
                    "source": f"extrapolated: bytes / bandwidth measured here (fp32 t.add_(1.0), {ref['numel']:,} "
                              "elements)"})
        out.append({"target": "H100 SXM", "dtype": dt, "params": PARAMS_1B, "bytes_moved": moved,
                    "bandwidth_gbps": H100_SXM_HBM3_BPS / 1e9, "pass_ms": moved / H100_SXM_HBM3_BPS * 1e3,
                    "source": H100_SOURCE})
    return out


def overhead_share(dispatch: list[dict], passes: list[dict], threshold_pct: float) -> list[dict]:
    out = []
    for r in dispatch:
        if r["route"] == "direct" or r["body"] != "noop":
            continue
        for p in passes:
            pct = 100.0 * r["overhead_us"] * 1e-3 / p["pass_ms"]
            out.append({"route": r["route"], "n_tensors": r["n_tensors"], "target": p["target"], "dtype": p["dtype"],
                        "overhead_us": r["overhead_us"], "pass_ms": p["pass_ms"], "overhead_pct_of_pass": pct,
                        "negligible": pct < threshold_pct})
    return out


# -------------------------------------------------------------------------------------------- 3. compile
def _reinplace_counters() -> dict | None:
    try:
        from torch._dynamo.utils import ReinplaceCounters
    except ImportError:
        return None
    return dict(ReinplaceCounters._values)


def _clear_reinplace_counters() -> None:
    try:
        from torch._dynamo.utils import ReinplaceCounters
        ReinplaceCounters.clear()
    except ImportError:
        pass


def check_compile(backend: str) -> dict:
    ops = _register()["add_all"]
    opaque = torch.compiler.disable(_body_add_all)
    cases = {"custom_op": ops["custom_op"], "library": ops["library"], "opaque (torch.compiler.disable)": opaque}
    out = {"backend": backend, "function": "f(ts, x): y = x * 2; op(ts, seed, scale); return y + ts[0].sum()",
           "op_body": "for t in ts: t.add_(scale)", "cases": {}}
    torch.manual_seed(0)
    ts0 = [torch.randn(64) for _ in range(4)]
    x = torch.randn(64)
    for name, op in cases.items():
        def f(ts, x, op=op):
            y = x * 2.0
            op(ts, SEED, SCALE)
            return y + ts[0].sum()

        rec: dict = {"ok": False}
        try:
            torch._dynamo.reset()
            with torch.no_grad():
                ex = torch._dynamo.explain(f)([t.clone() for t in ts0], x)
            rec.update(graph_count=ex.graph_count, graph_break_count=ex.graph_break_count,
                       break_reasons=[str(getattr(r, "reason", r)).splitlines()[0][:200] for r in ex.break_reasons])
        except Exception as e:  # noqa: BLE001 — recorded, the other checks still run
            rec["explain_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        try:
            torch._dynamo.reset()
            _clear_reinplace_counters()
            t0 = time.perf_counter()
            with torch.no_grad():
                torch.compile(f, backend=backend, fullgraph=True)([t.clone() for t in ts0], x)
            rec["fullgraph_ok"] = True
            rec["compile_s"] = time.perf_counter() - t0
            rec["reinplace_missed"] = _reinplace_counters()
        except Exception as e:  # noqa: BLE001
            rec["fullgraph_ok"] = False
            rec["fullgraph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        try:
            torch._dynamo.reset()
            a, b = [t.clone() for t in ts0], [t.clone() for t in ts0]
            with torch.no_grad():
                got = torch.compile(f, backend=backend)(a, x)
                want = f(b, x)
            rec["result_max_abs_diff"] = float((got - want).abs().max())
            rec["same_result"] = bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5))   # inductor may reorder the sum
            rec["same_mutation"] = all(torch.equal(p, q) for p, q in zip(a, b))
            rec["mutated"] = not all(torch.equal(p, q) for p, q in zip(a, ts0))
            rec["ok"] = rec["same_result"] and rec["same_mutation"] and rec["mutated"]
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        out["cases"][name] = rec
    torch._dynamo.reset()
    return out


# ------------------------------------------------------------------------------------------------ report
def verdict(data: dict) -> dict:
    share = data.get("overhead_share") or []
    worst_n = max((r["n_tensors"] for r in share), default=None)
    comp = (data.get("compile") or {}).get("cases", {})
    v = {"threshold_pct": data["config"]["negligible_pct"],
         "criterion": "adopt custom_op if its overhead per launch (noop body, largest tensor list) is under "
                      "threshold_pct of one pass over 1B parameters on the H100 (bf16: the shortest pass) and "
                      "it compiles with fullgraph=True, giving eager's result"}
    for route in ("custom_op", "library"):
        rows = [r for r in share if r["route"] == route and r["n_tensors"] == worst_n and r["target"] == "H100 SXM"
                and r["dtype"] == "bf16"]
        c = comp.get(route, {})
        if rows:
            pct = rows[0]["overhead_pct_of_pass"]
            v[route] = {"n_tensors": worst_n, "overhead_us": rows[0]["overhead_us"], "h100_bf16_pct": pct,
                        "compiles_fullgraph": c.get("fullgraph_ok"), "compile_matches_eager": c.get("ok"),
                        "negligible": pct < v["threshold_pct"],
                        "adopt": bool(pct < v["threshold_pct"] and c.get("fullgraph_ok") and c.get("ok"))}
    return v


def _f(x, nd=2) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def to_markdown(data: dict) -> str:
    m, cfg = data["meta"], data["config"]
    L = ["## custom_op dispatch overhead vs one fused pass (issue #13)", "",
         f"{m['device_name']}, {m['cpu_threads']} torch threads, torch {m['torch']}, python {m['python']}; "
         f"load average at start {m.get('loadavg')}; {m.get('wall_s')} s in all. Command: `{m['command']}`", ""]
    if data["dispatch"]:
        L += ["### Dispatch, us per call (median of blocks; 1-element fp32 tensors, torch.no_grad)", "",
              f"{cfg['blocks']} blocks x {cfg['calls']} calls per route, routes interleaved. "
              "overhead = route - direct (same body and list).", "",
              "| body | tensors | direct | custom_op | library | custom_op overhead | library overhead | "
              "custom_op p10-p90 |", "|---|---|---|---|---|---|---|---|"]
        by = {(r["body"], r["n_tensors"], r["route"]): r for r in data["dispatch"]}
        for body in BODIES:
            for n in cfg["tensor_counts"]:
                d, c, lb = (by.get((body, n, r)) for r in ROUTES)
                if not (d and c and lb):
                    continue
                L.append(f"| {body} | {n} | {_f(d['us_per_call'])} | {_f(c['us_per_call'])} | "
                         f"{_f(lb['us_per_call'])} | {_f(c['overhead_us'])} | {_f(lb['overhead_us'])} | "
                         f"{_f(c['p10_us'])}-{_f(c['p90_us'])} |")
        L += ["", "Fit: " + "; ".join(f"{f['route']} ({f['body']}) {_f(f['fixed_us'])} us + "
                                      f"{_f(f['per_tensor_us'], 3)} us/tensor" for f in data["overhead_fit"]),
              "Version counter bumped by one call: " + ", ".join(
                  f"{r['route']} {'yes' if r['bumps_version_counter'] else 'no'}" for r in data["dispatch"]
                  if r["body"] == "noop" and r["n_tensors"] == cfg["tensor_counts"][0])
              + " (without the bump, autograd's saved-tensor version check cannot see the in-place write)", ""]
        prof = data.get("custom_op_profile")
        if prof:
            L += [f"custom_op own time by function (cProfile, {prof['calls']} calls, {prof['n_tensors']} tensors): "
                  + "; ".join(f"{p['function']} x{p['ncalls']} {100 * p['tottime_share']:.0f}%"
                              for p in prof["top_own_time"]), ""]
    if data["pass"]:
        L += ["### In-place pass t.add_(1.0) on this CPU", "", "| dtype | elements | median ms | p10-p90 ms | GB/s |",
              "|---|---|---|---|---|"]
        for r in data["pass"]:
            L.append(f"| {r['dtype']} | {r['numel']:,} | {_f(r['median_ms'])} | {_f(r['p10_ms'])}-{_f(r['p90_ms'])} "
                     f"| {_f(r['gbps'])} |")
        L += ["", "### One pass over 1B parameters (2 x bytes: read + write)", "",
              "| target | dtype | GB/s | pass ms | source |", "|---|---|---|---|---|"]
        for p in data["pass_1b"]:
            L.append(f"| {p['target']} | {p['dtype']} | {_f(p['bandwidth_gbps'], 1)} | {_f(p['pass_ms'], 3)} | "
                     f"{p['source']} |")
        L += ["", "### Overhead per launch as % of that pass (noop body)", "",
              "| route | tensors | overhead us | CPU fp32 | CPU bf16 | H100 fp32 | H100 bf16 |",
              "|---|---|---|---|---|---|---|"]
        sh = {(r["route"], r["n_tensors"], r["target"], r["dtype"]): r for r in data["overhead_share"]}
        for route in ROUTES[1:]:
            for n in cfg["tensor_counts"]:
                cells = [sh.get((route, n, t, d)) for t in ("this CPU", "H100 SXM") for d in ("fp32", "bf16")]
                if not all(cells):
                    continue
                L.append(f"| {route} | {n} | {_f(cells[0]['overhead_us'])} | "
                         + " | ".join(f"{c['overhead_pct_of_pass']:.4g}%" for c in cells) + " |")
        L.append("")
    comp = data.get("compile")
    if comp:
        L += [f"### torch.compile (backend {comp['backend']}, CPU)", "", f"`{comp['function']}`, op body "
              f"`{comp['op_body']}`", "",
              "| op | graphs | graph breaks | fullgraph=True | result ~ eager (max abs diff) | mutation = eager "
              "| missed re-inplace | error |",
              "|---|---|---|---|---|---|---|---|"]
        for name, c in comp["cases"].items():
            err = c.get("fullgraph_error") or c.get("error") or c.get("explain_error") or ""
            L.append(f"| {name} | {c.get('graph_count', '')} | {c.get('graph_break_count', '')} | "
                     f"{'yes' if c.get('fullgraph_ok') else 'no'} | {c.get('same_result', '')} "
                     f"({c.get('result_max_abs_diff', '')}) | "
                     f"{c.get('same_mutation', '')} | {c.get('reinplace_missed', '') or 'none'} | "
                     f"{err.replace('|', '/')[:160]} |")
        L.append("")
    v = data.get("verdict") or {}
    if v.get("custom_op"):
        L += ["### Verdict", "", v["criterion"] + f" (threshold {v['threshold_pct']}%).", ""]
        for route in ("custom_op", "library"):
            if route in v:
                r = v[route]
                L.append(f"- {route}: {_f(r['overhead_us'])} us at {r['n_tensors']} tensors = "
                         f"{r['h100_bf16_pct']:.2f}% of an H100 bf16 1B pass; fullgraph compile "
                         f"{'yes' if r['compiles_fullgraph'] else 'no'}, matches eager {r['compile_matches_eager']}"
                         f" -> {'adopt' if r['adopt'] else 'do not adopt as the default launch path'}")
        L.append("")
    if data["errors"]:
        L += ["### Errors", ""] + [f"- {e['what']}: {e['error']}" for e in data["errors"]] + [""]
    return "\n".join(L)


# ------------------------------------------------------------------------------------------------- main
def _size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * mult)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.custom_op", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (custom_op.json, custom_op.md)")
    ap.add_argument("--tensor-counts", default="1,16,256", help="tensor list lengths (comma list)")
    ap.add_argument("--calls", type=int, default=200, help="calls per timed block")
    ap.add_argument("--blocks", type=int, default=101, help="timed blocks per route and case (median over them)")
    ap.add_argument("--sizes", default="16M,64M", help="fp32 pass sizes in elements (K/M/G = 2^10/2^20/2^30)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 pass at the largest size")
    ap.add_argument("--repeats", type=int, default=30, help="maximum timed passes per size (adaptive below)")
    ap.add_argument("--case-seconds", type=float, default=3.0, help="timed work per pass size")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    ap.add_argument("--negligible-pct", type=float, default=1.0, help="overhead share of a pass called negligible")
    ap.add_argument("--threads", type=int, help="torch CPU threads for this run")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with torch_threads(args.threads):
        return _run(args, sys.argv[1:] if argv is None else list(argv))


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.monotonic()
    counts = [int(x) for x in args.tensor_counts.split(",") if x.strip()]
    sizes = [_size(x) for x in args.sizes.split(",") if x.strip()]
    meta = device_info(torch.device("cpu"))
    meta.update(started_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(["python -m benchmarks.custom_op", *argv]),
                loadavg=[round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None)
    data = {"schema": SCHEMA, "meta": meta,
            "config": {"tensor_counts": counts, "calls": args.calls, "blocks": args.blocks, "sizes": sizes,
                       "bf16": not args.no_bf16, "repeats": args.repeats, "case_seconds": args.case_seconds,
                       "compile_backend": None if args.no_compile else args.compile_backend,
                       "negligible_pct": args.negligible_pct, "params": PARAMS_1B,
                       "h100_hbm3_bytes_per_s": H100_SXM_HBM3_BPS},
            "dispatch": [], "overhead_fit": [], "custom_op_profile": None, "pass": [], "pass_1b": [],
            "overhead_share": [], "compile": None,
            "verdict": None, "errors": []}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "custom_op")

    def checkpoint() -> None:
        data["meta"]["wall_s"] = round(time.monotonic() - started, 1)
        if data["dispatch"] and data["pass_1b"]:
            data["overhead_share"] = overhead_share(data["dispatch"], data["pass_1b"], args.negligible_pct)
            data["verdict"] = verdict(data)
        with open(stem + ".json", "w") as f:
            json.dump(data, f, indent=1, default=str)
        with open(stem + ".md", "w") as f:
            f.write(to_markdown(data))

    def part(what: str, fn) -> None:
        print(f"[custom_op] {what} ...", flush=True)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 — one part failing must not end the run
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            data["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}", "traceback": "".join(tb[-6:])})
        checkpoint()

    def dispatch() -> None:
        data["dispatch"] = measure_dispatch(counts, args.calls, args.blocks)
        data["overhead_fit"] = fit_overhead(data["dispatch"])
        data["custom_op_profile"] = {"n_tensors": max(counts), "calls": args.calls,
                                     "top_own_time": profile_custom_op(max(counts), args.calls)}

    def passes() -> None:
        data["pass"] = measure_pass(sizes, args.repeats, args.case_seconds, not args.no_bf16)
        data["pass_1b"] = pass_1b(data["pass"])

    part("dispatch overhead", dispatch)
    part("in-place pass bandwidth", passes)
    if not args.no_compile:
        def comp() -> None:
            data["compile"] = check_compile(args.compile_backend)
        part(f"torch.compile ({args.compile_backend})", comp)
    checkpoint()
    print(to_markdown(data), flush=True)
    print(f"{stem}.json\n{stem}.md", flush=True)
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
