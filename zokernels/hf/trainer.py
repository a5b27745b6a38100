"""ZOTrainer: transformers.Trainer with the backward pass replaced by a ZOSGD (SPSA) step.

Supported: transformers 5.17 - 5.25 (TESTED_TRANSFORMERS: the releases the tests ran on; the Trainer internals
used are `training_step`, `create_optimizer`, `prediction_step`, `accelerator.sync_gradients`, `_save_checkpoint`,
`_get_output_dir`), single process. Everything else — logging, evaluation, checkpoints (the optimizer state,
fine-tune log included, is saved in `optimizer.pt`), resume, LR schedulers, callbacks, max_steps, eval_steps —
is the Trainer's own, except that a checkpoint is written atomically (AtomicCheckpoints: staged, then renamed
to checkpoint-N when complete).

One optimizer step = one accumulation window of G = gradient_accumulation_steps micro-batches
b_1..b_G. The micro-batches are buffered and the step is taken on the last one:

    L(theta) = (1/G) sum_g objective(model_theta, b_g)
    g_q      = (L(theta + eps z_q) - L(theta - eps z_q)) / (2 eps)      (same z_q for every b_g)

so the probes of one step see all micro-batches with the same direction and the loss difference is
over all of them (not G separate steps).

objective(model, inputs) -> scalar tensor is minimized; default: the Trainer's `compute_loss` (the
model's LM loss). Any scalar works, differentiable or not (e.g. 1 - accuracy). An objective with a
`predict(model, inputs) -> (scores, labels)` method also drives evaluation (compute_metrics sees
scores as predictions).

Quantized models (zokernels.quant.quantize_model): with `zo_method="auto"` (default) a model holding
QuantLinear layers is trained by QuZO on their quantized weights (all of them, or the names in
`zo_quant_layers`); float parameters stay frozen (a warning says so if some require grad).
`zo_method="zosgd"` instead trains the float parameters that require grad with ZOSGD on the frozen
quantized base (norms, LoRA adapters: QLoRA-style). QuZO has no weight decay; its log (seeds,
projected gradients) is in `optimizer.pt` like ZOSGD's and `zokernels.replay` rebuilds the weights.

Refused: fp16 mixed precision (GradScaler scales gradients that ZO never computes; use bf16, fp32,
or a model loaded in float16 without --fp16), DeepSpeed (its engine owns the optimizer; ZO has no
optimizer state to offload anyway). Ignored with a warning: gradient/activation checkpointing (it
saves memory only for a backward pass, which ZO never runs) and max_grad_norm (no gradients to clip).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..optim import ZOSGD
from ..optim.common import eval_mode, user_stacklevel
from ..quant.quzo import QuZO
from ..quant.linear import quant_layers

# ZOTrainer overrides Trainer internals: the releases tests/test_hf.py, test_cli.py, test_cli_stages.py and
# test_cli_reliability.py passed on, and the range they span (releases in between assumed alike).
TESTED_TRANSFORMERS = ("5.17.0", "5.23.0", "5.24.0", "5.25.0")
SUPPORTED_TRANSFORMERS = ">=5.17,<5.26"


def _warn_if_untested_transformers(version: str | None = None) -> None:
    from packaging.specifiers import SpecifierSet

    if version is None:
        import transformers
        version = transformers.__version__
    if version not in SpecifierSet(SUPPORTED_TRANSFORMERS, prereleases=True):
        warnings.warn(f"zokernels.hf was tested with transformers {SUPPORTED_TRANSFORMERS} (tests run on "
                      f"{', '.join(TESTED_TRANSFORMERS)}), this is {version}: ZOTrainer overrides Trainer."
                      "training_step, create_optimizer and _save_checkpoint, whose signatures change between "
                      "releases", stacklevel=user_stacklevel())


_warn_if_untested_transformers()


class ObjectiveMixin:
    """Trainer mixin: when `self.objective` is set, it is the loss (compute_loss) and drives evaluation
    (prediction_step returns its loss and, if it has `predict`, (scores, labels) for compute_metrics)."""

    objective = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.objective is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.objective(model, inputs)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.objective is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            predict = getattr(self.objective, "predict", None)
            if predict is None:
                return self.objective(model, inputs).detach(), None, None
            scores, labels = predict(model, inputs)
            loss = self.objective.loss_from_scores(scores, labels) if hasattr(self.objective, "loss_from_scores") \
                else self.objective(model, inputs)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), scores.detach(), labels.detach()


# ----------------------------------------------------------------------------- checkpoints
CHECKPOINT_STAGING = ".partial-"   # <run dir>/.partial-checkpoint-N/checkpoint-N while it is being written
# What resuming needs from a checkpoint the Trainer wrote (save_only_model=False, single process): its state
# (trainer_state.json, written last), the optimizer state (ZO: the fine-tune log), the schedule, the RNG state.
RESUME_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def checkpoint_problem(path: str) -> str | None:
    """Why the Trainer checkpoint directory `path` (…/checkpoint-N) cannot be resumed from, or None if it is
    complete: RESUME_FILES and a weights file present and not empty, trainer_state.json readable and at step N.
    The Trainer writes trainer_state.json after everything else, so a save killed part way fails this check;
    AtomicCheckpoints never shows such a directory under a checkpoint-N name in the first place."""
    weights = [n for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))]
    missing = [n for n in RESUME_FILES if not os.path.isfile(os.path.join(path, n))] + ([] if weights else
                                                                                         ["model weights"])
    if missing:
        return "no " + ", ".join(missing)
    empty = [n for n in (*RESUME_FILES, *weights) if os.path.getsize(os.path.join(path, n)) == 0]
    if empty:
        return ", ".join(empty) + (" is" if len(empty) == 1 else " are") + " empty"
    try:
        with open(os.path.join(path, "trainer_state.json")) as fh:
            step = json.load(fh).get("global_step")
    except (OSError, ValueError, AttributeError):
        return "trainer_state.json is not readable JSON"
    name = os.path.basename(os.path.normpath(path))
    if name != f"{PREFIX_CHECKPOINT_DIR}-{step}":
        return f"trainer_state.json is at step {step}"
    return None


def _fsync_tree(path: str) -> None:
    """fsync every file under `path` and the directory: after a power loss or OS crash (not only a killed
    process) the renamed checkpoint must have its contents, and ext4's delayed allocation may commit the rename
    before the data of newly created files. Cost measured on the 2-core dev machine's disk: 52-65 ms for a 126 MB
    checkpoint (writing it: 45-90 ms)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpoints:
    """Trainer mixin: a checkpoint is written into <run dir>/.partial-checkpoint-N/checkpoint-N by the Trainer's
    own _save_checkpoint, then fsynced and renamed (os.replace, atomic on one filesystem) to
    <run dir>/checkpoint-N, then the Trainer's rotation (save_total_limit) runs on the run dir. A process killed
    during the save leaves only the .partial-* directory, which neither get_last_checkpoint nor the rotation
    (both match checkpoint-N names) sees, and which the next save removes. Multi-process or push_to_hub runs keep
    the Trainer's own save (other ranks write into the directory, the hub upload reads it after the call)."""

    _checkpoint_staging: str | None = None

    def _get_output_dir(self, trial):
        if self._checkpoint_staging is not None:
            return self._checkpoint_staging
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        if self.args.world_size > 1 or self.args.push_to_hub or not self.args.should_save:
            return super()._save_checkpoint(model, trial)
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging = os.path.join(run_dir, name), os.path.join(run_dir, CHECKPOINT_STAGING + name)
        os.makedirs(run_dir, exist_ok=True)
        for entry in os.listdir(run_dir):   # what a save killed part way left
            if entry.startswith(CHECKPOINT_STAGING):
                shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)
        os.makedirs(staging)
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial)   # into staging/checkpoint-N; its rotation sees only that one
        finally:
            self._checkpoint_staging = None
        staged = os.path.join(staging, name)
        if self.state.best_model_checkpoint == staged:   # the Trainer recorded the staging path as the best one
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        _fsync_tree(staged)
        if os.path.lexists(final):   # e.g. an incomplete checkpoint-N of a killed run: set aside, then removed
            os.replace(final, os.path.join(staging, "replaced"))
        os.replace(staged, final)
        _fsync_dir(run_dir)
        shutil.rmtree(staging, ignore_errors=True)
        # the rotation the Trainer's _save_checkpoint ran in the staging directory (same arguments), on the run dir
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)


