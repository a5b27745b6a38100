"""The stages of `python -m zokernels finetune` (zokernels.hf.pipeline) called on their own: load refuses bad
inputs, quantize / cache set up what --tune and --quant ask for, evaluate matches a hand computation, zero-shot
results round-trip for --resume, train + save write the log and the model, report writes metrics.json and the
plot from a fake state."""
import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

from test_cli import tiny_csv, tiny_model_dir  # noqa: E402

from zokernels.cli import build_parser, resolve_config  # noqa: E402
from zokernels.hf import pipeline as stages  # noqa: E402
from zokernels.hf.data import Example  # noqa: E402
from zokernels.hf.errors import ZOError  # noqa: E402
from zokernels.hf.scoring import PromptTask  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    return tiny_model_dir(root / "model"), tiny_csv(root / "d.csv")


def config(tiny, out, *extra) -> dict:
    """The resolved configuration of a tiny CLI run (what cli.run hands the stages)."""
    model_dir, data = tiny
    parser = build_parser()
    args = parser.parse_args(["--model", model_dir, "--data", data, "--text-column", "review",
                              "--template", "Text : {text} Sentiment :", "--verbalizer", "pos= good,neg= bad",
                              "--train-examples", "16", "--dev-examples", "8", "--test-examples", "8",
                              "--batch-size", "4", "--eval-every", "0", "--device", "cpu", "--output-dir", str(out),
                              *extra])
    cfg = resolve_config(args, parser)
    cfg["no_progress"] = True
    return cfg


def quiet(lines):
    return lines.append


# ----------------------------------------------------------------------------- load
@pytest.mark.parametrize("extra, needle", [
    (["--labels", "pos"], "--labels needs at least two labels"),
    (["--labels", "pos,meh", "--verbalizer", "pos= good,meh= bad"], "label 'meh' does not occur in the dataset"),
    (["--verbalizer", "pos= good"], "--verbalizer has no word for labels ['neg']"),
    (["--verbalizer", "pos"], "--verbalizer items must be label=word, got 'pos'"),
    (["--label-column", "sentiment"], "has no label column 'sentiment'"),
    (["--train-examples", "42"], "not enough 'neg' examples for a balanced train split of 42 (20 in the dataset)"),
    (["--template", "no field"], "--template must contain {text} exactly once"),
])
def test_load_refuses_bad_data_before_loading_the_model(tmp_path, tiny, extra, needle):
    cfg = config(tiny, tmp_path / "o", *extra)
    cfg["model"] = str(tmp_path / "no" / "model")  # never reached: the data is checked first
    with pytest.raises(ZOError) as err:
        stages.load(cfg, say=quiet([]))
    assert needle in str(err.value)


def test_load_refuses_a_missing_model_and_too_many_labels(tmp_path, tiny):
    cfg = config(tiny, tmp_path / "o", "--model", str(tmp_path / "no" / "model"))
    with pytest.raises(ZOError, match="model path .* does not exist"):
        stages.load(cfg, say=quiet([]))
    many = tmp_path / "many.csv"
    many.write_text("review,label\n" + "".join(f"text {i},l{i}\n" for i in range(21)))
    cfg = config(tiny, tmp_path / "o", "--data", str(many), "--verbalizer", "")
    with pytest.raises(ZOError, match="'label' has 21 distinct values; choose 2-20 with --labels"):
        stages.load(cfg, say=quiet([]))


def test_load_reads_balanced_splits_and_the_model(tmp_path, tiny):
    lines = []
    cfg = config(tiny, tmp_path / "o", "--eval-examples", "6", "--dev-eval-examples", "4")
    loaded = stages.load(cfg, say=lines.append)
    assert {k: len(v) for k, v in loaded.splits.items()} == {"train": 16, "dev": 4, "test": 6}
    train, test = ({id(e) for e in loaded.splits[k]} for k in ("train", "test"))
    assert len(train) == 16 and len(test) == 6 and not train & test
    assert sorted(e.label for e in loaded.splits["train"]) == ["neg"] * 8 + ["pos"] * 8
    assert loaded.task.labels == ["neg", "pos"] and loaded.task.verbalizer == {"neg": " bad", "pos": " good"}
    assert loaded.model.config.use_cache is False and next(loaded.model.parameters()).dtype == torch.float32
    assert lines == [f"data: {tiny[1]}: train 16, dev 4, test 6 examples; labels ['neg', 'pos']"]


