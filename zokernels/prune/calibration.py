"""Calibration plumbing for block-by-block pruning: the decoder blocks of a model, the inputs of the first block
for every calibration batch (captured by a pre-hook, the model's own embedding / rotary / mask code having run), and
one block run on such an input. Nothing here knows an architecture beyond where its block list lives."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .patterns import PruneError

# where causal LMs keep their decoder blocks (Llama-like, OPT, GPT-2, GPT-NeoX); `blocks=` names any other
BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


def _get(root: nn.Module, path: str):
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def decoder_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """(path, blocks): the ModuleList of decoder blocks at `path`, or at the first of BLOCK_PATHS the model has."""
    for p in ([path] if path else BLOCK_PATHS):
        blocks = _get(model, p)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return p, blocks
    where = f"at {path!r}" if path else f"at any of {BLOCK_PATHS}"
    raise PruneError(f"{type(model).__name__} has no ModuleList of decoder blocks {where}; pass blocks='<path>'")


def block_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name within the block, module) of every nn.Linear inside `block`, in module order."""
    return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]


@dataclass
class BlockInput:
    """One calibration batch at a block's input: the hidden states, the block's other arguments (as the model
    passed them to its first block, caches removed) and the real-token weights [batch, tokens] (None: all)."""
    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    hidden_in_kwargs: bool = False
    tokens: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.hidden.shape[0])

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInput":
        return BlockInput(hidden, self.args, self.kwargs, self.hidden_in_kwargs, self.tokens)

    def row(self, r: int) -> "BlockInput":
        """Calibration sample r alone: every tensor whose first dimension is the batch sliced to [r:r+1]."""
        n = self.rows
        return BlockInput(self.hidden[r:r + 1], _slice(self.args, r, n), _slice(self.kwargs, r, n),
                          self.hidden_in_kwargs, None if self.tokens is None else self.tokens[r:r + 1])

    def cast(self, dtype: torch.dtype) -> "BlockInput":
        return BlockInput(_cast(self.hidden, dtype), _cast(self.args, dtype), _cast(self.kwargs, dtype),
                          self.hidden_in_kwargs, self.tokens)


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _slice(obj, r: int, n: int):
    return _map(obj, lambda t: t[r:r + 1] if t.ndim and t.shape[0] == n and n > 1 else t)


def _cast(obj, dtype: torch.dtype):
    return _map(obj, lambda t: t.to(dtype) if t.is_floating_point() else t)


def run_block(block: nn.Module, x: BlockInput, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The block's output hidden states for input `x` (its hidden states replaced by `hidden` if given)."""
    h = x.hidden if hidden is None else hidden
    out = block(*x.args, hidden_states=h, **x.kwargs) if x.hidden_in_kwargs else block(h, *x.args, **x.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _Captured(Exception):
    pass


def _token_weights(batch: Mapping) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return mask.to(torch.float64) if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None


def _forward_kwargs(model: nn.Module) -> dict:
    """use_cache=False where the model takes it (a KV cache captured into the block kwargs would grow per call)."""
    config = getattr(model, "config", None)
    return {"use_cache": False} if config is not None and hasattr(config, "use_cache") else {}


@torch.no_grad()
def capture_inputs(model: nn.Module, first_block: nn.Module, batches: list[Mapping]) -> list[BlockInput]:
    """The first block's input for every batch (`model(**batch)` run until it reaches the block)."""
    captured: list[BlockInput] = []
    current: dict[str, Any] = {}

    def pre(module, args, kwargs):
        kwargs = dict(kwargs)
        for k in _CACHE_KWARGS:
            if k in kwargs:
                kwargs[k] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if args:
            x = BlockInput(args[0], tuple(args[1:]), kwargs, False, current["tokens"])
        elif "hidden_states" in kwargs:
            x = BlockInput(kwargs.pop("hidden_states"), (), kwargs, True, current["tokens"])
        else:
            raise PruneError(f"{type(module).__name__} was called without hidden states as its first argument "
                             "or `hidden_states=`")
        captured.append(x)
        raise _Captured

    handle = first_block.register_forward_pre_hook(pre, with_kwargs=True)
    extra = _forward_kwargs(model)
    try:
        for i, batch in enumerate(batches):
            current["tokens"] = _token_weights(batch)
            try:
                model(**batch, **extra)
            except _Captured:
                continue
            raise PruneError(f"calibration batch {i}: the model's forward never reached its first decoder block")
    finally:
        handle.remove()
    return captured


def check_batches(calibration) -> list[Mapping]:
    """The calibration batches as a list of mappings (the model takes each as model(**batch)); PruneError if none."""
    if calibration is None:
        raise PruneError("this method needs calibration data: an iterable of batches the model takes as model(**batch)")
    if isinstance(calibration, Mapping):
        calibration = [calibration]
    batches = list(calibration)
    if not batches:
        raise PruneError("the calibration data is empty")
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping):
            raise PruneError(f"calibration batch {i} is a {type(b).__name__}, not a mapping of model inputs")
    return batches
