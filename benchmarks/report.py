"""Targets, Markdown, plot and the README table — all computed from the result JSON, never typed in.

    python -m benchmarks.report --readme [--results DIR]   # markdown performance table for the README
    python -m benchmarks.report RESULT.json                # re-render RESULT.md / RESULT.png
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from .masked import K_COPY_PERSISTENT as K_M_COPY_PERSISTENT
from .masked import K_UPDATE as K_M_UPDATE
from .micro import (K_COPY, K_PERTURB, K_RESTORE_UPDATE, K_RESTORE_UPDATE_SR, K_STEP, K_STEP_DRIFTFREE,
                    K_STEP_INPLACE, k_update_q)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BW_KERNELS = (K_PERTURB, K_RESTORE_UPDATE, k_update_q(1), K_RESTORE_UPDATE_SR, K_COPY)
BW_GOAL_PCT = 90.0
OUTSIDE_GOAL_PCT = 10.0
SPEEDUP_GOAL = 1.6
DRIFT_FREE_GOAL_PCT = 5.0
OURS_E2E = ("ours-ops", "ZOSGD")


# ----------------------------------------------------------------------------- targets
def _target(name: str, scope: str, goal: str, measured, unit: str, ok: bool | None, margin: str) -> dict:
    return {"target": name, "scope": scope, "goal": goal, "measured": measured, "unit": unit,
            "pass": ok, "margin": margin}


def _at_least(name, scope, value, goal, unit):
    ok = value >= goal
    return _target(name, scope, f">= {goal:g}{unit}", round(value, 3), unit, ok,
                   f"{'passes' if ok else 'misses'} by {abs(value - goal):.3g}{unit}")


def _at_most(name, scope, value, goal, unit):
    ok = value <= goal
    return _target(name, scope, f"<= {goal:g}{unit}", round(value, 3), unit, ok,
                   f"{'passes' if ok else 'misses'} by {abs(goal - value):.3g}{unit}")


def _largest_llama(micro: list[dict]) -> str | None:
    sets = {r["shape_set"]: r["numel"] for r in micro if r["shape_set"].startswith("llama-7b")}
    return max(sets, key=sets.get) if sets else None


def evaluate_targets(data: dict) -> list[dict]:
    micro, e2e, out = data.get("micro", []), data.get("e2e", []), []
    llama = _largest_llama(micro)
    scaled = llama is not None and llama != "llama-7b"
    note = f" ({llama}: scaled down, not the 7B size)" if scaled else ""
    rows = [r for r in micro if r["shape_set"] == llama and r["impl"] == "ours"]
    for r in rows:
        if r["kernel"] in BW_KERNELS and r["dtype"] in ("bf16", "fp32"):
            out.append(_at_least(f"{r['kernel']} bandwidth vs copy", f"{r['backend']} {r['dtype']} {llama}{note}",
                                 r["pct_copy_bw"], BW_GOAL_PCT, "%"))
    rng = {r["backend"]: r["elements_per_s"] for r in data.get("rng", [])}
    for r in rows:
        q = _query_count(r["kernel"])
        if q and q > 1 and r["backend"] in rng:
            rng_ms = q * r["numel"] / rng[r["backend"]] * 1e3
            out.append(_target(f"{r['kernel']} (compute bound, reported)", f"{r['backend']} {r['dtype']} {llama}",
                               "report only", round(r["pct_copy_bw"], 2), "% of copy BW", None,
                               f"{r['median_ms']:.3g} ms vs {rng_ms:.3g} ms for {q} x numel z alone at the "
                               f"RNG rate ({rng[r['backend']] / 1e9:.3g} Gelem/s): "
                               f"{r['median_ms'] / rng_ms:.2f}x the RNG-only time"))
    by_key = {(r["backend"], r["dtype"], r["kernel"]): r for r in rows}
    for (backend, dtype, kernel), r in sorted(by_key.items()):
        if kernel == K_STEP_DRIFTFREE and (backend, dtype, K_STEP_INPLACE) in by_key:
            ip = by_key[(backend, dtype, K_STEP_INPLACE)]["median_ms"]
            out.append(_at_most("drift-free step sweeps within 5% of in-place", f"micro {backend} {dtype} {llama}",
                                100 * (r["median_ms"] / ip - 1), DRIFT_FREE_GOAL_PCT, "%"))
    for model in sorted({r["model"] for r in e2e}):
        rs = [r for r in e2e if r["model"] == model and "median_ms" in r]
        mezo = next((r for r in rs if r["impl"] == "mezo"), None)
        scope_sfx = "" if not rs else f" (layers {rs[0]['layers']}, batch {rs[0]['batch']}x{rs[0]['seq']})"
        ours = [r for r in rs if r["impl"] in OURS_E2E]
        for r in ours:
            label = f"{model} {r['impl']} probe={r['probe']} [{r['backend']}]{scope_sfx}"
            out.append(_at_most("ZO step time outside the 2 forwards", label, r["outside_share_pct"],
                                OUTSIDE_GOAL_PCT, "% of forwards"))
            if mezo:
                out.append(_at_least("whole ZO step speedup over MeZO", label, mezo["median_ms"] / r["median_ms"],
                                     SPEEDUP_GOAL, "x"))
            if r.get("peak_bytes") is not None and r.get("inference_peak_bytes") is not None:
                allowed = r["inference_peak_bytes"] + r["module_in_flight_bytes"]
                out.append(_at_most("ZO peak memory <= inference peak + params of modules in flight", label,
                                    (r["peak_bytes"] - allowed) / 2**20, 0.0, " MiB over the allowance"))
        inplace = next((r for r in ours if r["impl"] == "ZOSGD" and r["probe"] == "inplace"), None)
        for r in ours:
            if inplace and r["impl"] == "ZOSGD" and r["probe"] in ("hooks", "swap"):
                out.append(_at_most("drift-free step within 5% of in-place",
                                    f"{model} ZOSGD {r['probe']} vs inplace",
                                    100 * (r["median_ms"] / inplace["median_ms"] - 1), DRIFT_FREE_GOAL_PCT, "%"))
    return out


def _query_count(kernel: str) -> int | None:
    if kernel.startswith("zo_update_ q="):
        return int(kernel.split("=")[1])
    return None


# ----------------------------------------------------------------------------- markdown
def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:.3e}"
    return str(x)


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _gib(b) -> str:
    return "—" if b is None else f"{b / 2**30:.2f}"


def to_markdown(data: dict) -> str:
    m = data["meta"]
    out = [f"# zokernels benchmarks — {m.get('device_name')} — {m.get('date')}", "",
           _table(["field", "value"], [
               ["device", m.get("device_name")], ["driver", m.get("driver_version")],
               ["GPU memory (GiB)", m.get("gpu_memory_gib")], ["compute capability", m.get("compute_capability")],
               ["CUDA runtime (torch)", m.get("cuda_runtime")], ["torch", m.get("torch")],
               ["triton", m.get("triton")], ["transformers", m.get("transformers")], ["python", m.get("python")],
               ["date", m.get("date")], ["command", m.get("command")], ["wall time (s)", m.get("wall_s")]]), ""]
    out += ["## Targets", "", _table(["target", "scope", "goal", "measured", "pass", "margin"],
                                     [[t["target"], t["scope"], t["goal"], t["measured"],
                                       "—" if t["pass"] is None else ("PASS" if t["pass"] else "MISS"), t["margin"]]
                                      for t in data.get("targets", [])]) or "(none)", ""]
    cb = data.get("copy_bandwidth")
    if cb:
        out += ["## Copy bandwidth and RNG rate", "",
                f"Device copy: {cb['bytes_per_copy'] / 2**30:.3g} GiB tensor `.copy_`, median {cb['median_ms']:.3g} ms "
                f"-> **{cb['gbps']:.1f} GB/s** ({cb['formula']}).", ""]
    if data.get("rng"):
        out += [_table(["kernel", "backend", "elements", "median ms", "Gelem/s", "GB/s", "% copy"],
                       [[r["kernel"], r["backend"], r["numel"], r["median_ms"], r["elements_per_s"] / 1e9, r["gbps"],
                         r["pct_copy_bw"]] for r in data["rng"]]), ""]
    if data.get("micro"):
        out += ["## Microbenchmarks", "", "P = bytes of the parameter set in its dtype. GB/s = counted bytes / median "
                "time; % copy = GB/s / copy GB/s.", ""]
        groups: dict[tuple, list] = {}
        for r in data["micro"]:
            groups.setdefault((r["shape_set"], r["dtype"]), []).append(r)
        for (shape_set, dtype), rs in groups.items():
            mezo = next((r["median_ms"] for r in rs if r["impl"] == "mezo"), None)
            out += [f"### {shape_set} {dtype} — {rs[0]['shape_note']}, {rs[0]['numel']:,} elements, "
                    f"{rs[0]['tensors']} tensors, P = {rs[0]['param_bytes'] / 2**30:.3g} GiB", "",
                    _table(["kernel", "impl", "backend", "median ms", "p10", "p90", "n", "bytes", "GB/s", "% copy",
                            "step speedup vs mezo"],
                           [[r["kernel"], r["impl"], r["backend"], r["median_ms"], r["p10_ms"], r["p90_ms"],
                             r["repeats"], r["bytes_formula"].split(" ")[0], r["gbps"], r["pct_copy_bw"],
                             mezo / r["median_ms"] if mezo and r["kernel"].startswith(K_STEP) else None]
                            for r in rs]), ""]
    if data.get("e2e"):
        out += ["## End to end (one ZO step = 2 forwards + perturbation/update; bf16)", "",
                _table(["model", "layers", "batch x seq", "impl", "probe", "backend", "median ms", "p10", "p90",
                        "outside fwd ms", "outside % of 2 fwd", "peak GiB", "speedup vs mezo"],
                       [[r["model"], r["layers"], f"{r['batch']}x{r['seq']}", r["impl"], r.get("probe"),
                         r.get("backend"), r.get("median_ms"), r.get("p10_ms"), r.get("p90_ms"),
                         r.get("outside_forward_ms"), r.get("outside_share_pct"),
                         "OOM" if r.get("oom") else _gib(r.get("peak_bytes")), _speedup(data["e2e"], r)]
                        for r in data["e2e"]]), ""]
    adapters = [r for r in data.get("e2e", []) if r.get("adapters")]
    if adapters:
        out += ["### Adapters (benchmarks/e2e.py adapter_case; trainable: the adapters only)", "",
                _table(["model", "impl", "probe", "adapters", "trainable params", "median ms", "forward ratio "
                        "(with / without)", "outside % of 2 fwd", "peak GiB"],
                       [[r["model"], r["impl"], r.get("probe"),
                         f"{r['adapters']['count']} x {r['adapters']['placement']} r={r['adapters']['reduction']}",
                         r["adapters"]["params"], r.get("median_ms"), r.get("forward_ratio"),
                         r.get("outside_share_pct"), _gib(r.get("peak_bytes"))] for r in adapters]), ""]
    if data.get("memory"):
        out += ["## Peak GPU memory (torch.cuda.max_memory_allocated after reset)", "",
                _table(["model", "what", "peak GiB", "OOM", "note"],
                       [[r["model"], r["what"], _gib(r["peak_bytes"]), r["oom"], r.get("error", "")]
                        for r in data["memory"]]), ""]
    if data.get("masked"):
        out += masked_markdown(data["masked"])
    if data.get("quant"):
        from .quant import quant_markdown
        out += quant_markdown(data["quant"], _table)
    if data.get("prune"):
        from .prune import prune_markdown
        out += prune_markdown(data["prune"], _table)
    formulas = sorted({(r["impl"], r["kernel"], r["bytes_formula"]) for r in data.get("micro", [])})
    if formulas:
        out += ["## Bytes counted per call", "", _table(["impl", "kernel", "formula"], [list(f) for f in formulas]), ""]
    if data.get("skipped"):
        out += ["## Skipped", "", _table(["what", "reason"], [[s["what"], s["reason"]] for s in data["skipped"]]), ""]
    if data.get("errors"):
        out += ["## Errors", "", _table(["what", "error"], [[e["what"], e["error"]] for e in data["errors"]]), ""]
    return "\n".join(out) + "\n"


def masked_markdown(rows: list[dict]) -> list[str]:
    """The masked-kernel section (benchmarks/masked.py), one table per (weights, dtype, backend)."""
    out = ["## Masked kernels (MaZO)", "",
           "Masks from uniform random scores: `rows` = row top-k elements, `blocksB` = top-k blocks of B "
           "contiguous columns per row. Bytes touched: DRAM moves 32-byte sectors, so a masked pass costs "
           "2 x 32 x S + I (S = sectors holding a masked element, I = index bytes); the fresh-clone probe "
           "adds the dense clone's 2P; dense kernels 2P. GB/s = touched bytes / median time. vs dense = "
           "median time / the dense kernel's (perturb_, restore+update, perturbed_copy into a scratch) on "
           "the same weights and backend.", ""]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["shape_set"], r["dtype"], r["backend"]), []).append(r)
    for (shape_set, dtype, backend), rs in groups.items():
        out += [f"### {shape_set} {dtype} {backend} — {rs[0]['shape_note']}, {rs[0]['numel']:,} elements, "
                f"P = {rs[0]['param_bytes'] / 2**30:.3g} GiB", "",
                _table(["rule", "ratio", "masked %", "sectors %", "kernel", "median ms", "p10", "p90", "n",
                        "vs dense", "bytes", "touched MB", "GB/s", "% copy"],
                       [[r["rule"], r["ratio"], 100 * r["mask_ratio"], 100 * r["sector_fraction"], r["kernel"],
                         r["median_ms"], r["p10_ms"], r["p90_ms"], r["repeats"], r.get("vs_dense"),
                         r["bytes_formula"], r["bytes_touched"] / 1e6, r["gbps"], r["pct_copy_bw"]] for r in rs]),
                ""]
    return out


def masked_vs_dense(data: dict, kernel: str, ratio: float = 0.1, dtype: str = "bf16") -> str | None:
    """'rows x / blocksB y': the fastest non-reference backend's time vs dense at this ratio."""
    parts = []
    for rule in sorted({r["rule"] for r in data.get("masked", []) if r["rule"] != "dense"}):
        vals = [r["vs_dense"] for r in data["masked"] if r["rule"] == rule and r["kernel"] == kernel
                and r["dtype"] == dtype and r["ratio"] == ratio and r["backend"] != "reference"
                and r.get("vs_dense") is not None]
        if vals:
            parts.append(f"{rule} {min(vals):.2f}x")
    return " / ".join(parts) or None