def test_parse_verbalizer_defaults_and_order():
    assert stages.parse_verbalizer(None, ["a", "b"]) == {"a": " a", "b": " b"}
    assert list(stages.parse_verbalizer("b= no, a= yes,c=x", ["a", "b"]).items()) == [("a", " yes"), ("b", " no")]


# ----------------------------------------------------------------------------- quantize and cache
def test_quantize_selects_and_quantizes_what_quzo_trains(tmp_path, tiny):
    cfg = config(tiny, tmp_path / "o", "--quant", "int8", "--tune", "last-layers", "--tune-linears", "down_proj")
    loaded = stages.load(cfg, say=quiet([]))
    n_params = sum(p.numel() for p in loaded.model.parameters())
    lines = []
    tuned = stages.quantize(cfg, loaded.model, say=lines.append)
    assert tuned.quzo_layers == ["model.layers.1.mlp.down_proj"]
    assert tuned.n_train == 48 * 32 and tuned.n_total == n_params
    assert len(tuned.quant_report.layers) == 14
    assert not any(p.requires_grad for p in tuned.model.parameters())
    assert lines[1] == "QuZO trains the int8 weights of 1 linear layers (last-layers); norms, embeddings and lm_head " \
                       "are frozen"
    assert stages.describe(cfg, loaded, tuned).endswith("ZO tunes last-layers: 1,536 int8 weights (QuZO)")


def test_quantize_without_quant_counts_the_trainable_parameters(tmp_path, tiny):
    cfg = config(tiny, tmp_path / "o", "--tune", "norms")
    loaded = stages.load(cfg, say=quiet([]))
    lines = []
    tuned = stages.quantize(cfg, loaded.model, say=lines.append)
    assert tuned.n_train == 32 * 5 and tuned.quant_report is None and tuned.quzo_layers is None and lines == []
    assert sorted(n for n, p in tuned.model.named_parameters() if p.requires_grad)[-1] == "model.norm.weight"


@pytest.mark.parametrize("extra, cached_from", [
    (["--tune", "final-norm"], "FrozenTrunkCache"),
    (["--tune", "last-layers"], 1),
    (["--tune", "last-layers", "--tune-layers", "2"], None),   # layer 0 is tuned: nothing frozen before it
    (["--tune", "final-norm", "--cache-trunk", "no"], None),
    (["--tune", "norms"], None),
])
def test_cache_attaches_the_frozen_trunk_cache(tmp_path, tiny, extra, cached_from):
    cfg = config(tiny, tmp_path / "o", *extra)
    tuned = stages.quantize(cfg, stages.load(cfg, say=quiet([])).model, say=quiet([]))
    cache = stages.cache(cfg, tuned.model, say=quiet([]))
    assert getattr(tuned.model, "zo_trunk_cache", None) is cache
    if cached_from is None:
        assert cache is None
    elif cached_from == "FrozenTrunkCache":
        assert type(cache).__name__ == "FrozenTrunkCache"
    else:
        assert type(cache).__name__ == "LayerInputCache" and cache.first_layer == cached_from


# ----------------------------------------------------------------------------- evaluate
def hand_accuracy(model, tokenizer, template, words, examples):
    """The prediction by hand: one unpadded forward per prompt, the larger next-token logit of the two
    (single-token) verbalizer words at the last position."""
    ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in words.values()]
    labels = list(words)
    correct = []
    with torch.no_grad():
        for e in examples:
            prompt = tokenizer(template.format(text=e.text), return_tensors="pt").input_ids
            logits = model(prompt).logits[0, -1, ids]
            correct.append(labels[int(logits.argmax())] == e.label)
    return sum(correct) / len(correct), correct


