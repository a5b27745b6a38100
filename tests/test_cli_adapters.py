"""`python -m zokernels finetune --tune adapters` on a tiny local Llama: only the bottleneck adapters train (the base
stays bitwise), rebuild_model reproduces them bitwise from the log, --quant leaves them float, bad --adapter-*
values are refused before the model load, and the run goes without the frozen-trunk cache."""
import json

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

from test_cli import run_cli, tiny_csv, tiny_model_dir  # noqa: E402

from zokernels.adapters import adapter_names, add_adapters, load_adapters  # noqa: E402
from zokernels.hf import pipeline as stages  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return tiny_model_dir(root / "model"), tiny_csv(root / "d.csv")


def argv(tiny, out, *extra):
    model_dir, data = tiny
    return ["--model", model_dir, "--data", data, "--text-column", "review", "--template", "Text : {text} Sentiment :",
            "--verbalizer", "pos= good,neg= bad", "--train-examples", "16", "--dev-examples", "8",
            "--test-examples", "8", "--batch-size", "4", "--eval-every", "0", "--device", "cpu",
            "--output-dir", str(out), "--no-progress", "--tune", "adapters", *extra]


def base_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny[0])


def keep_trained_model(monkeypatch):
    """cli.run's model (stages.save wrapped) and a copy of its parameters after the ZO training, before a
    --baseline fo trains the same parameters: what a --save-model no run does not write."""
    kept = {}
    save = stages.save

    def spy(cfg, tuned, *a, **kw):
        kept["model"] = tuned.model
        kept["zo"] = {n: p.detach().clone() for n, p in tuned.model.named_parameters()}
        return save(cfg, tuned, *a, **kw)

    monkeypatch.setattr(stages, "save", spy)
    return kept


@pytest.mark.parametrize("extra, n_adapters", [
    ([], 2),                                                                    # pfeiffer: after each block's MLP
    (["--adapter-placement", "houlsby", "--adapter-reduction", "8", "--adapter-activation", "gelu"], 4),
])
def test_adapters_train_alone_and_rebuild_bitwise(capsys, tmp_path, tiny, monkeypatch, extra, n_adapters):
    from zokernels.hf import rebuild_model

    out = tmp_path / "out"
    kept = keep_trained_model(monkeypatch)
    code, stdout, err = run_cli(capsys, argv(tiny, out, "--max-steps", "3", "--lr", "1e-2", "--save-model", "no",
                                             *extra))
    assert code == 0, err
    assert "frozen trunk" not in stdout and "fine-tuned: test accuracy" in stdout
    cfg = json.loads((out / "run_config.json").read_text())
    placement = "houlsby" if extra else "pfeiffer"
    assert (cfg["adapter_placement"], cfg["adapter_reduction"], cfg["adapter_activation"]) == \
        ((placement, 8, "gelu") if extra else (placement, 16, "relu"))
    m = json.loads((out / "metrics.json").read_text())
    assert m["optimizer"] == "ZOSGD" and m["zo"]["steps"] == 3 and (out / "finetune_log.npz").is_file()
    bottleneck = 32 // cfg["adapter_reduction"]
    assert m["trainable_params"] == n_adapters * (32 * bottleneck + bottleneck + bottleneck * 32 + 32)
    assert not (out / "model").exists()

    trained = kept["model"]
    names = adapter_names(trained)
    assert len(names) == n_adapters
    is_adapter = lambda n: any(n.startswith(a + ".") for a in names)  # noqa: E731
    base = dict(base_model(tiny).named_parameters())
    params = kept["zo"]
    assert {n for n in params if not is_adapter(n)} == set(base)
    assert all(torch.equal(p, base[n]) for n, p in params.items() if not is_adapter(n))       # base bitwise
    assert all(p.requires_grad == is_adapter(n) for n, p in trained.named_parameters())
    fresh = base_model(tiny)
    add_adapters(fresh, cfg["adapter_placement"], cfg["adapter_reduction"], cfg["adapter_activation"])
    start = dict(fresh.named_parameters())
    assert all(not torch.equal(p, start[n]) for n, p in params.items() if n.endswith(".up.weight"))  # moved

    rebuilt = rebuild_model(out)[0]
    again = dict(rebuilt.named_parameters())
    assert again.keys() == params.keys()
    assert all(torch.equal(again[n], p) for n, p in params.items()), "rebuild differs from the trained model"


def test_save_model_yes_writes_loadable_adapters_and_fo_baseline(capsys, tmp_path, tiny, monkeypatch):
    out = tmp_path / "out"
    kept = keep_trained_model(monkeypatch)
    code, stdout, err = run_cli(capsys, argv(tiny, out, "--max-steps", "2", "--lr", "1e-2", "--baseline", "fo"))
    assert code == 0, err
    assert f"model saved to {out / 'model'}" in stdout and "model not saved" not in stdout
    assert f"adapters saved to {out / 'model' / 'adapters.safetensors'}" in stdout
    fresh = base_model(tiny)
    add_adapters(fresh)
    load_adapters(fresh, out / "model" / "adapters.safetensors")
    assert all(torch.equal(p, kept["zo"][n]) for n, p in fresh.named_parameters())
    m = json.loads((out / "metrics.json").read_text())
    assert m["fo"]["lr"] == 1e-3 and 0 <= m["fo"]["test_accuracy"] <= 1   # the adapters' default fo_lr
    names = adapter_names(kept["model"])
    base = dict(base_model(tiny).named_parameters())
    after_fo = dict(kept["model"].named_parameters())
    assert all(torch.equal(p, base[n]) for n, p in after_fo.items() if n in base)   # AdamW moved the adapters only
    assert any(not torch.equal(p, kept["zo"][n]) for n, p in after_fo.items() if n.startswith(tuple(names)))