def _speedup(e2e: list[dict], r: dict):
    mezo = next((x for x in e2e if x["model"] == r["model"] and x["impl"] == "mezo" and "median_ms" in x), None)
    if mezo is None or r.get("median_ms") is None or r["impl"] not in OURS_E2E + ("mezo",):
        return None
    return mezo["median_ms"] / r["median_ms"]


# ----------------------------------------------------------------------------- plot
def plot(data: dict, path: str) -> None:
    """GB/s per kernel (largest LLaMA set, or the largest set) per dtype, with the copy-bandwidth line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    micro = data.get("micro", [])
    copy = (data.get("copy_bandwidth") or {}).get("gbps")
    target = _largest_llama(micro) or (max(micro, key=lambda r: r["numel"])["shape_set"] if micro else None)
    rows = [r for r in micro if r["shape_set"] == target]
    dtypes = [d for d in ("bf16", "fp32", "fp16") if any(r["dtype"] == d for r in rows)] or ["(none)"]
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(12, 3.6 * len(dtypes)), squeeze=False)
    for ax, dtype in zip(axes[:, 0], dtypes):
        rs = [r for r in rows if r["dtype"] == dtype]
        labels = [f"{r['kernel']}\n{r['impl']}/{r['backend']}" for r in rs]
        colors = ["tab:blue" if r["impl"] == "ours" else "tab:gray" for r in rs]
        ax.bar(range(len(rs)), [r["gbps"] for r in rs], color=colors)
        if copy:
            ax.axhline(copy, color="tab:red", linestyle="--", label=f"device copy {copy:.0f} GB/s")
            ax.axhline(0.9 * copy, color="tab:orange", linestyle=":", label="90% of copy")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("GB/s (counted bytes)")
        ax.set_title(f"{target} {dtype} — {data['meta'].get('device_name')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- README table
def readme_table(results_dir: str = RESULTS_DIR, include_cpu: bool = False) -> str:
    """Markdown summary of every committed results JSON (one row per run), for the README.
    CPU runs (smoke runs on the reference backend) are left out unless include_cpu."""
    rows = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        if data.get("meta", {}).get("device_type") == "cpu" and not include_cpu:
            continue
        micro, e2e = data.get("micro", []), data.get("e2e", [])
        llama = _largest_llama(micro)

        def best_pct(kernel, dtype):
            vals = [r["pct_copy_bw"] for r in micro if r["shape_set"] == llama and r["impl"] == "ours"
                    and r["kernel"] == kernel and r["dtype"] == dtype and r["backend"] != "reference"]
            return max(vals) if vals else None

        def e2e_best(model):
            mezo = next((r for r in e2e if r["model"] == model and r["impl"] == "mezo" and "median_ms" in r), None)
            ours = [r for r in e2e if r["model"] == model and r["impl"] in OURS_E2E and "median_ms" in r]
            if not ours:
                return None, None
            best = min(ours, key=lambda r: r["median_ms"])
            return (mezo["median_ms"] / best["median_ms"] if mezo else None), best["outside_share_pct"]

        sp_llama, out_llama = e2e_best("llama-7b")
        sp_opt, _ = e2e_best("opt-1.3b")
        passed = [t["pass"] for t in data.get("targets", []) if t["pass"] is not None]
        rows.append([data["meta"].get("device_name"), data["meta"].get("date"), llama,
                     (data.get("copy_bandwidth") or {}).get("gbps"), best_pct(K_PERTURB, "bf16"),
                     best_pct(K_RESTORE_UPDATE, "bf16"), best_pct(K_RESTORE_UPDATE, "fp32"), sp_llama, out_llama,
                     sp_opt, masked_vs_dense(data, K_M_UPDATE), masked_vs_dense(data, K_M_COPY_PERSISTENT),
                     f"{sum(passed)}/{len(passed)}" if passed else None, os.path.basename(path)])
    if not rows:
        return "_No benchmark results committed yet (run `python -m benchmarks` on a GPU)._\n"
    head = ["device", "date", "param set", "copy GB/s", "perturb_ bf16 % copy", "restore+update bf16 % copy",
            "restore+update fp32 % copy", "LLaMA-7B step speedup vs MeZO", "LLaMA-7B outside-forward %",
            "OPT-1.3B step speedup vs MeZO", "MaZO 10% bf16 update time vs dense (rows / blocks)",
            "MaZO 10% bf16 probe copy (persistent) time vs dense copy (rows / blocks)", "targets passed", "file"]
    return ("<!-- generated by `python -m benchmarks.report --readme` from benchmarks/results/*.json -->\n"
            + _table(head, rows) + "\n")


def write_outputs(data: dict, stem: str) -> dict:
    """stem.json, stem.md, stem.png; returns their paths (the PNG is best effort)."""
    paths = {"json": stem + ".json", "md": stem + ".md", "png": stem + ".png"}
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(to_markdown(data))
    try:
        plot(data, paths["png"])
    except ImportError as e:  # the GPU image may lack matplotlib: `python -m benchmarks.report X.json` redraws it
        print(f"plot skipped: matplotlib missing ({e})", flush=True)
        del paths["png"]
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", nargs="?", help="a result JSON to re-render (.md and .png next to it)")
    ap.add_argument("--readme", action="store_true", help="print the README performance table")
    ap.add_argument("--results", default=RESULTS_DIR, help="directory of result JSON files")
    ap.add_argument("--include-cpu", action="store_true", help="also list CPU (smoke) runs")
    args = ap.parse_args(argv)
    if args.readme:
        sys.stdout.write(readme_table(args.results, args.include_cpu))
        return 0
    if not args.result:
        ap.error("give a result JSON or --readme")
    with open(args.result) as f:
        data = json.load(f)
    data["targets"] = evaluate_targets(data)
    print(write_outputs(data, os.path.splitext(args.result)[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
