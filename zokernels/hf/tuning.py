"""Which parameters ZO tunes (all, RMS/LayerNorm weights, or LoRA adapters), and rebuilding a fine-tuned
model from the base weights + the fine-tune log."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from .errors import ZOError

TUNE_MODES = ("all", "norms", "final-norm", "lora")
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")


def is_norm_param(name: str) -> bool:
    """RMSNorm/LayerNorm weights: '<...>.<*norm* or ln*>.weight'."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and ("norm" in parts[-2].lower() or parts[-2].startswith("ln"))


def is_final_norm_param(name: str) -> bool:
    """The norm right before the LM head: a norm weight outside the numbered decoder blocks."""
    return is_norm_param(name) and not any(part.isdigit() for part in name.split("."))


def select_trainable(model: nn.Module, mode: str, *, lora_r: int = 8, lora_alpha: float = 16.0,
                     lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS, seed: int = 0) -> nn.Module:
    """Set requires_grad for `mode` and return the model to train (a PeftModel for 'lora', whose adapter
    init is seeded so that the same seed gives the same starting weights)."""
    if mode not in TUNE_MODES:
        raise ZOError(f"--tune must be one of {', '.join(TUNE_MODES)}, got {mode!r}")
    if mode == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    if mode in ("norms", "final-norm"):
        pick = is_norm_param if mode == "norms" else is_final_norm_param
        names = [n for n, p in model.named_parameters() if pick(n)]
        if not names:
            raise ZOError(f"{type(model).__name__} has no normalization weights to tune; use --tune lora or all")
        for n, p in model.named_parameters():
            if n in names:
                p.requires_grad_(True)
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ZOError("--tune lora needs the `peft` package: pip install peft") from None
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in lora_targets if t not in present]
    if missing:
        raise ZOError(f"LoRA target modules {missing} are not in {type(model).__name__}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                      target_modules=list(lora_targets), bias="none"))
    finally:
        torch.random.set_rng_state(state)
    return peft_model


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (tied parameters counted once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def rebuild_model(output_dir: str | os.PathLike, model: nn.Module | None = None):
    """Base model + fine-tune log -> the fine-tuned model, from a `finetune` output dir (its
    run_config.json names the model, dtype and tuning mode; finetune_log.npz holds the steps)."""
    import zokernels

    from .data import load_model_and_tokenizer

    with open(os.path.join(output_dir, "run_config.json")) as fh:
        cfg = json.load(fh)
    dtype = getattr(torch, cfg["dtype"])
    tokenizer = None
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg["model"], dtype=dtype)
    model = select_trainable(model, cfg["tune"], lora_r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                             lora_targets=tuple(cfg["lora_targets"]), seed=cfg["seed"])
    zokernels.replay(model, os.path.join(output_dir, "finetune_log.npz"))
    return model if tokenizer is None else (model, tokenizer)
