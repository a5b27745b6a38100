"""The stages of a `python -m zokernels finetune` run, in the order zokernels.cli.run calls them:

  load       cfg -> Loaded: the task data (balanced splits, prompt task) and the model on its device
  quantize   cfg, model -> Tuned: what is tuned (select_trainable), then --quant (quantize_for_tuning)
  cache      cfg, model -> the frozen-trunk / layer-input cache attached to the model, or None
  evaluate   model, collator, splits -> Accuracy (float_zero_shot / zero_shot: before training)
  train      cfg, Tuned, Loaded -> Trained: the ZO Trainer run; save: its log and the model
  baseline   cfg, model, start weights -> Trained: first-order AdamW on the same parameters and data
  report     RunState -> metrics.json, training_curves.png, the closing line; returns the metrics

`cfg` is the resolved configuration of zokernels.cli.resolve_config (the dict run_config.json records);
each stage reads only the keys it needs. Messages go to `say` (print by default)."""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import ZOError
from ..masks import load_masks
from .pruning import PRUNE_MASKS_FILE, KeepPrunedZero, pruned_fraction, trained_masks
from .scoring import PromptTask, VerbalizerCollator

ZERO_SHOT_FILE = "zero_shot.json"  # the zero-shot results, reused by --resume
ADAPTERS_FILE = "adapters.safetensors"  # --tune adapters with --save-model yes: the adapter weights, in model/
DEFAULT_TEXT_COLUMN, DEFAULT_LABEL_COLUMN = "text", "sentiment"
DEFAULT_LABELS = ("positive", "negative")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF)"

Say = Callable[[str], Any]


# ----------------------------------------------------------------------------- load
@dataclass
class Loaded:
    """load(): the task data and the model as read (cfg['dtype'] on cfg['device'])."""
    data_path: str
    task: PromptTask
    splits: dict            # "train" / "dev" / "test": lists of hf.data.Example
    model: nn.Module | None
    tokenizer: Any
    collator: VerbalizerCollator | None
    seconds: float = 0.0    # model load time


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


def _labels(spec: str | None, examples, default_data: bool, label_col: str) -> list[str]:
    if spec:
        labels = [lab.strip() for lab in spec.split(",") if lab.strip()]
    elif default_data:
        labels = list(DEFAULT_LABELS)
    else:
        labels = sorted({e.label for e in examples})
        if not 2 <= len(labels) <= 20:
            raise ZOError(f"the label column {label_col!r} has {len(labels)} distinct values; choose 2-20 "
                          "with --labels")
    if len(labels) < 2:
        raise ZOError("--labels needs at least two labels")
    return labels


def load_task_data(cfg: dict) -> tuple[str, PromptTask, dict]:
    """(data file, prompt task, balanced train/dev/test splits cut to --eval-examples / --dev-eval-examples)."""
    from .data import DEFAULT_CORPUS_ENCODING, balanced_splits, default_corpus_file, read_examples
    from .scoring import DEFAULT_TEMPLATE

    default_data = cfg["data"] is None
    path = default_corpus_file() if default_data else cfg["data"]
    label_col = cfg["label_column"] or (DEFAULT_LABEL_COLUMN if default_data else "label")
    encoding = cfg["encoding"] or (DEFAULT_CORPUS_ENCODING if default_data else None)
    examples = read_examples(path, cfg["text_column"] or DEFAULT_TEXT_COLUMN, label_col, encoding=encoding)
    labels = _labels(cfg["labels"], examples, default_data, label_col)
    task = PromptTask(template=cfg["template"] or DEFAULT_TEMPLATE,
                      verbalizer=parse_verbalizer(cfg["verbalizer"], labels), max_text_tokens=cfg["max_text_tokens"])
    sizes = {"train": cfg["train_examples"], "dev": cfg["dev_examples"], "test": cfg["test_examples"]}
    splits = balanced_splits(examples, labels, sizes, seed=cfg["seed"])
    if cfg.get("tapt_steps"):
        add_unlabeled_splits(cfg, examples, splits)
    if cfg["eval_examples"]:
        splits["test"] = splits["test"][:cfg["eval_examples"]]
    if cfg["dev_eval_examples"]:
        splits["dev"] = splits["dev"][:cfg["dev_eval_examples"]]
    return str(path), task, splits