def test_evaluate_matches_a_hand_computation(tmp_path, tiny):
    cfg = config(tiny, tmp_path / "o")
    loaded = stages.load(cfg, say=quiet([]))
    torch.manual_seed(3)
    with torch.no_grad():   # a head whose two label rows differ, so the prediction depends on the text
        loaded.model.lm_head.weight.normal_(0, 1.0)
    texts = ["so good movie", "very bad food it", "good", "hate the movie very very bad", "love it", "awful day"]
    test = [Example(t, lab) for t, lab in zip(texts, ["pos", "neg", "neg", "neg", "pos", "pos"])]
    dev = [Example("great food", "pos"), Example("bad", "neg"), Example("the day was", "neg")]
    splits = {"train": [], "dev": dev, "test": test}
    acc = stages.evaluate(loaded.model, loaded.collator, splits, 4, "t", dev=True, progress=False)
    words = loaded.task.verbalizer
    expected_test, expected_correct = hand_accuracy(loaded.model, loaded.tokenizer, loaded.task.template, words, test)
    assert acc.test_correct == expected_correct and acc.test == pytest.approx(expected_test)
    assert acc.dev == pytest.approx(hand_accuracy(loaded.model, loaded.tokenizer, loaded.task.template, words, dev)[0])
    assert 0 < sum(expected_correct) < len(test)   # the hand computation is not all right or all wrong
    assert stages.evaluate(loaded.model, loaded.collator, {**splits, "dev": []}, 4, "t", dev=True,
                           progress=False).dev is None
    assert stages.evaluate(loaded.model, loaded.collator, splits, 4, "t", progress=False).dev is None


def test_zero_shot_is_saved_for_resume_and_reused(tmp_path, tiny):
    out = tmp_path / "o"
    out.mkdir()
    cfg = config(tiny, out)
    loaded = stages.load(cfg, say=quiet([]))
    lines = []
    zs = stages.zero_shot(cfg, loaded.model, loaded, 0.625, say=lines.append)
    saved = json.loads((out / stages.ZERO_SHOT_FILE).read_text())
    assert saved == {"test": zs.test, "test_correct": zs.test_correct, "dev": zs.dev, "float_test": 0.625}
    assert len(zs.test_correct) == 8 and zs.dev is not None
    assert lines == [f"zero-shot: test accuracy {zs.test:.4f}, dev {zs.dev:.4f} ({zs.seconds:.1f}s)"]
    assert stages.load_zero_shot(str(out), 7) is None   # another test split
    assert stages.load_zero_shot(str(tmp_path), 8) is None
    again = stages.load_zero_shot(str(out), 8)
    assert (again.test, again.test_correct, again.dev, again.float_test) == (zs.test, zs.test_correct, zs.dev, 0.625)
    lines.clear()
    reused = stages.zero_shot(cfg, None, loaded, None, saved=again, say=lines.append)   # no model: not evaluated
    assert reused is again and lines[0] == "zero-shot results of the interrupted run reused (zero_shot.json)"


def test_float_zero_shot_only_with_quant(tmp_path, tiny):
    loaded = stages.load(config(tiny, tmp_path / "o"), say=quiet([]))
    assert stages.float_zero_shot(config(tiny, tmp_path / "o"), loaded) is None
    assert stages.float_zero_shot(config(tiny, tmp_path / "o", "--quant", "int8", "--float-zero-shot", "no"),
                                  loaded) is None
    lines = []
    acc = stages.float_zero_shot(config(tiny, tmp_path / "o", "--quant", "int8"), loaded, say=lines.append)
    assert acc == stages.evaluate(loaded.model, loaded.collator, loaded.splits, 32, "x", progress=False).test
    assert lines[0].startswith(f"zero-shot of the float model (before --quant int8): test accuracy {acc:.4f}")


# ----------------------------------------------------------------------------- train, save, baseline
def _steps_seen():
    """A progress callback (no bar) that records the steps it saw."""
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    return Steps()


