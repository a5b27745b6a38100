"""Which parameters ZO tunes (all, RMS/LayerNorm weights, the last decoder layers, LoRA or bottleneck
adapters), the quantized base of `--quant` runs, and rebuilding a fine-tuned model from the base weights + the
fine-tune log."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from .errors import ZOError
from .pruning import trained_masks

TUNE_MODES = ("all", "norms", "final-norm", "last-layers", "lora", "adapters")
QUANT_FORMATS = ("int8", "int4", "fp8")
QUZO_MODES = ("all", "last-layers")   # with --quant these train QuantLinear weights with QuZO
LOG_FILE = "finetune_log.npz"             # the fine-tune log of every optimizer (zokernels.log format)
TAPT_LOG_FILE = "tapt_log.npz"            # the log of the TAPT stage (--tapt-steps), replayed before LOG_FILE
LEGACY_QUZO_LOG_FILE = "quzo_log.json"    # where QuZO runs up to this format's version 2 wrote their log
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")


def is_norm_param(name: str) -> bool:
    """RMSNorm/LayerNorm weights: '<...>.<*norm* or ln*>.weight'."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and ("norm" in parts[-2].lower() or parts[-2].startswith("ln"))


def is_final_norm_param(name: str) -> bool:
    """The norm right before the LM head: a norm weight outside the numbered decoder blocks."""
    return is_norm_param(name) and not any(part.isdigit() for part in name.split("."))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer stack (through PEFT/DDP wrappers); ZOError if there is none."""
    from .scoring import causal_lm_parts

    decoder, _, _ = causal_lm_parts(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ZOError(f"{type(decoder).__name__} has no `layers` ModuleList; --tune last-layers needs one")
    return layers


def last_layers(model: nn.Module, n: int) -> tuple[int, list[nn.Module]]:
    """(index of the first tuned layer, the last n decoder layers)."""
    layers = decoder_layers(model)
    if not 1 <= n <= len(layers):
        raise ZOError(f"--tune-layers must be in [1, {len(layers)}] ({type(model).__name__} has {len(layers)} "
                      f"decoder layers), got {n}")
    return len(layers) - n, list(layers)[len(layers) - n:]


def _linears_in(layers: list[nn.Module], linears: tuple[str, ...] | None) -> list[tuple[str, nn.Module]]:
    """(name, module) of the linear-like modules of `layers` whose last name segment is in `linears`."""
    found = [(n, m) for layer in layers for n, m in layer.named_modules() if n and n.rsplit(".", 1)[-1] in linears]
    missing = sorted(set(linears) - {n.rsplit(".", 1)[-1] for n, _ in found})
    if missing:
        raise ZOError(f"--tune-linears {','.join(missing)}: no such module in the tuned decoder layers")
    return found


def select_trainable(model: nn.Module, mode: str, *, lora_r: int = 8, lora_alpha: float = 16.0,
                     lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS, seed: int = 0,
                     tune_layers: int = 1, tune_linears: tuple[str, ...] | None = None,
                     adapter_placement: str = "pfeiffer", adapter_reduction: int = 16,
                     adapter_activation: str = "relu", adapter_layers: int = 0) -> nn.Module:
    """Set requires_grad for `mode` and return the model to train (a PeftModel for 'lora', whose adapter
    init is seeded so that the same seed gives the same starting weights). 'last-layers': every
    parameter of the last `tune_layers` decoder layers, or only those of the modules named in
    `tune_linears` (last name segments, e.g. ('down_proj',)). 'adapters': bottleneck adapters
    (zokernels.adapters.add_adapters) inserted into the model (the last `adapter_layers` blocks; 0: all), only
    their parameters trainable."""
    if mode not in TUNE_MODES:
        raise ZOError(f"--tune must be one of {', '.join(TUNE_MODES)}, got {mode!r}")
    if mode == "adapters":
        return _add_adapters(model, adapter_placement, adapter_reduction, adapter_activation, seed, adapter_layers)
    if mode == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "last-layers":
        layers = last_layers(model, tune_layers)[1]
        modules = layers if not tune_linears else [m for _, m in _linears_in(layers, tune_linears)]
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(True)
        return model
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


def _add_adapters(model: nn.Module, placement: str, reduction: int, activation: str, seed: int,
                  layers: int = 0) -> nn.Module:
    """add_adapters (in the last `layers` blocks, every block if there are fewer; 0: every block), then every
    adapter's initial weights drawn on the CPU from `seed` (in module order) and
    copied in: the starting weights depend on the seed only, not on the device's generator nor on what used the
    global RNG before, so rebuild_model (on the CPU) reproduces them bitwise. The global RNG is left as it was."""
    from ..adapters import AdapterError, BottleneckAdapter, add_adapters, block_count

    try:
        layers = min(layers, block_count(model))  # --adapter-layers N: all blocks when there are fewer
        names = add_adapters(model, placement, reduction, activation, layers=layers)
    except AdapterError as e:
        raise ZOError(f"--tune adapters: {e}") from None
    c = model.zo_adapter_config
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name in names:
            ref = BottleneckAdapter(c.hidden, c.bottleneck, c.activation, c.layer_norm)
            for p, r in zip(model.get_submodule(name).parameters(), ref.parameters(), strict=True):
                p.copy_(r.to(p.dtype))
    return model


def adapter_linears(model: nn.Module) -> tuple[str, ...]:
    """Names of the bottleneck adapters' nn.Linear layers (down / up): --quant leaves them float."""
    from ..adapters import adapter_names

    prefixes = tuple(a + "." for a in adapter_names(model))
    return tuple(n for n, m in model.named_modules() if n.startswith(prefixes) and type(m) is nn.Linear)


