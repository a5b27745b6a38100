"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) for ZO fine-tuning.

    adapter(h) = h + up(act(down(LN(h))))      down: d -> d / r, up: d / r -> d, LN optional

`up` starts at zero, so the adapted model computes exactly what the base model does until a step moves it
(h + 0 = h in every dtype). An adapter is attached to a sublayer of each decoder block (its output, before
the block's residual add) by a forward hook, and registered as that sublayer's child `adapter`: the base
weights keep their names (a base state_dict still loads) and an adapter's parameters are named
`<sublayer>.adapter.<param>`. Placements: "pfeiffer" (after the MLP, one per block) and "houlsby" (after
the attention block and after the MLP, two per block).

The adapter parameters are ordinary trainable parameters: ZOSGD, QuZO's float parameters, ZOTrainer, the log
and replay see them like any other weight. This module imports no transformers: the architectures it knows
are described by their module paths (ARCHITECTURES).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

PLACEMENTS = ("pfeiffer", "houlsby")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
FORMAT = "zokernels.adapters"


class AdapterError(ValueError):
    """Adapters cannot be added to, saved from or loaded into this model as asked."""


@dataclass(frozen=True)
class Architecture:
    """Where the decoder blocks are and which sublayers the adapters follow (attribute paths)."""

    blocks: str        # path of the ModuleList of decoder blocks, from the model
    attention: str     # the attention sublayer of a block (its output precedes the first residual add)
    mlp: str           # the sublayer whose output precedes the MLP's residual add
    hidden: str        # config attribute holding the hidden size


# model_type (config.model_type) -> layout; HF LlamaForCausalLM, OPTForCausalLM, GPT2LMHeadModel
ARCHITECTURES = {
    "llama": Architecture("model.layers", "self_attn", "mlp", "hidden_size"),
    "opt": Architecture("model.decoder.layers", "self_attn", "fc2", "hidden_size"),
    "gpt2": Architecture("transformer.h", "attn", "mlp", "n_embd"),
}


@dataclass(frozen=True)
class AdapterConfig:
    placement: str = "pfeiffer"
    reduction: int = 16
    activation: str = "relu"
    layer_norm: bool = False
    float32: bool = False
    layers: int = 0            # adapters in the last `layers` decoder blocks (0: every block)
    hidden: int = 0            # d, filled in by add_adapters
    bottleneck: int = 0        # d / r, filled in by add_adapters


class BottleneckAdapter(nn.Module):
    """h + up(act(down(LN(h)))); computed in float32 when `float32` (the result cast back to h's dtype)."""

    def __init__(self, hidden: int, bottleneck: int, activation: str = "relu", layer_norm: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, dtype=dtype, device=device) if layer_norm else None
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down.weight.dtype)
        if self.norm is not None:
            x = self.norm(x)
        return h + self.up(self.act(self.down(x))).to(h.dtype)


