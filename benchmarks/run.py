"""Run the benchmark suite and write benchmarks/results/<device>-<date>.{json,md,png}.

    python -m benchmarks                      # everything the device supports, full sizes (H100: ~8-9 min, --time-budget 480 s)
    python -m benchmarks --quick              # small sizes
    python -m benchmarks --device cpu --quick # CPU smoke run
    python benchmarks/run.py ...              # same thing
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"  # noqa: A001

import torch  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.config import BACKENDS, DTYPES, preset  # noqa: E402
from benchmarks.record import Results  # noqa: E402
from benchmarks.timing import device_info, slug, torch_threads  # noqa: E402


def _csv(kind):
    def parse(text: str):
        return [kind(x) for x in text.split(",") if x.strip()]
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds on a GPU)")
    ap.add_argument("--only", choices=("micro", "e2e", "masked", "quant", "prune"), help="run one part only")
    ap.add_argument("--out", default=report.RESULTS_DIR, help="output directory (default benchmarks/results)")
    ap.add_argument("--scale", type=float, help="keep this fraction of decoder layers (micro + e2e)")
    ap.add_argument("--width-div", type=int, help="divide every width of the micro parameter lists")
    ap.add_argument("--dtypes", type=_csv(str), help=f"comma list of {list(DTYPES)}")
    ap.add_argument("--backends", type=_csv(str), help=f"comma list of {list(BACKENDS)}")
    ap.add_argument("--models", type=_csv(str), help="micro parameter lists: llama-7b,opt-1.3b (or none)")
    ap.add_argument("--big-sizes", type=_csv(int), help="single-tensor sizes in elements (comma list)")
    ap.add_argument("--queries", type=_csv(int), help="query counts of the multi-query update")
    ap.add_argument("--e2e-models", type=_csv(str), help="end-to-end models: opt-1.3b,llama-7b")
    ap.add_argument("--zosgd-probes", type=_csv(str), help="ZOSGD probes timed end to end: inplace,hooks,swap")
    ap.add_argument("--e2e-batch", type=int)
    ap.add_argument("--e2e-seq", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--repeats", type=int, help="maximum timed repeats per case (adaptive below)")
    ap.add_argument("--case-seconds", type=float, help="timed work per case that sets the repeat count")
    ap.add_argument("--compile-dtypes", type=_csv(str), help="dtypes for the torch.compile foreach baseline")
    ap.add_argument("--reference-max-numel", type=int, help="largest set timed with the reference backend")
    ap.add_argument("--time-budget", type=float, help="seconds; later cases are skipped (recorded) past it")
    ap.add_argument("--e2e-reserve", type=float, help="seconds of the budget the micro part leaves to e2e")
    ap.add_argument("--threads", type=int, help="torch CPU threads for this run")
    ap.add_argument("--masked-ratios", type=_csv(float), help="mask ratios of the masked kernels (0.01,0.1,0.5,1)")
    ap.add_argument("--masked-blocks", type=_csv(int), help="block sizes (>= 16) of the block masks")
    ap.add_argument("--masked-layers", type=int, help="LLaMA-7B layers whose matrices the masked part uses")
    ap.add_argument("--quant-layers", type=int, help="decoder layers of the QuZO memory model (default 32, quick 4)")
    ap.add_argument("--quant-formats", type=_csv(str), help="QuZO memory formats: int8,int4,fp8")
    ap.add_argument("--prune-layers", type=int, help="decoder layers of the pruning-time model (default 4, quick 1)")
    ap.add_argument("--prune-samples", type=int, help="calibration sequences of the pruning-time cases (default 8)")
    ap.add_argument("--prune-seq", type=int, help="tokens per calibration sequence (default 512, quick 256)")
    ap.add_argument("--prune-seconds", type=float, help="the prune part's own time cap (default 90 s, quick 30 s)")
    return ap.parse_args(argv)


def build_config(args: argparse.Namespace):
    cfg = preset(args.device, args.quick)
    overrides = {"layer_scale": args.scale, "width_div": args.width_div, "dtypes": args.dtypes,
                 "backends": args.backends, "big_sizes": args.big_sizes, "queries": args.queries,
                 "e2e_models": args.e2e_models, "e2e_batch": args.e2e_batch, "e2e_seq": args.e2e_seq,
                 "warmup": args.warmup, "repeats": args.repeats, "case_seconds": args.case_seconds,
                 "compile_dtypes": args.compile_dtypes, "reference_max_numel": args.reference_max_numel,
                 "time_budget_s": args.time_budget, "e2e_reserve_s": args.e2e_reserve,
                 "zosgd_probes": args.zosgd_probes, "masked_ratios": args.masked_ratios,
                 "masked_blocks": args.masked_blocks, "masked_layers": args.masked_layers,
                 "quant_layers": args.quant_layers, "quant_formats": args.quant_formats,
                 "prune_layers": args.prune_layers, "prune_samples": args.prune_samples, "prune_seq": args.prune_seq,
                 "prune_seconds": args.prune_seconds}
    if args.models is not None:
        overrides["models"] = [m for m in args.models if m != "none"]
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    cfg.run_e2e = args.only in (None, "e2e")
    unknown = [d for d in cfg.dtypes if d not in DTYPES] + [b for b in cfg.backends if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown dtype/backend: {unknown}")
    return cfg


def output_stem(out_dir: str, device_name: str, date: str) -> str:
    stem = os.path.join(out_dir, f"{slug(device_name)}-{date}")
    candidate, n = stem, 2
    while os.path.exists(candidate + ".json"):
        candidate, n = f"{stem}-{n}", n + 1
    return candidate


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    with torch_threads(args.threads):
        return _run(args, sys.argv[1:] if argv is None else list(argv))


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = build_config(args)
    started = time.monotonic()
    meta = device_info(cfg.device)
    meta["date"] = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    meta["started_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta["command"] = " ".join(["python -m benchmarks", *argv])
    res = Results(meta, cfg.as_dict())
    os.makedirs(args.out, exist_ok=True)
    stem = output_stem(args.out, meta["device_name"], meta["date"])

    def checkpoint() -> None:  # JSON + MD after every section: a killed run still leaves results
        res.data["meta"]["wall_s"] = round(time.monotonic() - started, 1)
        res.data["targets"] = report.evaluate_targets(res.data)
        import json
        with open(stem + ".json", "w") as f:
            json.dump(res.data, f, indent=1, default=str)
        with open(stem + ".md", "w") as f:
            f.write(report.to_markdown(res.data))

    res.on_checkpoint = checkpoint
    if args.only in (None, "micro"):
        from benchmarks.micro import run_micro
        print(f"[benchmarks] micro on {meta['device_name']} ...", flush=True)
        run_micro(cfg, res)
    if args.only in (None, "masked"):  # after micro: uses what the micro part left of its budget
        from benchmarks.masked import run_masked
        print(f"[benchmarks] masked (MaZO) kernels on {meta['device_name']} ...", flush=True)
        run_masked(cfg, res)
    if args.only in (None, "e2e"):
        from benchmarks.e2e import run_e2e
        print(f"[benchmarks] end to end ({', '.join(cfg.e2e_models)}) ...", flush=True)
        run_e2e(cfg, res)
    if args.only == "quant" or (args.only is None and cfg.device.type == "cuda"):  # last: gets what is left
        from benchmarks.quant import run_quant
        print(f"[benchmarks] quantized matmuls and QuZO memory on {meta['device_name']} ...", flush=True)
        run_quant(cfg, res)
    elif args.only is None:
        res.skip("quant (quantized matmuls, QuZO memory)", "GPU part: on CPU only with --only quant (a smoke run)")
    if args.only in (None, "prune"):  # after quant: runs last; on CPU it records its skip
        from benchmarks.prune import run_prune
        print(f"[benchmarks] pruning (2:4 semi-structured matmuls, prune() time) on {meta['device_name']} ...",
              flush=True)
        run_prune(cfg, res)
    res.data["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    res.data["targets"] = report.evaluate_targets(res.data)
    paths = report.write_outputs(res.data, stem)
    summary = [t for t in res.data["targets"] if t["pass"] is not None]
    print(f"[benchmarks] {sum(t['pass'] for t in summary)}/{len(summary)} targets passed; "
          f"{len(res.data['skipped'])} skipped, {len(res.data['errors'])} errors; "
          f"{res.data['meta']['wall_s']} s", flush=True)
    for p in paths.values():
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