def quantize_for_tuning(model: nn.Module, fmt: str, mode: str, *, group_size: int = 128, matmul: str = "dequant",
                        tune_layers: int = 1, tune_linears: tuple[str, ...] | None = None):
    """Quantize every nn.Linear except lm_head (tied to the embeddings in many models: it stays float and
    tied), LoRA adapters and bottleneck adapters, after select_trainable. Returns (QuantReport, names of the
    QuantLinear layers QuZO trains, or None when ZOSGD trains the float parameters of the scope on the frozen
    quantized base).

    mode 'all' / 'last-layers': QuZO over the QuantLinear layers of the scope; every float parameter is
    frozen (QuZO and ZOSGD cannot share one probe). 'norms' / 'final-norm' / 'lora': ZOSGD over those
    float parameters (QLoRA-style for LoRA and adapters); no QuantLinear is trained."""
    from ..quant.linear import quant_layers, quantize_model

    if fmt not in QUANT_FORMATS:
        raise ZOError(f"--quant must be one of none, {', '.join(QUANT_FORMATS)}, got {fmt!r}")
    lora = tuple(n for n, m in model.named_modules() if ".lora_" in n and type(m) is nn.Linear)
    try:
        report = quantize_model(model, fmt, exclude=("lm_head",) + lora + adapter_linears(model),
                                group_size=group_size, matmul=matmul)
    except ValueError as e:  # nothing to quantize (no nn.Linear, e.g. GPT-2's Conv1D), a bad group size, ...
        raise ZOError(f"--quant {fmt}: {e}") from None
    if mode not in QUZO_MODES:
        return report, None
    for p in model.parameters():
        p.requires_grad_(False)
    layers = quant_layers(model)
    if mode == "last-layers":
        tuned = last_layers(model, tune_layers)[1]
        scope = {id(m) for _, m in _linears_in(tuned, tune_linears)} if tune_linears else \
            {id(m) for layer in tuned for m in layer.modules()}
        layers = [(n, m) for n, m in layers if id(m) in scope]
    if not layers:
        raise ZOError(f"--tune {mode} with --quant {fmt}: no quantized linear layer in scope")
    return report, [n for n, _ in layers]


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


def load_quzo_log(path: str | os.PathLike):
    """A QuZO log file: the one npz format, or the JSON written by zokernels up to commit e04bf6d."""
    from ..log import FineTuneLog, LogMismatch

    try:
        log = FineTuneLog.load(path)
    except LogMismatch as e:
        raise ZOError(f"{path} is not a QuZO log: {e}") from None
    if log.optimizer != "quzo":
        raise ZOError(f"{path} is a {log.optimizer} log, not a QuZO log")
    return log


def rebuild_model(output_dir: str | os.PathLike, model: nn.Module | None = None):
    """Base model + fine-tune log -> the fine-tuned model, from a `finetune` output dir (its
    run_config.json names the model, dtype, tuning mode (with the adapters' configuration) and quantization;
    finetune_log.npz holds the steps, or quzo_log.json in QuZO runs written before the one log format). --quant
    runs: the model is quantized the same way (round to nearest is deterministic) and the log replayed, bitwise.
    --tune adapters: the adapters are added again (same configuration and seed, hence the same starting
    weights) before the log is replayed. --tapt-steps: the TAPT stage's log (tapt_log.npz) is replayed first.
    --masks (a pruned model): the masks file the run used is read again for the replay."""
    import zokernels

    from .data import load_model_and_tokenizer

    with open(os.path.join(output_dir, "run_config.json")) as fh:
        cfg = json.load(fh)
    dtype = getattr(torch, cfg["dtype"])
    tokenizer = None
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg["model"], dtype=dtype)
    linears = tuple(cfg.get("tune_linears") or ()) or None
    model = select_trainable(model, cfg["tune"], lora_r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                             lora_targets=tuple(cfg["lora_targets"]), seed=cfg["seed"],
                             tune_layers=cfg.get("tune_layers", 1), tune_linears=linears,
                             adapter_placement=cfg.get("adapter_placement", "pfeiffer"),
                             adapter_reduction=cfg.get("adapter_reduction", 16),
                             adapter_activation=cfg.get("adapter_activation", "relu"),
                             adapter_layers=cfg.get("adapter_layers", 0))
    quzo_layers = None
    if cfg.get("quant", "none") != "none":
        _, quzo_layers = quantize_for_tuning(model, cfg["quant"], cfg["tune"], group_size=cfg["quant_group_size"],
                                             matmul=cfg["quant_matmul"], tune_layers=cfg.get("tune_layers", 1),
                                             tune_linears=linears)
    masks = {"masks": trained_masks(model, cfg["masks"])} if cfg.get("masks") else {}  # a pruned model's
    if cfg.get("tapt_steps"):  # the TAPT stage's steps come first; fine-tuning started from its weights
        zokernels.replay(model, os.path.join(output_dir, TAPT_LOG_FILE), **masks)
    log = os.path.join(output_dir, LOG_FILE)
    legacy = os.path.join(output_dir, LEGACY_QUZO_LOG_FILE)
    zokernels.replay(model, legacy if quzo_layers is not None and not os.path.exists(log) else log, **masks)
    return model if tokenizer is None else (model, tokenizer)