def add_unlabeled_splits(cfg: dict, examples: list, splits: dict) -> None:
    """With --tapt-steps: splits['unlabeled'], the TAPT texts (hf.tapt.unlabeled_texts: no dev or test text, the
    train texts first, --tapt-examples of them), and splits['unlabeled_dev'], the first --tapt-eval-examples dev
    texts (held-out perplexity). Taken before the dev and test splits are cut to --dev-eval-examples /
    --eval-examples, so that no test text reaches TAPT even when only part of the test split is evaluated."""
    from .tapt import unlabeled_texts

    held_out = splits["dev"] + splits["test"]
    splits["unlabeled"] = unlabeled_texts(examples, held_out, first=splits["train"], n=cfg["tapt_examples"],
                                          seed=cfg["seed"])
    splits["unlabeled_dev"] = [e.text for e in splits["dev"][:cfg["tapt_eval_examples"]]]


def load(cfg: dict, say: Say = print) -> Loaded:
    """The data (ZOError for a missing file, column or label), then the model (seeded with cfg['seed'] first)."""
    from transformers import set_seed

    from .data import load_model_and_tokenizer

    data_path, task, splits = load_task_data(cfg)
    say(f"data: {data_path}: train {len(splits['train'])}, dev {len(splits['dev'])}, test {len(splits['test'])} "
        f"examples; labels {task.labels}" + (f"; TAPT: {len(splits['unlabeled'])} unlabeled texts (no dev or test "
                                             f"text), held-out perplexity on {len(splits['unlabeled_dev'])} dev texts"
                                             if "unlabeled" in splits else ""))
    set_seed(cfg["seed"])
    t0 = time.time()
    model, tokenizer = load_model_and_tokenizer(cfg["model"], dtype=getattr(torch, cfg["dtype"]))
    model.config.use_cache = False
    model.to(cfg["device"])
    seconds = time.time() - t0
    return Loaded(data_path, task, splits, model, tokenizer, VerbalizerCollator(tokenizer, task), seconds)


# ----------------------------------------------------------------------------- quantize
@dataclass
class Tuned:
    """quantize(): the model with its tuned parameters selected and, with --quant, its linears quantized."""
    model: nn.Module
    n_total: int                          # parameters, counted before --quant turns linear weights into buffers
    n_train: int                          # what ZO tunes: trainable parameters, or QuZO's quantized weights
    quant_report: Any = None              # quant.linear.QuantReport with --quant
    quzo_layers: list[str] | None = None  # the QuantLinear layers QuZO trains (None: ZOSGD)


def quantize(cfg: dict, model: nn.Module, say: Say = print) -> Tuned:
    """select_trainable(cfg['tune'], ...), then quantize_for_tuning with --quant (QuZO for --tune all /
    last-layers, else ZOSGD on the frozen quantized base)."""
    from .tuning import quantize_for_tuning, select_trainable, trainable_count

    quant, tune = cfg.get("quant", "none"), cfg["tune"]
    linears = tuple(cfg["tune_linears"]) or None
    model = select_trainable(model, tune, lora_r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                             lora_targets=tuple(cfg["lora_targets"]), seed=cfg["seed"],
                             tune_layers=cfg.get("tune_layers", 1), tune_linears=linears,
                             adapter_placement=cfg.get("adapter_placement", "pfeiffer"),
                             adapter_reduction=cfg.get("adapter_reduction", 16),
                             adapter_activation=cfg.get("adapter_activation", "relu"),
                             adapter_layers=cfg.get("adapter_layers", 0))
    n_total = trainable_count(model)[1]
    report, quzo_layers = None, None
    if quant != "none":
        report, quzo_layers = quantize_for_tuning(model, quant, tune, group_size=cfg["quant_group_size"],
                                                  matmul=cfg["quant_matmul"], tune_layers=cfg["tune_layers"],
                                                  tune_linears=linears)
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        tied = head is not None and emb is not None and head.weight is emb.weight
        say(str(report) + f"; matmul {cfg['quant_matmul']}; lm_head stays {cfg['dtype']}"
            + (" (tied to the embeddings)" if tied else ""))
        if quzo_layers is not None:
            say(f"QuZO trains the {quant} weights of {len(quzo_layers)} linear layers ({tune}); norms, embeddings "
                "and lm_head are frozen")
        else:
            say(f"ZOSGD trains the float {tune} parameters on the frozen {quant} base")
    n_train = trainable_count(model)[0]
    if quzo_layers is not None:
        n_train = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in quzo_layers)
    return Tuned(model, n_total, n_train, report, quzo_layers)