def test_quant_int8_keeps_the_adapters_float(capsys, tmp_path, tiny):
    from test_cli_quant import assert_rebuild_is_bitwise

    from zokernels.hf import rebuild_model
    from zokernels.quant.linear import QuantLinear

    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, argv(tiny, out, "--quant", "int8", "--max-steps", "3", "--lr", "1e-2",
                                             "--float-zero-shot", "no"))
    assert code == 0, err
    assert "ZOSGD trains the float adapters parameters on the frozen int8 base" in stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["quant"]["layers"] == 14 and m["quant"]["quzo_layers"] is None   # 7 per block; no adapter linear
    saved = torch.load(out / "model" / "quantized_state_dict.pt", weights_only=True)
    adapter_keys = sorted(k for k in saved if ".adapter." in k)
    assert len(adapter_keys) == 2 * 4 and all(saved[k].dtype == torch.float32 for k in adapter_keys)
    model = rebuild_model(out)[0]
    for name in adapter_names(model):
        for part in ("down", "up"):
            assert type(model.get_submodule(f"{name}.{part}")) is torch.nn.Linear
    assert any(isinstance(mod, QuantLinear) for mod in model.modules())
    assert_rebuild_is_bitwise(out, tiny[0], adapter_keys)  # training moved the adapters and nothing else


def _no_model_load(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(stages, "load", refuse)


@pytest.mark.parametrize("extra, needle", [
    (["--tune", "adapters", "--adapter-reduction", "0"], "--adapter-reduction must be >= 1, got 0"),
    (["--tune", "adapters", "--adapter-reduction", "x"], "argument --adapter-reduction: invalid int value"),
    (["--tune", "adapters", "--adapter-placement", "middle"], "argument --adapter-placement: invalid choice"),
    (["--tune", "adapters", "--adapter-activation", "swish"], "argument --adapter-activation: invalid choice"),
    (["--tune", "lora", "--adapter-placement", "houlsby"], "--adapter-placement applies to --tune adapters only"),
    (["--adapter-reduction", "8"], "--adapter-reduction applies to --tune adapters only"),
    (["--tune", "adapters", "--cache-trunk", "yes"], "argument --cache-trunk: invalid choice"),
])
def test_bad_adapter_options_refused_before_the_model_load(capsys, tmp_path, monkeypatch, extra, needle):
    _no_model_load(monkeypatch)
    code, _, err = run_cli(capsys, ["--device", "cpu", "--output-dir", str(tmp_path / "o"), *extra])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "o").exists()


def test_reduction_beyond_the_hidden_size_is_one_error_line(capsys, tmp_path, tiny):
    """The hidden size is known once the model is loaded: the refusal comes then, as one line."""
    code, _, err = run_cli(capsys, argv(tiny, tmp_path / "o", "--adapter-reduction", "64"))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and errors == ["error: --tune adapters: reduction 64 leaves no bottleneck for hidden size 32"]


def test_measured_defaults_and_only_adapter_runs_record_adapter_options():
    from zokernels.cli import build_parser, resolve_config

    def resolved(*extra):
        parser = build_parser()
        return resolve_config(parser.parse_args(["--device", "cpu", *extra]), parser)

    adapters, lora = resolved("--tune", "adapters"), resolved("--tune", "lora")
    assert {k: adapters[k] for k in ("lr", "eps", "fo_lr")} == {"lr": 3e-3, "eps": 1e-2, "fo_lr": 1e-3}  # dev search
    assert adapters["adapter_layers"] == 4 and "tapt_lr" not in adapters   # CPU; TAPT keys only with --tapt-steps
    assert not any(k.startswith("adapter_") for k in lora)


def test_no_trunk_cache_with_adapters(tmp_path, tiny):
    """The CPU default --adapter-layers 4 covers every block of the 2-block tiny model (the first included):
    nothing before them is frozen, so --cache-trunk auto attaches no cache and the steps run the whole model."""
    from test_cli_stages import config, quiet

    cfg = config(tiny, tmp_path / "o", "--tune", "adapters")
    assert cfg["cache_trunk"] == "auto"
    tuned = stages.quantize(cfg, stages.load(cfg, say=quiet([])).model, say=quiet([]))
    lines = []
    assert stages.cache(cfg, tuned.model, say=lines.append) is None
    assert getattr(tuned.model, "zo_trunk_cache", None) is None and lines == []
    assert adapter_names(tuned.model)[0].startswith("model.layers.0.")