class _AdapterHook:
    """Forward hook of a sublayer: its output (or the first element of a tuple output) through its adapter."""

    def __call__(self, module: nn.Module, args, output):
        if isinstance(output, tuple):
            return (module.adapter(output[0]),) + output[1:]
        return module.adapter(output)


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def architecture_of(model: nn.Module) -> Architecture:
    """The layout of a supported model; AdapterError naming the supported ones otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise AdapterError(f"adapters know the architectures {sorted(ARCHITECTURES)} (config.model_type), not "
                           f"{model_type!r} ({type(model).__name__})")
    try:
        blocks = _get(model, arch.blocks)
    except AttributeError:
        raise AdapterError(f"{type(model).__name__} has model_type {model_type!r} but no {arch.blocks}: pass "
                           "the causal-LM model itself") from None
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise AdapterError(f"{type(model).__name__}.{arch.blocks} holds no decoder blocks")
    return arch


def _sites(model: nn.Module, arch: Architecture, placement: str, layers: int = 0) -> list[tuple[str, nn.Module]]:
    """(name, sublayer) of every place an adapter goes, block by block (the last `layers` blocks; 0: all)."""
    parts = (arch.attention, arch.mlp) if placement == "houlsby" else (arch.mlp,)
    blocks = list(_get(model, arch.blocks))
    first = len(blocks) - layers if layers else 0
    out = []
    for i, block in enumerate(blocks[first:], start=first):
        for part in parts:
            out.append((f"{arch.blocks}.{i}.{part}", _get(block, part)))
    return out


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in `model` (`<sublayer>.adapter`), in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]


def block_count(model: nn.Module) -> int:
    """The number of decoder blocks of a supported model (AdapterError for another)."""
    return len(_get(model, architecture_of(model).blocks))


def first_adapted_block(model: nn.Module) -> int:
    """Index of the first decoder block holding an adapter (every block before it is unchanged by them)."""
    config = getattr(model, "zo_adapter_config", None)
    if config is None:
        raise AdapterError("the model has no adapters (add_adapters first)")
    return block_count(model) - config.layers if config.layers else 0


def _check_options(placement: str, reduction: int, activation: str, layers: int = 0) -> None:
    if placement not in PLACEMENTS:
        raise AdapterError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise AdapterError(f"reduction must be an int >= 1, got {reduction!r}")
    if activation not in ACTIVATIONS:
        raise AdapterError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise AdapterError(f"layers must be an int >= 0 (0: every block), got {layers!r}")


def add_adapters(model: nn.Module, placement: str = "pfeiffer", reduction: int = 16, activation: str = "relu", *,
                 layer_norm: bool = False, float32: bool = False, layers: int = 0) -> list[str]:
    """Insert bottleneck adapters (d -> d / reduction -> d) after each block's MLP ("pfeiffer") or after its
    attention and its MLP ("houlsby"), in every decoder block or, with layers=N, in the last N blocks only
    (the blocks before them then compute what the base model does: their outputs can be cached); freeze
    every base weight. Adapters live on the base weights' device, in their dtype (float32=True: in
    float32). Returns the adapters' names; their parameters are
    `<name>.down.weight`, `<name>.down.bias`, `<name>.up.weight`, `<name>.up.bias` (and `<name>.norm.*`).
    Everything is checked before the model is touched."""
    _check_options(placement, reduction, activation, layers)
    if adapter_names(model):
        raise AdapterError(f"the model already has adapters ({len(adapter_names(model))}); remove them or load "
                           "weights into them with load_adapters")
    arch = architecture_of(model)
    hidden = int(getattr(model.config, arch.hidden))
    bottleneck = hidden // reduction
    if bottleneck < 1:
        raise AdapterError(f"reduction {reduction} leaves no bottleneck for hidden size {hidden}")
    n_blocks = len(_get(model, arch.blocks))
    if layers > n_blocks:
        raise AdapterError(f"layers={layers}, but {type(model).__name__} has {n_blocks} decoder blocks")
    layers = 0 if layers == n_blocks else layers  # one spelling of "every block", so saved configurations match
    sites = _sites(model, arch, placement, layers)
    for name, sub in sites:
        if hasattr(sub, "adapter"):
            raise AdapterError(f"{name} already has an attribute 'adapter'")
    base = next(model.parameters())
    dtype = torch.float32 if float32 else base.dtype
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, sub in sites:
        sub.adapter = BottleneckAdapter(hidden, bottleneck, activation, layer_norm, dtype, base.device)
        sub.register_forward_hook(_AdapterHook())
        names.append(f"{name}.adapter")
    model.zo_adapter_config = AdapterConfig(placement, reduction, activation, layer_norm, float32, layers, hidden,
                                             bottleneck)
    return names


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters of `model` by name (no base weight)."""
    names = adapter_names(model)
    return {n: p for n, p in model.named_parameters() if any(n.startswith(a + ".") for a in names)}


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter weights only (safetensors), with their configuration in the metadata."""
    from safetensors.torch import save_file

    state = adapter_state(model)
    if not state:
        raise AdapterError("the model has no adapters to save (add_adapters first)")
    config = getattr(model, "zo_adapter_config", None)
    meta = {"format": FORMAT, "config": json.dumps(asdict(config) if config else {}, sort_keys=True)}
    save_file({n: p.detach().contiguous().cpu() for n, p in state.items()}, os.fspath(path), metadata=meta)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy saved adapter weights into the model's adapters: the same names, shapes and configuration, or
    AdapterError before any weight is copied."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise AdapterError(f"{path} is not a zokernels adapter file (format {meta.get('format')!r})")
        saved = {n: f.get_tensor(n) for n in f.keys()}
    state = adapter_state(model)
    if not state:
        raise AdapterError("the model has no adapters: add_adapters with the saved configuration first "
                           f"({meta.get('config')})")
    config = getattr(model, "zo_adapter_config", None)
    if config is not None and meta.get("config") not in (None, "{}"):
        theirs = {**asdict(AdapterConfig()), **json.loads(meta["config"])}  # files written before `layers`
        if theirs != asdict(config):
            raise AdapterError(f"{path} holds adapters of configuration {json.dumps(theirs, sort_keys=True)}, the "
                               f"model's are {json.dumps(asdict(config), sort_keys=True)}")
    missing, extra = sorted(set(state) - set(saved)), sorted(set(saved) - set(state))
    if missing or extra:
        raise AdapterError(f"{path} does not match the model's adapters: missing {missing[:4]}, unexpected "
                           f"{extra[:4]}")
    bad = [f"{n}: saved {tuple(saved[n].shape)}, model {tuple(p.shape)}" for n, p in state.items()
           if saved[n].shape != p.shape]
    if bad:
        raise AdapterError(f"{path}: adapter shapes differ: {bad[:4]}")
    with torch.no_grad():
        for n, p in state.items():
            p.copy_(saved[n].to(p.dtype))