def describe(cfg: dict, loaded: Loaded, tuned: Tuned) -> str:
    """The one-line summary of the model and what ZO tunes."""
    what = f"{cfg['quant']} weights (QuZO)" if tuned.quzo_layers is not None else "params"
    return (f"model: {cfg['model'] or DEFAULT_MODEL_NAME}: {type(tuned.model).__name__}, {tuned.n_total / 1e6:.1f}M "
            f"params, {cfg['dtype']} on {cfg['device']}, loaded in {loaded.seconds:.1f}s; ZO tunes {cfg['tune']}: "
            f"{tuned.n_train:,} {what}")


# ----------------------------------------------------------------------------- cache
def cache(cfg: dict, model: nn.Module, say: Say = print):
    """With --cache-trunk auto, attach model.zo_trunk_cache: --tune final-norm caches the decoder states
    before the final norm (FrozenTrunkCache); --tune last-layers the input states of the first tuned layer
    (LayerInputCache), unless layer 0 is tuned; --tune adapters with --adapter-layers N those of the first
    block with an adapter. Every other mode has trainable weights in (or before) the first decoder block
    (norms, lora, all; adapters in every block), so nothing before them is frozen and the run goes without a
    cache. Returns the cache, or None."""
    from ..adapters import first_adapted_block
    from .scoring import FrozenTrunkCache, LayerInputCache
    from .tuning import last_layers

    if cfg.get("cache_trunk", "auto") != "auto":
        return None
    if cfg["tune"] == "final-norm":
        model.zo_trunk_cache = FrozenTrunkCache(model)
        say("frozen trunk: decoder states are computed once per example (only the final norm is tuned)")
        return model.zo_trunk_cache
    if cfg["tune"] == "last-layers":
        first = last_layers(model, cfg["tune_layers"])[0]
    elif cfg["tune"] == "adapters":
        first = first_adapted_block(model)
    else:
        first = 0
    if not first:
        return None
    model.zo_trunk_cache = LayerInputCache(model, first)
    say(f"frozen trunk: the input states of decoder layer {first} are computed once per example (layers "
        f"{first}.. are tuned)")
    return model.zo_trunk_cache


# ----------------------------------------------------------------------------- evaluate
@dataclass
class Accuracy:
    """Test accuracy with per-example correctness (for McNemar), optional dev accuracy, seconds taken."""
    test: float
    test_correct: list
    dev: float | None = None
    seconds: float = 0.0
    float_test: float | None = None  # zero-shot with --quant: the float model's test accuracy before quantizing


def evaluate(model: nn.Module, collator, splits: dict, batch_size: int, name: str, *, dev: bool = False,
             progress: bool = True) -> Accuracy:
    """Accuracy on splits['test'] (and on splits['dev'] if `dev` and it is not empty); `name` labels the
    progress bars (a CPU zero-shot pass over the default test split takes minutes)."""
    from .scoring import evaluate_accuracy

    def bar(split: str) -> str | None:
        return f"{name}, {split}" if progress else None
    t0 = time.time()
    test, correct = evaluate_accuracy(model, collator, splits["test"], batch_size, progress=bar("test"))
    dev_acc = evaluate_accuracy(model, collator, splits["dev"], batch_size, progress=bar("dev"))[0] \
        if dev and splits["dev"] else None
    return Accuracy(test, correct, dev_acc, time.time() - t0)


def float_zero_shot(cfg: dict, loaded: Loaded, say: Say = print) -> float | None:
    """With --quant and --float-zero-shot yes: the float model's test accuracy (before quantize()), else None."""
    quant = cfg.get("quant", "none")
    if quant == "none" or cfg.get("float_zero_shot", "yes") != "yes":
        return None
    acc = evaluate(loaded.model, loaded.collator, loaded.splits, cfg["eval_batch_size"], "zero-shot (float)",
                   progress=not cfg.get("no_progress"))
    say(f"zero-shot of the float model (before --quant {quant}): test accuracy {acc.test:.4f} ({acc.seconds:.1f}s)")
    return acc.test


def load_zero_shot(out: str, n_test: int) -> Accuracy | None:
    """The zero-shot results an interrupted run saved in `out` (None if absent or not for this test split)."""
    try:
        with open(os.path.join(out, ZERO_SHOT_FILE)) as fh:
            saved = json.load(fh)
    except (OSError, ValueError):
        return None
    if len(saved.get("test_correct", ())) != n_test:
        return None
    return Accuracy(saved["test"], saved["test_correct"], saved["dev"], float_test=saved.get("float_test"))