class FOTrainer(AtomicCheckpoints, ObjectiveMixin, Trainer):
    """Plain first-order Trainer (AdamW by default) minimizing the same objective — the baseline."""

    def __init__(self, *args, objective=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective


class _WindowStep:
    """For the Trainer: ZOTrainer.training_step takes the step (with a closure over the window's
    micro-batches); the Trainer's own closure-less `optimizer.step()` that follows is then a no-op."""

    _stepped_in_window = False

    def step(self, closure=None):
        if closure is None:
            if self._stepped_in_window:
                self._stepped_in_window = False
                return None
            return super().step(None)  # raises: a ZO step needs a closure
        loss = super().step(closure)
        self._stepped_in_window = True
        return loss


class TrainerZOSGD(_WindowStep, ZOSGD):
    """ZOSGD whose closure-less step after ZOTrainer.training_step is a no-op."""


class TrainerQuZO(_WindowStep, QuZO):
    """QuZO whose closure-less step after ZOTrainer.training_step is a no-op."""


ZO_METHODS = ("auto", "zosgd", "quzo")


class QuantSubset(nn.Module):
    """A module tree holding only the named QuantLinear layers of `model`, under their full names (so
    QuZO's contract keys and log names are those of the whole model and replay applies to it)."""

    def __init__(self, model: nn.Module, names):
        super().__init__()
        for name in names:
            parent: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, model.get_submodule(name))


