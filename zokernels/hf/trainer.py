"""ZOTrainer: transformers.Trainer with the backward pass replaced by a ZOSGD (SPSA) step.

Supported: transformers 5.17 - 5.23 (tested on both; the Trainer internals used are `training_step`,
`create_optimizer`, `prediction_step`, `accelerator.sync_gradients`), single process. Everything
else — logging, evaluation, checkpoints (the optimizer state, fine-tune log included, is saved in
`optimizer.pt`), resume, LR schedulers, callbacks, max_steps, eval_steps — is the Trainer's own.

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

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..optim import ZOSGD
from ..optim.common import eval_mode, user_stacklevel
from ..optim.quzo import QuZO
from ..quant.linear import quant_layers

SUPPORTED_TRANSFORMERS = ">=5.17,<5.24"  # the releases the tests ran on (ZOTrainer overrides Trainer internals)


def _warn_if_untested_transformers(version: str | None = None) -> None:
    from packaging.specifiers import SpecifierSet

    if version is None:
        import transformers
        version = transformers.__version__
    if version not in SpecifierSet(SUPPORTED_TRANSFORMERS, prereleases=True):
        warnings.warn(f"zokernels.hf was tested with transformers {SUPPORTED_TRANSFORMERS}, this is {version}: "
                      "ZOTrainer overrides Trainer.training_step and create_optimizer, whose signatures change "
                      "between releases", stacklevel=user_stacklevel())


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


class FOTrainer(ObjectiveMixin, Trainer):
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


class ZOTrainer(ObjectiveMixin, Trainer):
    """Trainer that fine-tunes with zeroth-order SPSA steps (ZOSGD) — see the module docstring.

    Extra arguments: objective (callable(model, inputs) -> scalar to minimize; None: compute_loss),
    zo_eps, zo_n_queries, zo_dist, zo_seed (None: args.seed), zo_probe, zo_one_sided, zo_backend;
    quantized models: zo_method ("auto" | "zosgd" | "quzo"), zo_quant_layers (QuantLinear names QuZO
    trains; None: all), zo_quzo (extra QuZO arguments: update, act_sr, probe="fused"|"inplace").
    The learning rate, weight decay, scheduler and warmup come from TrainingArguments as usual."""

    def __init__(self, *args, objective: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                 zo_eps: float = 1e-3, zo_n_queries: int = 1, zo_dist: str = "gaussian", zo_seed: int | None = None,
                 zo_probe: str = "auto", zo_one_sided: bool = False, zo_backend: str = "auto",
                 zo_method: str = "auto", zo_quant_layers=None, zo_quzo: dict | None = None, **kwargs):
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