def test_train_save_and_baseline(tmp_path, tiny):
    from zokernels.log import FineTuneLog

    out = tmp_path / "o"
    out.mkdir()
    cfg = config(tiny, out, "--max-steps", "3", "--lr", "1e-2", "--baseline", "fo", "--save-model", "no")
    cfg["logging_steps"] = 1
    loaded = stages.load(cfg, say=quiet([]))
    tuned = stages.quantize(cfg, loaded.model, say=quiet([]))
    zs = stages.evaluate(tuned.model, loaded.collator, loaded.splits, 4, "zs", progress=False)
    start = stages.trainable_state(tuned.model)
    assert list(start) == ["model.norm.weight"]
    lines, progress = [], _steps_seen()
    zo = stages.train(cfg, tuned, loaded, zs, progress, say=lines.append)
    assert zo.steps == 3 and progress.steps == [1, 2, 3] and [s for s, _ in zo.curves["loss"]] == [1, 2, 3]
    assert len(zo.log.steps) == 3 and len(zo.test.test_correct) == 8
    from zokernels.hf.stats import mcnemar
    assert zo.mcnemar == {"vs_zero_shot": mcnemar(zs.test_correct, zo.test.test_correct)}
    assert lines[0].startswith(f"fine-tuned: test accuracy {zo.test.test:.4f} (zero-shot {zs.test:.4f}")
    moved = tuned.model.get_parameter("model.norm.weight").detach().clone()
    assert not torch.equal(moved, start["model.norm.weight"])

    assert stages.save(cfg, tuned, loaded.tokenizer, zo.log, say=lines.append) == "finetune_log.npz"
    assert [r.seed for r in FineTuneLog.load(out / "finetune_log.npz").steps] == [r.seed for r in zo.log.steps]
    assert not (out / "model").exists() and "rebuild_model" in lines[-1]

    fo = stages.baseline(cfg, tuned.model, loaded, start, zs, zo, _steps_seen(), say=lines.append)
    assert fo.steps == 3 and set(fo.mcnemar) == {"vs_zero_shot", "vs_zo"} and fo.log is None
    assert lines[-1].startswith(f"FO AdamW baseline: test accuracy {fo.test.test:.4f}")
    assert (out / "trainer_fo").is_dir()


def test_baseline_starts_from_the_given_weights(tmp_path, tiny):
    """baseline() resets the trainable parameters to `start` before training: with lr ~0 it ends where it began,
    whatever the weights were before the call."""
    out = tmp_path / "o"
    out.mkdir()
    cfg = config(tiny, out, "--max-steps", "1", "--fo-lr", "1e-30", "--baseline", "fo")
    loaded = stages.load(cfg, say=quiet([]))
    tuned = stages.quantize(cfg, loaded.model, say=quiet([]))
    start = stages.trainable_state(tuned.model)
    with torch.no_grad():
        tuned.model.get_parameter("model.norm.weight").add_(5.0)
    zs = stages.evaluate(tuned.model, loaded.collator, loaded.splits, 4, "zs", progress=False)
    fake_zo = stages.Trained(1, {"loss": [], "dev_accuracy": []}, 0.0, zs)
    stages.baseline(cfg, tuned.model, loaded, start, zs, fake_zo, _steps_seen(), say=quiet([]))
    assert torch.allclose(tuned.model.get_parameter("model.norm.weight"), start["model.norm.weight"], atol=1e-6)


# ----------------------------------------------------------------------------- report
def fake_state(tmp_path, tiny, fo: bool, quant: bool) -> stages.RunState:
    out = tmp_path / "o"
    out.mkdir(exist_ok=True)
    cfg = config(tiny, out, *(["--quant", "int4", "--quant-group-size", "32"] if quant else []))
    ex = Example("t", "pos")
    loaded = stages.Loaded("d.csv", PromptTask("Q {text} A", {"pos": " yes", "neg": " no"}),
                           {"train": [ex] * 5, "dev": [ex] * 3, "test": [ex] * 4}, None, None, None, seconds=1.5)
    report = None
    if quant:
        from types import SimpleNamespace
        report = SimpleNamespace(layers=["a", "b"], bytes_before=400, bytes_after=100, model_bytes_before=1000,
                                 model_bytes_after=700)
    tuned = stages.Tuned(None, n_total=1000, n_train=32, quant_report=report)
    zs = stages.Accuracy(0.5, [True, False, True, False], dev=0.25, seconds=2.0, float_test=0.75 if quant else None)
    curves = {"loss": [(1, 0.9), (2, 0.7), (3, 0.6)], "dev_accuracy": [(2, 0.5), (3, 0.75)]}
    zo = stages.Trained(3, curves, 4.0, stages.Accuracy(0.75, [True, True, True, False], seconds=0.5),
                        {"vs_zero_shot": {"p_value": 1.0}})
    fo_run = stages.Trained(3, {"loss": [(1, 0.8)], "dev_accuracy": []}, 6.0,
                            stages.Accuracy(0.25, [False, False, True, False]),
                            {"vs_zero_shot": {"p_value": 0.5}, "vs_zo": {"p_value": 0.25}}) if fo else None
    return stages.RunState(cfg, loaded, tuned, zs, zo, "finetune_log.npz", 123.0, fo_run, started=0.0)


