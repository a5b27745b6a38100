"""`python -m zokernels prune` on a tiny local Llama + CSV: the pruned model (exactly 2:4 where its masks say,
embeddings / lm_head / norms untouched) with its masks file and report; calibration text that is never a dev or test
text; `finetune --masks auto|none|PATH` on the pruned model (ZO and the first-order baseline keep the pruned weights
at zero, rebuild_model replays bitwise); the prune CLI's one-line errors."""
import csv
import json

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="transformers is not installed")

from test_cli import run_cli, tiny_csv, tiny_model_dir  # noqa: E402

from zokernels import cli_prune  # noqa: E402
from zokernels.hf import pipeline as stages  # noqa: E402
from zokernels.hf.errors import ZOError  # noqa: E402
from zokernels.hf.pruning import PRUNE_MASKS_FILE, KeepPrunedZero, calibration_batches, trained_masks  # noqa: E402
from zokernels.masks import from_dense, load_masks, save_masks  # noqa: E402

DATA = ["--text-column", "review", "--template", "Text : {text} Sentiment :", "--verbalizer", "pos= good,neg= bad",
        "--train-examples", "16", "--dev-examples", "8", "--test-examples", "8"]
SMALL = ["--calibration-examples", "4", "--calibration-tokens", "8", "--eval-texts", "4", "--eval-examples", "8"]


def prune_argv(model_dir, data, out, *extra):
    return ["--model", model_dir, "--data", data, *DATA, *SMALL, "--device", "cpu", "--output-dir", str(out),
            "--no-progress", *extra]


def run_prune_cli(capsys, argv):
    code = cli_prune.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def finetune_argv(model_dir, data, out, *extra):
    return ["--model", model_dir, "--data", data, *DATA, "--batch-size", "4", "--device", "cpu", "--output-dir",
            str(out), "--no-progress", "--tune", "last-layers", "--smoke", "--lr", "1e-2", *extra]


