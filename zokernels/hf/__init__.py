"""HuggingFace integration: ZOTrainer (transformers.Trainer with ZOSGD steps), loaders for the default
model/corpus and CSV/JSONL data, prompt + verbalizer scoring at the label positions only.
Importing this package imports transformers (nothing else in zokernels does)."""
from .errors import ZOError
from .data import (Example, balanced_splits, default_corpus_file, default_model_file, load_model_and_tokenizer,
                   read_examples)
from .scoring import (PromptTask, VerbalizerCollator, VerbalizerObjective, candidate_scores, evaluate_accuracy,
                      label_position_logits)
from .trainer import FOTrainer, ZOTrainer
from .tuning import rebuild_model, select_trainable

__all__ = ["ZOError", "Example", "balanced_splits", "default_corpus_file", "default_model_file",
           "load_model_and_tokenizer", "read_examples", "PromptTask", "VerbalizerCollator", "VerbalizerObjective",
           "candidate_scores", "evaluate_accuracy", "label_position_logits", "FOTrainer", "ZOTrainer",
           "rebuild_model", "select_trainable"]