def zero_shot(cfg: dict, model: nn.Module, loaded: Loaded, float_test: float | None, saved: Accuracy | None = None,
              say: Say = print) -> Accuracy:
    """Test and dev accuracy of the model about to be trained, written to ZERO_SHOT_FILE for --resume;
    `saved` (an interrupted run's, from load_zero_shot) is reused instead of evaluating."""
    if saved is not None:
        acc = saved
        say(f"zero-shot results of the interrupted run reused ({ZERO_SHOT_FILE})")
    else:
        acc = evaluate(model, loaded.collator, loaded.splits, cfg["eval_batch_size"], "zero-shot", dev=True,
                       progress=not cfg.get("no_progress"))
        acc.float_test = float_test
        with open(os.path.join(cfg["output_dir"], ZERO_SHOT_FILE), "w") as fh:
            json.dump({"test": acc.test, "test_correct": acc.test_correct, "dev": acc.dev, "float_test": float_test},
                      fh)
    quant = cfg.get("quant", "none")
    say(f"zero-shot{f' ({quant} model)' if quant != 'none' else ''}: test accuracy {acc.test:.4f}"
        + (f", dev {acc.dev:.4f}" if acc.dev is not None else "") + f" ({acc.seconds:.1f}s)")
    return acc


# ----------------------------------------------------------------------------- train
@dataclass
class Trained:
    """train() / baseline(): steps run, loss and dev-accuracy curves, training seconds, then the test
    accuracy of the trained model with its McNemar tests."""
    steps: int
    curves: dict              # "loss", "dev_accuracy": lists of (step, value)
    seconds: float
    test: Accuracy
    mcnemar: dict = field(default_factory=dict)  # "vs_zero_shot" (and "vs_zo" for the baseline): hf.stats.mcnemar
    log: Any = None           # the ZO optimizer's fine-tune log (ZOSGD's FineTuneLog or QuZO's QuZOLog)
    tapt: Any = None          # the first-order baseline's TAPT stage (Tapt), with --tapt-steps


class _ListDataset:
    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def training_args(cfg: dict, output_dir: str, lr: float, eval_on: bool):
    from transformers import TrainingArguments

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


def _trainer_kwargs(cfg: dict, loaded: Loaded, output_dir: str, lr: float) -> dict:
    """What the ZO and the first-order Trainer share: arguments, data, collator, dev accuracy."""
    eval_on = bool(loaded.splits["dev"]) and cfg["eval_every"] > 0
    return dict(args=training_args(cfg, output_dir, lr, eval_on), train_dataset=_ListDataset(loaded.splits["train"]),
                eval_dataset=_ListDataset(loaded.splits["dev"]) if eval_on else None,
                data_collator=loaded.collator, compute_metrics=_accuracy_metric)


class _NoStepLeft(Exception):
    """Raised by _stop_at_max_steps when the resumed checkpoint is at max_steps already."""


def _stop_at_max_steps():
    """A TrainerCallback that ends train() before its first step when the checkpoint it resumed from is at
    max_steps: the Trainer's loop runs a step before it checks global_step >= max_steps, so resuming from the
    final checkpoint would run step max_steps + 1. on_train_begin comes after the Trainer loaded the
    checkpoint's weights, optimizer state (the fine-tune log), schedule and trainer state."""
    from transformers import TrainerCallback

    class StopAtMaxSteps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:
                raise _NoStepLeft

    return StopAtMaxSteps()


def _run_trainer(trainer, progress, resume_from: str | None = None, say: Say = print) -> float:
    """Train with `progress` (a TrainerCallback) in place of transformers' printer / progress bar; seconds.
    Resumed from a checkpoint at max_steps: no step is run, the trainer holds the checkpoint's state."""
    from transformers import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    if resume_from is not None:
        trainer.add_callback(_stop_at_max_steps())  # before `progress`, which then never opens its bar
    trainer.add_callback(progress)
    t0 = time.time()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except _NoStepLeft:
        trainer.is_in_train = False
        say(f"{resume_from} is at step {trainer.state.global_step} = --max-steps: no step left to run")
    return time.time() - t0