def params(model_dir) -> dict:
    from transformers import AutoModelForCausalLM

    return {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny model, its CSV and a wanda 2:4 prune of it (run once: tests must not write into it)."""
    root = tmp_path_factory.mktemp("prune")
    model_dir, data = tiny_model_dir(root / "model"), tiny_csv(root / "d.csv")
    out = root / "pruned"
    mp = pytest.MonkeyPatch()
    seen = {}
    from zokernels.hf import prune_job

    real = prune_job.calibration_batches

    def spy(tokenizer, texts, sequences, tokens):
        seen["texts"] = list(texts)
        seen["batches"] = real(tokenizer, texts, sequences, tokens)
        seen["tokenizer"] = tokenizer
        return seen["batches"]

    import zokernels.prune as prune_pkg

    real_prune = prune_pkg.prune

    def prune_spy(model, calibration=None, *a, **kw):
        seen["fed"] = [{k: v.clone() for k, v in b.items()} for b in calibration]
        return real_prune(model, calibration, *a, **kw)

    mp.setattr(prune_job, "calibration_batches", spy)
    mp.setattr(prune_pkg, "prune", prune_spy)
    try:
        code = cli_prune.main(prune_argv(model_dir, data, out, "--method", "wanda", "--pattern", "2:4"))
    finally:
        mp.undo()
    assert code == 0
    return {"model": model_dir, "data": data, "out": out, "seen": seen}


def block_linear_weights(model_dir) -> set:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {f"model.layers.{i}.{n}.weight" for i, block in enumerate(model.model.layers)
            for n, m in block.named_modules() if isinstance(m, nn.Linear)}


# ----------------------------------------------------------------------------- 1. prune end to end
def test_prune_wanda_2_4_end_to_end(pruned):
    from transformers import AutoModelForCausalLM

    out = pruned["out"]
    assert sorted(p.name for p in out.iterdir()) == ["model", "prune_report.json"]
    assert (out / "model" / PRUNE_MASKS_FILE).is_file()
    AutoModelForCausalLM.from_pretrained(out / "model")  # loadable with transformers
    masks = load_masks(out / "model" / PRUNE_MASKS_FILE)
    linears = block_linear_weights(pruned["model"])
    assert len(linears) == 14 and set(masks) == linears   # every block Linear, nothing else
    base, saved = params(pruned["model"]), params(out / "model")
    assert base.keys() == saved.keys()
    for name, w in saved.items():
        if name not in masks:   # embeddings, lm_head, norms: bitwise the original's
            assert torch.equal(w, base[name]), name
            continue
        keep = masks[name].dense()
        rows, cols = keep.shape
        assert (keep.view(rows, cols // 4, 4).sum(-1) == 2).all(), name   # exactly 2 of every 4
        assert (w[~keep] == 0).all() and (w[keep] != 0).all(), name
        assert torch.equal(w[keep], base[name][keep]), name              # wanda without RO only zeroes
    assert "model.embed_tokens.weight" in saved and "lm_head.weight" in saved

    report = json.loads((out / "prune_report.json").read_text())
    for what in ("dense", "pruned"):
        ppl = report[what]["heldout"]["perplexity"]
        assert isinstance(ppl, float) and 1 < ppl < float("inf") and report[what]["heldout"]["texts"] == 4
        assert 0 <= report[what]["test_accuracy"] <= 1 and len(report[what]["test_correct"]) == 8
    assert report["dense"]["heldout"]["perplexity"] != report["pruned"]["heldout"]["perplexity"]
    assert 0 <= report["pruned"]["mcnemar_vs_dense"]["p_value"] <= 1
    layers = report["prune"]["layers"]
    assert set(layers) == linears and all(v["sparsity"] == 0.5 for v in layers.values())
    assert report["prune"]["overall_sparsity"] == 0.5
    assert report["prune"]["calibration"] == {"batches": 4, "samples": 4, "tokens": 32}
    cfg = report["config"]
    assert (cfg["method"], cfg["pattern"], cfg["sparsity"], cfg["calibration_examples"], cfg["calibration_tokens"],
            cfg["eval_texts"], cfg["model"], cfg["data"]) == ("wanda", "2:4", 0.5, 4, 8, 4, pruned["model"],
                                                              pruned["data"])


# ----------------------------------------------------------------------------- 2. calibration
def test_calibration_is_never_dev_or_test_text(pruned):
    """What run_prune feeds prune() is calibration_batches of training-pool texts only: none is the text of a dev or
    test example (the tiny CSV holds every text twice, so a naive train-text pool would hold held-out texts)."""
    from zokernels.hf.pipeline import load_task_data

    seen = pruned["seen"]
    cfg = json.loads((pruned["out"] / "prune_report.json").read_text())["config"]
    _, _, splits = load_task_data({**cfg, "eval_examples": 0, "dev_eval_examples": 0})  # the uncut dev / test
    held_out = {e.text for e in splits["dev"] + splits["test"]}
    assert len(held_out) > 0 and len(seen["texts"]) > 0
    assert not set(seen["texts"]) & held_out
    with open(pruned["data"], newline="") as fh:
        corpus = {row["review"] for row in csv.DictReader(fh)}
    assert set(seen["texts"]) <= corpus - held_out   # texts of the corpus, as they are
    # prune() got exactly those windows (4 x 8 tokens, no more)
    assert len(seen["fed"]) == 4
    for fed, made in zip(seen["fed"], seen["batches"]):
        assert torch.equal(fed["input_ids"], made["input_ids"]) and fed["input_ids"].shape == (1, 8)
    stream = [i for b in seen["fed"] for i in b["input_ids"].view(-1).tolist()]
    tok = seen["tokenizer"]
    expected = [i for t in seen["texts"] for i in tok(t, add_special_tokens=False)["input_ids"]]
    assert tok.eos_token_id is None and stream == expected[:32]   # the tiny tokenizer has no EOS: no separators


class _WordTokenizer:
    """Just what calibration_batches uses: eos_token_id and __call__(text, add_special_tokens=False)."""

    def __init__(self, eos):
        self.eos_token_id, self.calls = eos, []

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        self.calls.append(text)
        return {"input_ids": [int(w) for w in text.split()]}


TEXTS = ["1 2 3", "4 5", "6 7 8 9"]


def test_calibration_batches_windows_with_eos_separators():
    tok = _WordTokenizer(eos=0)
    batches = calibration_batches(tok, TEXTS, 2, 4)
    assert [b["input_ids"].tolist() for b in batches] == [[[1, 2, 3, 0]], [[4, 5, 0, 6]]]
    for b in batches:
        assert b["input_ids"].dtype == torch.long and torch.equal(b["attention_mask"], torch.ones(1, 4).long())
    assert tok.calls == TEXTS   # the stream needs all three texts (8 tokens after the first two only)
    tok = _WordTokenizer(eos=0)
    assert len(calibration_batches(tok, TEXTS, 1, 4)) == 1 and tok.calls == TEXTS[:1]   # stops reading when full


def test_calibration_batches_without_eos_and_when_text_runs_out():
    rows = [b["input_ids"].tolist() for b in calibration_batches(_WordTokenizer(eos=None), TEXTS, 5, 3)]
    assert rows == [[[1, 2, 3]], [[4, 5, 6]], [[7, 8, 9]]]   # no separators; 3 windows, not 5
    rows = [b["input_ids"].tolist() for b in calibration_batches(_WordTokenizer(eos=0), TEXTS, 5, 4)]
    assert rows == [[[1, 2, 3, 0]], [[4, 5, 0, 6]], [[7, 8, 9, 0]]]   # 12 tokens: 3 windows of 4
    assert [b["input_ids"].tolist() for b in calibration_batches(_WordTokenizer(eos=0), TEXTS, 5, 5)] == \
        [[[1, 2, 3, 0, 4]], [[5, 0, 6, 7, 8]]]   # the tail shorter than a window is dropped


@pytest.mark.parametrize("texts, sequences, tokens, needle", [
    (TEXTS, 1, 13, "holds 12 tokens, fewer than one sequence of 13"),
    ([], 1, 2, "holds 0 tokens"),
    (TEXTS, 0, 4, "calibration needs >= 1 sequence of >= 2 tokens"),
    (TEXTS, 1, 1, "calibration needs >= 1 sequence of >= 2 tokens"),
])
def test_calibration_batches_refusals(texts, sequences, tokens, needle):
    with pytest.raises(ZOError, match=needle):
        calibration_batches(_WordTokenizer(eos=0), texts, sequences, tokens)


# ----------------------------------------------------------------------------- 3. finetune the pruned model
def spy_baseline(monkeypatch):
    """The model's parameters after --baseline fo (stages.baseline wrapped) and the start it was reset to."""
    kept = {}
    real = stages.baseline

    def spy(cfg, model, loaded, start, *a, **kw):
        kept["start"] = {n: t.clone() for n, t in start.items()}
        result = real(cfg, model, loaded, start, *a, **kw)
        kept["fo"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return result

    monkeypatch.setattr(stages, "baseline", spy)
    return kept


def trained_linears(masks) -> list:
    return sorted(n for n in masks if n.startswith("model.layers.1."))   # --tune last-layers: the last block


def test_finetune_pruned_model_keeps_pruned_weights_zero_and_rebuilds(capsys, tmp_path, pruned, monkeypatch):
    from zokernels.hf import rebuild_model

    model_dir = str(pruned["out"] / "model")
    out = tmp_path / "ft"
    fo = spy_baseline(monkeypatch)
    code, stdout, err = run_cli(capsys, finetune_argv(model_dir, pruned["data"], out, "--baseline", "fo"))
    assert code == 0, err
    run_cfg = json.loads((out / "run_config.json").read_text())
    assert run_cfg["masks"] == str(pruned["out"] / "model" / PRUNE_MASKS_FILE)   # --masks auto found it
    assert (out / "model" / PRUNE_MASKS_FILE).read_bytes() == (pruned["out"] / "model" / PRUNE_MASKS_FILE).read_bytes()
    masks = load_masks(out / "model" / PRUNE_MASKS_FILE)
    before, after = params(model_dir), params(out / "model")
    trained = trained_linears(masks)
    assert len(trained) == 7
    for name, mask in masks.items():
        keep = mask.dense()
        assert (after[name][~keep] == 0).all(), name                       # pruned: still exactly zero
        if name in trained:
            assert (after[name][keep] != before[name][keep]).all(), name   # kept: trained
        else:
            assert torch.equal(after[name], before[name]), name
    rebuilt, _ = rebuild_model(out)
    got = dict(rebuilt.named_parameters())
    assert got.keys() == after.keys() and all(torch.equal(got[n], after[n]) for n in after)
    # --baseline fo: AdamW moved the kept elements; the callback set the pruned ones back to zero
    assert fo["start"].keys() >= set(trained)
    for name in trained:
        keep = masks[name].dense()
        assert (fo["fo"][name][~keep] == 0).all(), name
        assert (fo["fo"][name][keep] != fo["start"][name][keep]).any(), name
    assert "FO AdamW baseline" in stdout


def test_keep_pruned_zero_resets_only_the_pruned_elements():
    lin = nn.Linear(8, 4)
    keep = torch.zeros(4, 8, dtype=torch.bool)
    keep[:, ::2] = True
    reset = KeepPrunedZero(lin, {"weight": from_dense(keep)})
    with torch.no_grad():
        lin.weight.fill_(3.0)
        lin.bias.fill_(2.0)
    reset()
    assert torch.equal(lin.weight, torch.where(keep, torch.tensor(3.0), torch.tensor(0.0)))
    assert (lin.bias == 2.0).all()


def test_masks_auto_is_recorded_only_for_a_pruned_model(pruned):
    from zokernels.cli import build_parser, resolve_config

    def resolved(*argv):
        parser = build_parser()
        return resolve_config(parser.parse_args([*argv, "--device", "cpu"]), parser)

    assert "masks" not in resolved("--model", pruned["model"])
    assert "masks" not in resolved("--model", str(pruned["out"] / "model"), "--masks", "none")
    assert resolved("--model", str(pruned["out"] / "model"))["masks"] == \
        str(pruned["out"] / "model" / PRUNE_MASKS_FILE)


# ----------------------------------------------------------------------------- 4. --masks none / bad masks
def test_masks_none_lets_the_pruned_weights_move(capsys, tmp_path, pruned, monkeypatch):
    model_dir = str(pruned["out"] / "model")
    out = tmp_path / "ft"
    fo = spy_baseline(monkeypatch)
    code, _, err = run_cli(capsys, finetune_argv(model_dir, pruned["data"], out, "--masks", "none",
                                                 "--baseline", "fo"))
    assert code == 0, err
    assert "masks" not in json.loads((out / "run_config.json").read_text())
    assert not (out / "model" / PRUNE_MASKS_FILE).exists()
    masks = load_masks(pruned["out"] / "model" / PRUNE_MASKS_FILE)
    after = params(out / "model")
    for name in trained_linears(masks):
        pruned_out = ~masks[name].dense()
        assert (after[name][pruned_out] != 0).any(), name   # ZO without masks moves the pruned weights
        assert (fo["fo"][name][pruned_out] != 0).any(), name   # and so does AdamW without the reset


def test_masks_missing_file_and_quant_are_one_error_line(capsys, tmp_path, pruned):
    code, _, err = run_cli(capsys, finetune_argv(pruned["model"], pruned["data"], tmp_path / "a",
                                                 "--masks", str(tmp_path / "nonexistent")))
    assert code == 2 and err.strip().splitlines() == [f"error: --masks {tmp_path / 'nonexistent'}: no such file"]
    masks_file = str(pruned["out"] / "model" / PRUNE_MASKS_FILE)
    code, _, err = run_cli(capsys, finetune_argv(pruned["model"], pruned["data"], tmp_path / "b",
                                                 "--masks", masks_file, "--quant", "int8"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --masks with --quant"), err
    assert not (tmp_path / "a" / "run_config.json").exists() and not (tmp_path / "b" / "run_config.json").exists()


def test_masks_of_another_model_are_refused(capsys, tmp_path, pruned):
    """Masks from a Llama with another intermediate size: trained_masks raises ZOError, and finetune says so."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from zokernels.prune import prune

    torch.manual_seed(1)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=22, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    path = tmp_path / "other_masks.safetensors"
    save_masks(prune(other, None, "magnitude", 0.5, progress=False).masks, path)
    model = AutoModelForCausalLM.from_pretrained(pruned["model"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ZOError, match="mlp.*has shape .*belong to another model"):
        trained_masks(model, str(path))
    code, _, err = run_cli(capsys, finetune_argv(pruned["model"], pruned["data"], tmp_path / "o", "--masks",
                                                 str(path)))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "belong to another model" in errors[0], err
    # the pruned model's own masks: only what is trained, under the model's names
    for p in model.model.layers[1].parameters():
        p.requires_grad_(True)
    own = trained_masks(model, str(pruned["out"] / "model" / PRUNE_MASKS_FILE))
    assert sorted(own) == trained_linears(own) and len(own) == 7


# ----------------------------------------------------------------------------- 5. prune CLI errors
@pytest.mark.parametrize("argv, needle", [
    (["--regional-opt", "yes", "--method", "wanda"], "--regional-opt yes is Wanda++'s regional optimization"),
    (["--sparsity", "0.3", "--pattern", "2:4"], "pattern 2:4 keeps 2 of every 4 weights: sparsity 0.5, not 0.3"),
    (["--sparsity", "1.0"], "sparsity must be a number in [0, 1), got 1.0"),
    (["--pattern", "3:3"], "pattern must be 'unstructured' or 'N:M'"),
    (["--calibration-examples", "0"], "--calibration-examples must be >= 1, got 0"),
    (["--calibration-tokens", "1"], "--calibration-tokens must be >= 2, got 1"),
    (["--method", "sparsegpt"], "invalid choice"),
])
def test_prune_bad_options_are_one_error_line(capsys, tmp_path, pruned, argv, needle):
    # the tiny model and data: were a check missing, the run would fail fast, not load the default model
    code, _, err = run_prune_cli(capsys, prune_argv(pruned["model"], pruned["data"], tmp_path / "o", *argv))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "o").exists()   # refused before anything is written


def test_prune_output_dir_refused_unless_overwrite(capsys, tmp_path, pruned):
    out = tmp_path / "out"
    fast = ("--method", "magnitude", "--accuracy", "no")
    code, _, err = run_prune_cli(capsys, prune_argv(pruned["model"], pruned["data"], out, *fast))
    assert code == 0, err
    first = (out / "prune_report.json").read_text()
    code, _, err = run_prune_cli(capsys, prune_argv(pruned["model"], pruned["data"], out, *fast))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--overwrite" in lines[0], err
    assert (out / "prune_report.json").read_text() == first and (out / "model").is_dir()
    code, _, err = run_prune_cli(capsys, prune_argv(pruned["model"], pruned["data"], out, *fast, "--overwrite",
                                                    "--save-model", "no"))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [PRUNE_MASKS_FILE, "prune_report.json"]   # old model/ removed
    report = json.loads((out / "prune_report.json").read_text())
    assert report["config"]["save_model"] == "no" and "test_accuracy" not in report["pruned"]
    assert report["prune"]["calibration"] == {}   # magnitude needs no calibration text
    assert set(load_masks(out / PRUNE_MASKS_FILE)) == block_linear_weights(pruned["model"])


# ----------------------------------------------------------------------------- 6. the command list
def test_main_help_mentions_prune(capsys):
    from zokernels.__main__ import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "prune [options]" in out and "prune " in out.splitlines()[-1]
    assert main(["prune", "--help"]) == 0
    assert "--calibration-examples" in capsys.readouterr().out
    assert main(["nope"]) == 2 and "finetune, prune" in capsys.readouterr().err