class ZOTrainer(AtomicCheckpoints, ObjectiveMixin, Trainer):
    """Trainer that fine-tunes with zeroth-order SPSA steps (ZOSGD) — see the module docstring.

    Extra arguments: objective (callable(model, inputs) -> scalar to minimize; None: compute_loss),
    zo_eps, zo_n_queries, zo_dist, zo_seed (None: args.seed), zo_probe, zo_one_sided, zo_backend, zo_masks
    ({param name: zokernels.masks.ParamMask}: ZOSGD trains only the masked elements, e.g. a pruned model's kept ones);
    quantized models: zo_method ("auto" | "zosgd" | "quzo"), zo_quant_layers (QuantLinear names QuZO
    trains; None: all), zo_quzo (extra QuZO arguments: update, act_sr, probe="fused"|"inplace").
    The learning rate, weight decay, scheduler and warmup come from TrainingArguments as usual."""

    def __init__(self, *args, objective: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                 zo_eps: float = 1e-3, zo_n_queries: int = 1, zo_dist: str = "gaussian", zo_seed: int | None = None,
                 zo_probe: str = "auto", zo_one_sided: bool = False, zo_backend: str = "auto",
                 zo_method: str = "auto", zo_quant_layers=None, zo_quzo: dict | None = None, zo_masks=None, **kwargs):
        if zo_method not in ZO_METHODS:
            raise ValueError(f"ZOTrainer: zo_method must be one of {ZO_METHODS}, got {zo_method!r}")
        super().__init__(*args, **kwargs)
        targs = self.args
        if targs.fp16 or getattr(targs, "fp16_full_eval", False):
            raise ValueError("ZOTrainer: fp16 mixed precision (GradScaler) does not apply to zeroth-order "
                             "training, which has no gradients to scale; use bf16=True, fp32, or load the "
                             "model in float16 without fp16=True")
        if self.is_deepspeed_enabled:
            raise ValueError("ZOTrainer: DeepSpeed is not supported (its engine owns the optimizer, and ZO "
                             "keeps no optimizer state to offload); run without --deepspeed")
        if getattr(targs, "activation_checkpointing", False) or getattr(targs, "gradient_checkpointing", False):
            warnings.warn("ZOTrainer: gradient/activation checkpointing ignored (ZO runs no backward pass, "
                          "so there are no activations to save memory on)", stacklevel=2)
            for name in ("activation_checkpointing", "gradient_checkpointing"):
                if hasattr(targs, name):
                    setattr(targs, name, False)
        if targs.max_grad_norm:
            targs.max_grad_norm = 0.0  # nothing to clip; a logged grad_norm of 0 would mislead
        self.objective = objective
        self.zo_config = dict(eps=zo_eps, n_queries=zo_n_queries, dist=zo_dist,
                              seed=targs.seed if zo_seed is None else zo_seed, probe=zo_probe,
                              one_sided=zo_one_sided, backend=zo_backend)
        if zo_masks:
            if zo_method == "quzo":
                raise ValueError("ZOTrainer: zo_masks (ZOSGD's masks) do not apply to QuZO")
            self.zo_config["masks"] = zo_masks
        self.zo_method = zo_method
        self.zo_quant_layers = None if zo_quant_layers is None else list(zo_quant_layers)
        self.zo_quzo = dict(zo_quzo or {})
        self._window: list[dict] = []

    # ------------------------------------------------------------------ optimizer
    def uses_quzo(self, model: nn.Module | None = None) -> bool:
        """QuZO for zo_method 'quzo', or 'auto' on a model holding QuantLinear layers; else ZOSGD."""
        model = self.model if model is None else model
        if self.zo_method == "auto":
            return bool(quant_layers(model))
        return self.zo_method == "quzo"

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """ZOSGD over the trainable parameters (requires_grad), probe hooks installed via the model;
        args.weight_decay applies to the parameters the Trainer would decay (not biases/norms).
        QuZO (see uses_quzo) over the model's QuantLinear layers or the `zo_quant_layers` subset."""
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        if self.uses_quzo(model):
            self.optimizer = self._create_quzo(model)
            return self.optimizer
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("ZOTrainer: the model has no trainable parameters (requires_grad=True)")
        wd = float(self.args.weight_decay)
        if wd > 0:
            decay_names = set(self.get_decay_parameter_names(model))
            groups = [{"params": [p for n, p in trainable if n in decay_names], "weight_decay": wd},
                      {"params": [p for n, p in trainable if n not in decay_names], "weight_decay": 0.0}]
            params = [g for g in groups if g["params"]]
        else:
            params = [p for _, p in trainable]
        self.optimizer = TrainerZOSGD(params, lr=self.args.learning_rate, weight_decay=wd, model=model,
                                      **self.zo_config)
        return self.optimizer

    def _create_quzo(self, model: nn.Module) -> TrainerQuZO:
        layers = dict(quant_layers(model))
        if not layers:
            raise ValueError("ZOTrainer: zo_method='quzo' needs a quantized model (zokernels.quant.quantize_model)")
        names = list(layers) if self.zo_quant_layers is None else self.zo_quant_layers
        unknown = [n for n in names if n not in layers]
        if unknown or not names:
            raise ValueError(f"ZOTrainer: zo_quant_layers must name QuantLinear layers of the model; not found: "
                             f"{unknown[:3] or 'an empty list'}")
        if self.args.weight_decay:
            raise ValueError("ZOTrainer: QuZO has no weight decay; set weight_decay=0")
        if "masks" in self.zo_config:
            raise ValueError("ZOTrainer: zo_masks (ZOSGD's masks) do not apply to QuZO")
        if self.zo_config["one_sided"]:
            raise ValueError("ZOTrainer: QuZO probes are two-sided; zo_one_sided=True is not supported")
        floats = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if floats:
            warnings.warn(f"ZOTrainer: QuZO trains only the quantized weights of {len(names)} QuantLinear layers; "
                          f"{floats:,} float parameters that require grad stay frozen (zo_method='zosgd' trains "
                          "them with ZOSGD on the frozen quantized base instead)", stacklevel=3)
        kwargs = dict(probe="inplace" if self.zo_config["probe"] == "inplace" else "fused",
                      backend=self.zo_config["backend"])
        kwargs.update(self.zo_quzo)
        cfg = self.zo_config
        return TrainerQuZO(QuantSubset(model, names), lr=self.args.learning_rate, eps=cfg["eps"],
                           n_queries=cfg["n_queries"], seed=cfg["seed"], dist=cfg["dist"], **kwargs)

    @property
    def zo_optimizer(self) -> TrainerZOSGD | TrainerQuZO:
        opt = self.optimizer
        while opt is not None and not isinstance(opt, (ZOSGD, QuZO)):
            opt = getattr(opt, "optimizer", None)
        if opt is None:
            raise RuntimeError("ZOTrainer: the optimizer is not created yet (call train() first)")
        return opt

    # ------------------------------------------------------------------ training
    def _objective_value(self, model: nn.Module, inputs) -> torch.Tensor:
        if self.objective is not None:
            return self.objective(model, inputs)
        with self.compute_loss_context_manager():
            return self.compute_loss(model, inputs)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Buffer the micro-batch; on the window's last one, take the ZO step over all of them. Returns
        the window's mean probe loss on its last micro-batch and 0 on the others (the Trainer sums them)."""
        self._window.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []

        def closure() -> torch.Tensor:
            total = None
            for batch in window:
                value = self._objective_value(model, batch).float()
                total = value if total is None else total + value
            return total / len(window)

        opt = self.zo_optimizer
        if isinstance(opt, QuZO):  # QuZO sets eval mode on its layers only; the probes need all of it
            with eval_mode(model):
                loss = opt.step(closure)
        else:
            loss = opt.step(closure)
        return loss.detach().to(self.args.device)
