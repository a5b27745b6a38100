"""The prune job on a real model and corpus (`python -m zokernels prune`): calibration windows of the corpus's
training-pool text (never a dev or test text), held-out perplexity and zero-shot test accuracy before and after,
zokernels.prune.prune in between, then the pruned model with its kept-weight masks (hf.pruning.PRUNE_MASKS_FILE) and
PRUNE_REPORT_FILE."""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import torch
from torch import nn

from ..masks import save_masks
from .pruning import PRUNE_MASKS_FILE, calibration_batches

PRUNE_REPORT_FILE = "prune_report.json"
Say = Callable[[str], None]


def evaluate_model(cfg: dict, model: nn.Module, tokenizer, splits: dict, say: Say, what: str) -> dict:
    """Held-out LM perplexity of the dev texts and, with cfg['accuracy'], the task's test accuracy (per example)."""
    from .scoring import VerbalizerCollator, evaluate_accuracy
    from .tapt import TextLMCollator, heldout_lm_loss

    t0 = time.time()
    bar = None if cfg.get("no_progress") else f"{what}: held-out text"
    out = {"heldout": heldout_lm_loss(model, TextLMCollator(tokenizer, cfg["max_text_tokens"]),
                                      splits["unlabeled_dev"], cfg["eval_batch_size"], progress=bar)}
    if cfg["accuracy"] == "yes":
        acc, correct = evaluate_accuracy(model, VerbalizerCollator(tokenizer, cfg["task"]), splits["test"],
                                         cfg["eval_batch_size"],
                                         progress=None if cfg.get("no_progress") else f"{what}: test")
        out.update(test_accuracy=acc, test_correct=correct)
    out["seconds"] = time.time() - t0
    say(f"{what}: held-out perplexity {out['heldout']['perplexity']:.2f}"
        + (f", test accuracy {out['test_accuracy']:.4f}" if "test_accuracy" in out else "")
        + f" ({out['seconds']:.0f}s)")
    return out


def run_prune(cfg: dict, say: Say = print) -> dict:
    """The prune job: data and model, evaluation before, prune (zokernels.prune.prune), evaluation after, then the
    pruned model + PRUNE_MASKS_FILE in <output_dir>/model (with --save-model yes) and PRUNE_REPORT_FILE."""
    from transformers import set_seed

    from ..prune import prune
    from .data import load_model_and_tokenizer
    from .pipeline import load_task_data
    from .stats import mcnemar

    started = time.time()
    out = cfg["output_dir"]
    _, task, splits = load_task_data({**cfg, "tapt_steps": 1, "tapt_examples": 0,
                                      "tapt_eval_examples": cfg["eval_texts"]})
    cfg = {**cfg, "task": task}
    set_seed(cfg["seed"])
    model, tokenizer = load_model_and_tokenizer(cfg["model"], dtype=getattr(torch, cfg["dtype"]))
    model.config.use_cache = False
    model.to(cfg["device"]).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    batches = [] if cfg["method"] == "magnitude" else [
        {k: v.to(cfg["device"]) for k, v in b.items()}
        for b in calibration_batches(tokenizer, splits["unlabeled"], cfg["calibration_examples"],
                                     cfg["calibration_tokens"])]
    say(f"calibration: {len(batches)} sequences x {cfg['calibration_tokens']} tokens of the training pool's text "
        f"(no dev or test text); held-out perplexity on {len(splits['unlabeled_dev'])} dev texts")
    before = evaluate_model(cfg, model, tokenizer, splits, say, "dense")
    report = prune(model, batches or None, cfg["method"], cfg["sparsity"], cfg["pattern"], alpha=cfg["alpha"],
                   regional_opt=cfg["regional_opt"] == "yes", ro_rounds=cfg["ro_rounds"], ro_lr=cfg["ro_lr"],
                   ro_samples=cfg["ro_samples"], progress=not cfg.get("no_progress"))
    say(f"pruned {len(report.masks)} linears with {cfg['method']} ({cfg['pattern']}, sparsity "
        f"{report.overall_sparsity:.4f}) in {report.seconds:.1f}s")
    after = evaluate_model(cfg, model, tokenizer, splits, say, "pruned")
    result = {"config": {k: v for k, v in cfg.items() if k != "task"}, "prune": report.to_dict(),
              "dense": _public(before), "pruned": _public(after), "seconds": time.time() - started}
    if "test_correct" in before:
        result["pruned"]["mcnemar_vs_dense"] = mcnemar(before["test_correct"], after["test_correct"])
    if cfg["save_model"] == "yes":
        model_dir = os.path.join(out, "model")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        save_masks(report.masks, os.path.join(model_dir, PRUNE_MASKS_FILE))
        say(f"pruned model and masks saved to {model_dir} (fine-tune it with: python -m zokernels finetune --model "
            f"{model_dir}; its masks keep the pruned weights at zero)")
    else:
        save_masks(report.masks, os.path.join(out, PRUNE_MASKS_FILE))
    with open(os.path.join(out, PRUNE_REPORT_FILE), "w") as fh:
        correct = {k: {"test_correct": ev["test_correct"]} if "test_correct" in ev else {}
                   for k, ev in (("dense", before), ("pruned", after))}
        json.dump({**result, "pruned": {**result["pruned"], **correct["pruned"]},
                   "dense": {**result["dense"], **correct["dense"]}}, fh, indent=1)
    return result


def _public(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if k != "test_correct"}
