"""What the prune job (hf/prune_job.py) and a fine-tuning run of a pruned model share: calibration sequences packed
from the corpus's unlabeled training-pool text, the kept-weight masks file beside a pruned model's weights
(PRUNE_MASKS_FILE, found by `finetune --masks auto`), those masks filtered to what a run trains, and the reset that
keeps pruned weights at zero under first-order training."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from .. import contract as C
from ..masks import ParamMask, load_masks
from .errors import ZOError

PRUNE_MASKS_FILE = "prune_masks.safetensors"


def calibration_batches(tokenizer, texts: Sequence[str], sequences: int, tokens: int) -> list[dict]:
    """`sequences` batches of one row of `tokens` token ids each: the texts tokenized in order, joined by the EOS
    token and cut into windows (Wanda's calibration is windows of running text, too). Fewer when the texts run out;
    ZOError when they do not fill one window."""
    if sequences < 1 or tokens < 2:
        raise ZOError(f"calibration needs >= 1 sequence of >= 2 tokens, got {sequences} x {tokens}")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    need = sequences * tokens
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
        if len(stream) >= need:
            break
    n = min(sequences, len(stream) // tokens)
    if n == 0:
        raise ZOError(f"the calibration text holds {len(stream)} tokens, fewer than one sequence of {tokens}")
    ids = torch.tensor(stream[:n * tokens]).view(n, 1, tokens)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]


def masks_file_of(model: str | None) -> str | None:
    """The masks file a pruned model directory holds (PRUNE_MASKS_FILE), else None."""
    if model and os.path.isdir(model) and os.path.isfile(os.path.join(model, PRUNE_MASKS_FILE)):
        return os.path.join(model, PRUNE_MASKS_FILE)
    return None


def plain_name(name: str) -> str:
    """A parameter's name in the unwrapped model: contract.canonical_name, then PEFT's `base_model.model.` prefix and
    `.base_layer` segment removed (a LoRA model's frozen base weights keep their masks' names)."""
    name = C.canonical_name(name)
    name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
    return name.replace(".base_layer.", ".")


def trained_masks(model: nn.Module, path: str | None) -> dict[str, ParamMask] | None:
    """The masks of `path` for the parameters `model` trains (requires_grad), under their names in `model`
    (wrappers such as PEFT's matched by plain_name); None when no trained parameter has one. A mask whose shape
    differs from its parameter's: ZOError (the masks are not this model's)."""
    if not path:
        return None
    masks = {plain_name(n): m for n, m in load_masks(path).items()}
    out = {}
    for name, p in model.named_parameters():
        m = masks.get(plain_name(name))
        if m is None:
            continue
        if tuple(p.shape) != m.shape:
            raise ZOError(f"{path}: the mask of {name} has shape {m.shape}, the parameter {tuple(p.shape)}: these "
                          "masks belong to another model")
        if p.requires_grad:
            out[name] = m.to(p.device)
    return out or None


class KeepPrunedZero:
    """A transformers TrainerCallback body for first-order training of a pruned model: after every optimizer
    step, the pruned elements of the masked parameters are set back to zero (AdamW moves every element)."""

    def __init__(self, model: nn.Module, masks: dict[str, ParamMask]):
        params = dict(model.named_parameters())
        self.pairs = [(params[n], m.dense().to(params[n].device)) for n, m in masks.items()]

    def __call__(self) -> None:
        with torch.no_grad():
            for p, keep in self.pairs:
                p.masked_fill_(~keep, 0.0)


def pruned_fraction(model: nn.Module, masks: dict[str, ParamMask]) -> float:
    """Zeros / elements over the masked parameters of `model` (matched by plain_name): a check that pruning held."""
    params = {plain_name(n): p for n, p in model.named_parameters()}
    found = [params[plain_name(n)] for n in masks if plain_name(n) in params]
    total = sum(p.numel() for p in found)
    return sum(int((p == 0).sum()) for p in found) / total if total else 0.0
