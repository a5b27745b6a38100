"""`python -m zokernels prune`: prune a real LLM (magnitude, Wanda, Wanda++) on calibration text from its task's
corpus, report held-out perplexity and zero-shot test accuracy before and after, and save the pruned model with its
kept-weight masks (zokernels.hf.pruning). Fine-tune the result with `python -m zokernels finetune --model
<output-dir>/model` (its masks keep the pruned weights at zero)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .cli import (CPU_DEFAULTS, GPU_DEFAULTS, _OneLineParser, _resolve_device, add_model_data_arguments,
                  prepare_output_dir)
from .hf.errors import ZOError
from .hf.prune_job import PRUNE_REPORT_FILE, run_prune
from .hf.pruning import PRUNE_MASKS_FILE
from .prune import METHODS, PruneError, resolve_sparsity

DATA_KEYS = ("model", "data", "text_column", "label_column", "labels", "verbalizer", "template", "encoding",
             "train_examples", "dev_examples", "test_examples", "eval_examples", "dev_eval_examples",
             "max_text_tokens")
PRUNE_OUTPUTS = (PRUNE_REPORT_FILE, PRUNE_MASKS_FILE, "model")
SPLIT_DEFAULTS = ("train_examples", "dev_examples", "test_examples", "eval_examples", "dev_eval_examples",
                  "max_text_tokens", "eval_batch_size", "dtype")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m zokernels prune",
                       description="Prune the Linears inside a causal LM's decoder blocks (never embeddings or "
                                   "lm_head) with magnitude, Wanda or Wanda++ scores, unstructured per output row or "
                                   "N:M; calibrated on the task corpus's training-pool text.")
    add_model_data_arguments(p)
    g = p.add_argument_group("pruning")
    g.add_argument("--method", choices=METHODS, default="wanda")
    g.add_argument("--sparsity", type=float, help="fraction of each row pruned, in [0, 1) (default 0.5; with an "
                                                  "N:M pattern 1 - N/M, leave it unset)")
    g.add_argument("--pattern", default="unstructured", help="unstructured, or N:M such as 2:4 or 4:8")
    g.add_argument("--alpha", type=float, default=100.0, help="Wanda++: weight of the regional gradient score")
    g.add_argument("--regional-opt", choices=("yes", "no"), default="no",
                   help="Wanda++: regional optimization of each pruned block against its dense output")
    g.add_argument("--ro-rounds", type=int, default=5, help="RO: prune / RMSprop rounds per block")
    g.add_argument("--ro-lr", type=float, default=3e-7, help="RO: RMSprop learning rate (the paper's 3e-7)")
    g.add_argument("--ro-samples", type=int, default=32, help="RO: calibration sequences fitted per block")
    g.add_argument("--calibration-examples", type=int, default=128,
                   help="calibration sequences (windows of the training pool's text; never dev or test text)")
    g.add_argument("--calibration-tokens", type=int, default=128, help="tokens per calibration sequence")
    e = p.add_argument_group("evaluation and output")
    e.add_argument("--eval-texts", type=int, default=200, help="dev texts of the held-out perplexity")
    e.add_argument("--accuracy", choices=("yes", "no"), default="yes",
                   help="zero-shot test accuracy of the task before and after pruning (McNemar)")
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights dtype (default: the "
                                                                              "finetune default of the device)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--output-dir", default="zo-prune-out")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--save-model", choices=("yes", "no"), default="yes",
                   help="no: only the masks and the report")
    e.add_argument("--no-progress", action="store_true")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """The job's configuration: the finetune defaults of the device for the data splits, then the options."""
    device = _resolve_device(args.device)
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    cfg = {k: defaults[k] for k in SPLIT_DEFAULTS}
    for key, value in vars(args).items():
        if value is not None or key not in cfg:
            cfg[key] = value
    cfg["device"] = device
    try:
        cfg["sparsity"] = resolve_sparsity(args.sparsity, args.pattern)
    except PruneError as e:
        raise ZOError(str(e)) from None
    for key in ("calibration_examples", "calibration_tokens", "eval_texts", "ro_rounds", "ro_samples"):
        if cfg[key] < (2 if key == "calibration_tokens" else 1):
            raise ZOError(f"--{key.replace('_', '-')} must be >= {2 if key == 'calibration_tokens' else 1}, "
                          f"got {cfg[key]}")
    if args.regional_opt == "yes" and args.method != "wanda++":
        raise ZOError("--regional-opt yes is Wanda++'s regional optimization: use --method wanda++")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m zokernels prune`; returns the exit code (2 for usage/input errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        cfg = resolve_config(args)
        prepare_output_dir(cfg["output_dir"], cfg["overwrite"], inputs=(cfg.get("model"), cfg.get("data")),
                           outputs=PRUNE_OUTPUTS, markers=(PRUNE_REPORT_FILE,))
        run_prune(cfg)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except (ZOError, PruneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