def train(cfg: dict, tuned: Tuned, loaded: Loaded, zero_shot: Accuracy, progress, resume_from: str | None = None,
          say: Say = print) -> Trained:
    """ZO fine-tuning (ZOSGD, or QuZO over tuned.quzo_layers) with the transformers Trainer in
    cfg['output_dir']/trainer (from the checkpoint `resume_from`), then the test accuracy vs `zero_shot`."""
    from .scoring import VerbalizerObjective
    from .stats import mcnemar
    from .trainer import ZOTrainer

    model = tuned.model
    trainer = ZOTrainer(model=model, **_trainer_kwargs(cfg, loaded, os.path.join(cfg["output_dir"], "trainer"),
                                                       cfg["lr"]),
                        objective=VerbalizerObjective(cfg["objective"]), zo_eps=cfg["eps"],
                        zo_n_queries=cfg["n_queries"], zo_seed=cfg["seed"], zo_probe=cfg["probe"],
                        zo_method="zosgd" if tuned.quzo_layers is None else "quzo", zo_quant_layers=tuned.quzo_layers,
                        zo_masks=trained_masks(model, cfg.get("masks")))
    seconds = _run_trainer(trainer, progress, resume_from, say)
    test = evaluate(model, loaded.collator, loaded.splits, cfg["eval_batch_size"], "fine-tuned",
                    progress=not cfg.get("no_progress"))
    vs_zero_shot = mcnemar(zero_shot.test_correct, test.test_correct)
    say(f"fine-tuned: test accuracy {test.test:.4f} (zero-shot {zero_shot.test:.4f}, "
        f"{100 * (test.test - zero_shot.test):+.1f} points; McNemar exact p = {vs_zero_shot['p_value']:.3g})")
    return Trained(trainer.state.global_step, curves_from_history(trainer.state.log_history), seconds, test,
                   {"vs_zero_shot": vs_zero_shot}, trainer.zo_optimizer.log)


def save(cfg: dict, tuned: Tuned, tokenizer, log, say: Say = print) -> str:
    """The fine-tune log (LOG_FILE) and, with --save-model yes, the model (with --quant
    its state dict: QuantLinear modules are not a transformers architecture; rebuild_model(out) gives the
    module tree it loads into) into cfg['output_dir']. Returns the log's file name."""
    from .tuning import LOG_FILE

    out, model = cfg["output_dir"], tuned.model
    log_file = LOG_FILE
    log.save(os.path.join(out, log_file))
    model_dir = os.path.join(out, "model")
    if cfg["save_model"] == "yes" and cfg.get("quant", "none") != "none":
        os.makedirs(model_dir, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(model_dir, "quantized_state_dict.pt"))
        tokenizer.save_pretrained(model_dir)
        say(f"quantized model state saved to {os.path.join(model_dir, 'quantized_state_dict.pt')} (load it into "
            f"the module tree of zokernels.hf.rebuild_model({out!r}), or use that directly)")
    elif cfg["save_model"] == "yes":
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        say(f"model saved to {model_dir}")
    else:
        say("model not saved; rebuild it from the base model and the fine-tune log with:\n"
            f"  python -c \"from zokernels.hf import rebuild_model; m, t = rebuild_model({out!r}); "
            f"m.save_pretrained({model_dir!r}); t.save_pretrained({model_dir!r})\"")
    if cfg["save_model"] == "yes" and cfg.get("masks"):  # the saved model is still the pruned one: its masks go along
        shutil.copyfile(cfg["masks"], os.path.join(model_dir, PRUNE_MASKS_FILE))
    if cfg["save_model"] == "yes" and cfg["tune"] == "adapters":  # the base architecture has no adapters to load into
        from ..adapters import save_adapters

        save_adapters(model, os.path.join(model_dir, ADAPTERS_FILE))
        say(f"adapters saved to {os.path.join(model_dir, ADAPTERS_FILE)} (zokernels.adapters.load_adapters, after "
            "add_adapters with the run's --adapter-* options; or zokernels.hf.rebuild_model)")
    return log_file


# ----------------------------------------------------------------------------- tapt
@dataclass
class Tapt:
    """tapt(): the TAPT stage — held-out LM loss / perplexity of the dev texts before and after (hf.tapt.
    heldout_lm_loss), the accuracy after TAPT (before fine-tuning), curves ('loss', 'heldout_loss')."""
    steps: int
    lr: float
    eps: float | None             # None: first-order
    texts: int
    before: dict | None
    after: dict | None
    seconds: float
    curves: dict
    accuracy: dict | None = None  # {'test': ..., 'dev': ...} after TAPT, before fine-tuning
    log: Any = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "log"}