PLOTS = importlib.util.find_spec("matplotlib") is not None  # the GPU rehearsal's image has no matplotlib


@pytest.mark.parametrize("fo, quant", [(False, False), (True, True)])
def test_report_writes_metrics_and_plot_from_a_fake_state(tmp_path, tiny, fo, quant):
    state = fake_state(tmp_path, tiny, fo, quant)
    lines = []
    m = stages.report(state, say=lines.append)
    out = tmp_path / "o"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    if PLOTS:
        assert (out / "training_curves.png").stat().st_size > 1000
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"] + (["training_curves.png"] if PLOTS else [])
    assert m["config"] == state.cfg and m["data"] == "d.csv" and m["labels"] == ["pos", "neg"]
    assert (m["trainable_params"], m["total_params"], m["n_test"], m["n_dev"]) == (32, 1000, 4, 3)
    assert m["zero_shot"] == {"test_accuracy": 0.5, "dev_accuracy": 0.25,
                              "model": "int4-quantized (the model that is fine-tuned)" if quant else "float32",
                              "float_model_test_accuracy": 0.75 if quant else None}
    assert m["zo"] == {"test_accuracy": 0.75, "gain_points": 25.0, "mcnemar_vs_zero_shot": {"p_value": 1.0},
                       "steps": 3, "dev_accuracy": [(2, 0.5), (3, 0.75)], "train_loss": [(1, 0.9), (2, 0.7), (3, 0.6)],
                       "train_seconds": 4.0, "peak_memory_mib": 123.0, "test_correct": state.zo.test.test_correct}
    assert m["zo"]["test_correct"] == [True, True, True, False]   # per example: McNemar against any other run later
    assert m["optimizer"] == "ZOSGD" and m["log_file"] == "finetune_log.npz"
    assert {k: m["seconds"][k] for k in ("load", "zero_shot_eval", "train", "final_eval")} == \
        {"load": 1.5, "zero_shot_eval": 2.0, "train": 4.0, "final_eval": 0.5}
    assert m["seconds"]["total"] > 1e9   # time.time() - started=0.0
    assert ("fo" in m) == fo and ("quant" in m) == quant
    if fo:
        assert m["fo"]["gain_points"] == -25.0 and m["fo"]["mcnemar_vs_zo"] == {"p_value": 0.25}
        assert m["fo"]["lr"] == state.cfg["fo_lr"] and m["fo"]["train_seconds"] == 6.0
        assert m["fo"]["test_correct"] == state.fo.test.test_correct
    if quant:
        assert m["quant"] == {"fmt": "int4", "group_size": 32, "matmul": "dequant", "layers": 2,
                              "linear_bytes_before": 400, "linear_bytes_after": 100, "model_bytes_before": 1000,
                              "model_bytes_after": 700, "quzo_layers": None}
    assert lines[-1] == (f"wrote {out}/metrics.json, {'training_curves.png, ' if PLOTS else ''}finetune_log.npz "
                         f"({m['seconds']['total']:.0f}s total)")
    assert len(lines) == (1 if PLOTS else 2)


def test_report_without_matplotlib_writes_metrics_and_says_the_plot_was_skipped(tmp_path, tiny, monkeypatch):
    def no_matplotlib(*a, **k):
        raise ImportError("No module named 'matplotlib'")
    monkeypatch.setattr(stages, "write_plot", no_matplotlib)
    lines = []
    stages.report(fake_state(tmp_path, tiny, False, False), say=lines.append)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["metrics.json"]
    assert lines[0].startswith("plot skipped: matplotlib missing") and "training_curves" not in lines[1]


def test_quantize_stage_turns_a_model_without_linears_into_one_error():
    """--quant on a model with nothing to quantize: ZOError (the CLI's one-line error), not a traceback."""
    from zokernels.hf.errors import ZOError
    from zokernels.hf.tuning import quantize_for_tuning

    class NoLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)

    with pytest.raises(ZOError, match="--quant int8: .*nn.Linear"):
        quantize_for_tuning(NoLinear(), "int8", "final-norm")