def tapt(cfg: dict, model: nn.Module, loaded: Loaded, progress, *, first_order: bool = False,
         resume: bool = False, say: Say = print) -> Tapt:
    """--tapt-steps N: N steps of causal-LM training (hf.tapt.CausalLMObjective) on splits['unlabeled'] with ZO
    (lr --tapt-lr, eps --tapt-eps, perturbation seed hf.tapt.tapt_seed) or, first_order, AdamW (--tapt-fo-lr),
    on the parameters --tune selects, in cfg['output_dir']/trainer_tapt(_fo). The ZO stage writes its log
    (TAPT_LOG_FILE) and results (TAPT_FILE) at once; `resume` replays that log instead of training again."""
    import zokernels

    from .tapt import TAPT_FILE, TAPT_LOG_FILE, CausalLMObjective, TextLMCollator, heldout_lm_loss, tapt_seed
    from .trainer import FOTrainer, ZOTrainer

    out = cfg["output_dir"]
    if resume:
        with open(os.path.join(out, TAPT_FILE)) as fh:
            saved = json.load(fh)
        zokernels.replay(model, os.path.join(out, TAPT_LOG_FILE))
        say(f"TAPT: the interrupted run's {saved['steps']} steps replayed from {TAPT_LOG_FILE}")
        return Tapt(**saved)
    name = "FO TAPT" if first_order else "TAPT"
    collator, heldout = TextLMCollator(loaded.tokenizer, cfg["max_text_tokens"]), loaded.splits["unlabeled_dev"]
    bar = None if cfg.get("no_progress") else f"{name}, held-out text"
    before = heldout_lm_loss(model, collator, heldout, cfg["eval_batch_size"], progress=bar)
    lr = cfg["tapt_fo_lr"] if first_order else cfg["tapt_lr"]
    eval_on = bool(heldout) and cfg["eval_every"] > 0
    args = training_args({**cfg, "max_steps": cfg["tapt_steps"], "save_steps": 0},
                         os.path.join(out, "trainer_tapt_fo" if first_order else "trainer_tapt"), lr, eval_on)
    kwargs = dict(model=model, args=args, train_dataset=_ListDataset(loaded.splits["unlabeled"]),
                  eval_dataset=_ListDataset(heldout) if eval_on else None, data_collator=collator,
                  objective=CausalLMObjective())
    trainer = FOTrainer(**kwargs) if first_order else \
        ZOTrainer(**kwargs, zo_eps=cfg["tapt_eps"], zo_n_queries=cfg["n_queries"], zo_seed=tapt_seed(cfg["seed"]),
                  zo_probe=cfg["probe"], zo_method="zosgd", zo_masks=trained_masks(model, cfg.get("masks")))
    if first_order:
        keep_pruned_zero(trainer, model, cfg)
    seconds = _run_trainer(trainer, progress, say=say)
    after = heldout_lm_loss(model, collator, heldout, cfg["eval_batch_size"], progress=bar)
    acc = evaluate(model, loaded.collator, loaded.splits, cfg["eval_batch_size"], f"after {name}", dev=True,
                   progress=not cfg.get("no_progress"))
    history = trainer.state.log_history
    curves = {"loss": curves_from_history(history)["loss"],
              "heldout_loss": [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]}
    result = Tapt(trainer.state.global_step, lr, None if first_order else cfg["tapt_eps"],
                  len(loaded.splits["unlabeled"]), before, after, seconds, curves,
                  {"test": acc.test, "dev": acc.dev}, None if first_order else trainer.zo_optimizer.log)
    ppl = (lambda r: "n/a" if r is None else f"{r['perplexity']:.2f}")
    say(f"{name}: {result.steps} steps on {result.texts} unlabeled texts in {seconds:.0f}s; held-out perplexity "
        f"{ppl(before)} -> {ppl(after)}; test accuracy after {name} {acc.test:.4f} (before fine-tuning)")
    if not first_order:
        result.log.save(os.path.join(out, TAPT_LOG_FILE))
        with open(os.path.join(out, TAPT_FILE), "w") as fh:
            json.dump(result.as_dict(), fh, indent=1)
    return result


# ----------------------------------------------------------------------------- baseline
def keep_pruned_zero(trainer, model: nn.Module, cfg: dict) -> None:
    """--masks (a pruned model) in a first-order stage: the pruned elements of the trained weights are set back to
    zero after every optimizer step (hf.pruning.KeepPrunedZero), as ZO's masked kernels never move them."""
    from transformers import TrainerCallback

    masks = trained_masks(model, cfg.get("masks"))
    if not masks:
        return
    reset = KeepPrunedZero(model, masks)

    class _Callback(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            reset()

    trainer.add_callback(_Callback())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters: baseline() starts from them (taken before ZO training)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy trainable_state() values back into the model's parameters of those names."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


def baseline(cfg: dict, model: nn.Module, loaded: Loaded, start: dict[str, torch.Tensor], zero_shot: Accuracy,
             zo: Trained, progress, say: Say = print, tapt_progress=None) -> Trained:
    """--baseline fo: the trainable parameters reset to `start`, with --tapt-steps a first-order TAPT stage
    (tapt(first_order=True), its results in Trained.tapt), then first-order AdamW (lr cfg['fo_lr'], the ZO
    objective, cross-entropy for --objective accuracy) on the same data in cfg['output_dir']/trainer_fo; then
    the test accuracy vs `zero_shot` and vs the ZO model's (`zo`)."""
    from transformers import set_seed

    from .scoring import VerbalizerObjective
    from .stats import mcnemar
    from .trainer import FOTrainer

    restore(model, start)
    set_seed(cfg["seed"])
    fo_tapt = tapt(cfg, model, loaded, tapt_progress or progress, first_order=True, say=say) \
        if cfg.get("tapt_steps") else None
    trainer = FOTrainer(model=model, **_trainer_kwargs(cfg, loaded, os.path.join(cfg["output_dir"], "trainer_fo"),
                                                       cfg["fo_lr"]),
                        objective=VerbalizerObjective("ce" if cfg["objective"] == "accuracy" else cfg["objective"]))
    keep_pruned_zero(trainer, model, cfg)
    seconds = _run_trainer(trainer, progress)
    test = evaluate(model, loaded.collator, loaded.splits, cfg["eval_batch_size"], "first-order",
                    progress=not cfg.get("no_progress"))
    say(f"FO AdamW baseline: test accuracy {test.test:.4f} ({seconds:.0f}s training)")
    return Trained(trainer.state.global_step, curves_from_history(trainer.state.log_history), seconds, test,
                   {"vs_zero_shot": mcnemar(zero_shot.test_correct, test.test_correct),
                    "vs_zo": mcnemar(zo.test.test_correct, test.test_correct)}, tapt=fo_tapt)


# ----------------------------------------------------------------------------- report
@dataclass
class RunState:
    """Everything report() writes: the stages' outputs."""
    cfg: dict
    loaded: Loaded
    tuned: Tuned
    zero_shot: Accuracy
    zo: Trained
    log_file: str
    peak_memory_mib: float  # of the ZO part (training, evaluation, saving), before --baseline fo trains
    fo: Trained | None = None
    started: float = 0.0    # time.time() at the start of the run
    tapt: Tapt | None = None  # the ZO TAPT stage, with --tapt-steps


def metrics(state: RunState) -> dict:
    """The content of metrics.json (without seconds.total)."""
    cfg, loaded, tuned, zs, zo = state.cfg, state.loaded, state.tuned, state.zero_shot, state.zo
    quant = cfg.get("quant", "none")
    m = {
        "config": dict(cfg), "data": loaded.data_path, "labels": loaded.task.labels, "template": loaded.task.template,
        "verbalizer": dict(loaded.task.verbalizer), "trainable_params": tuned.n_train, "total_params": tuned.n_total,
        "n_test": len(loaded.splits["test"]), "n_dev": len(loaded.splits["dev"]),
        "zero_shot": {"test_accuracy": zs.test, "dev_accuracy": zs.dev,
                      "model": f"{quant}-quantized (the model that is fine-tuned)" if quant != "none" else cfg["dtype"],
                      "float_model_test_accuracy": zs.float_test},
        "zo": {"test_accuracy": zo.test.test, "gain_points": 100 * (zo.test.test - zs.test),
               "mcnemar_vs_zero_shot": zo.mcnemar["vs_zero_shot"], "steps": zo.steps,
               "test_correct": zo.test.test_correct,
               "dev_accuracy": zo.curves["dev_accuracy"], "train_loss": zo.curves["loss"], "train_seconds": zo.seconds,
               "peak_memory_mib": state.peak_memory_mib},
        "optimizer": "QuZO" if tuned.quzo_layers is not None else "ZOSGD", "log_file": state.log_file,
        "seconds": {"load": loaded.seconds, "zero_shot_eval": zs.seconds, "train": zo.seconds,
                    "final_eval": zo.test.seconds},
    }
    if tuned.quant_report is not None:
        r = tuned.quant_report
        m["quant"] = {"fmt": quant, "group_size": cfg["quant_group_size"] if quant == "int4" else None,
                      "matmul": cfg["quant_matmul"], "layers": len(r.layers), "linear_bytes_before": r.bytes_before,
                      "linear_bytes_after": r.bytes_after, "model_bytes_before": r.model_bytes_before,
                      "model_bytes_after": r.model_bytes_after, "quzo_layers": tuned.quzo_layers}
    if cfg.get("masks"):  # a pruned model: its masks, and the zeros of the masked weights after training (the check)
        masks, trained = load_masks(cfg["masks"]), trained_masks(tuned.model, cfg["masks"]) or {}
        m["masks"] = {"file": cfg["masks"], "params": len(masks), "trained_masked_params": len(trained),
                      "zeros_fraction": pruned_fraction(tuned.model, masks),
                      "trained_zeros_fraction": pruned_fraction(tuned.model, trained) if trained else None}
    if state.tapt is not None:
        m["tapt"] = state.tapt.as_dict()
        m["seconds"]["tapt"] = state.tapt.seconds
    if state.fo is not None:
        fo = state.fo
        m["fo"] = {"tapt": fo.tapt.as_dict() if fo.tapt is not None else None,"test_accuracy": fo.test.test, "gain_points": 100 * (fo.test.test - zs.test),
                   "mcnemar_vs_zero_shot": fo.mcnemar["vs_zero_shot"], "mcnemar_vs_zo": fo.mcnemar["vs_zo"],
                   "test_correct": fo.test.test_correct,
                   "lr": cfg["fo_lr"], "train_seconds": fo.seconds, "dev_accuracy": fo.curves["dev_accuracy"],
                   "train_loss": fo.curves["loss"]}
    return m


def report(state: RunState, say: Say = print) -> dict:
    """training_curves.png and metrics.json in cfg['output_dir'], the closing line; returns the metrics."""
    out = state.cfg["output_dir"]
    m = metrics(state)
    curves, final = {"ZO": state.zo.curves}, {"ZO": state.zo.test.test}
    tapt_curves = {"ZO": state.tapt.curves} if state.tapt is not None else {}
    if state.fo is not None:
        curves["FO"], final["FO"] = state.fo.curves, state.fo.test.test
        if state.fo.tapt is not None:
            tapt_curves["FO"] = state.fo.tapt.curves
    plot = "training_curves.png, "
    try:
        write_plot(os.path.join(out, "training_curves.png"), curves,
                   {"dev": state.zero_shot.dev, "test": state.zero_shot.test}, final, tapt_curves or None)
    except ImportError as e:  # the plot is best effort: metrics.json holds every curve it draws
        say(f"plot skipped: matplotlib missing ({e})")
        plot = ""
    m["seconds"]["total"] = time.time() - state.started
    with open(os.path.join(out, "metrics.json"), "w") as fh:
        json.dump(m, fh, indent=1)
    say(f"wrote {out}/metrics.json, {plot}{state.log_file} ({m['seconds']['total']:.0f}s total)")
    return m


# ----------------------------------------------------------------------------- progress and plots
def peak_memory_mib(device: str) -> float:
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


def write_plot(path: str, curves: dict, zero_shot: dict, final: dict, tapt: dict | None = None) -> None:
    """Fine-tuning loss and dev accuracy per step (curves: {name: curves_from_history}); with `tapt` ({name:
    Tapt.curves}) a first panel of the TAPT stage's train and held-out LM loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if tapt else 2, figsize=(16 if tapt else 11, 4))
    ax_loss, ax_acc = axes[-2:]
    if tapt:
        for name, c in tapt.items():
            if c["loss"]:
                axes[0].plot(*zip(*c["loss"]), label=f"{name} TAPT train LM loss", lw=1)
            if c["heldout_loss"]:
                axes[0].plot(*zip(*c["heldout_loss"]), marker="o", label=f"{name} TAPT held-out LM loss")
        axes[0].set_xlabel("TAPT step"), axes[0].set_ylabel("LM loss (nats/token)")
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=8)
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
