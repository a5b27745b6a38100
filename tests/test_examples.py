"""The experiment scripts' bookkeeping (examples/adapters_tapt.py --merge, examples/prune_zo.py --collect / render):
pure JSON work on fabricated arms, no model."""
import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _adapter_arm(name, correct, reduction=16):
    return {"name": name, "config": {"adapter_reduction": reduction, "adapter_placement": "pfeiffer",
                                     "adapter_activation": "relu", "adapter_layers": 4, "max_steps": 5,
                                     "batch_size": 2, "lr": 1e-3, "eps": 1e-2, "lr_scheduler": "linear",
                                     "fo_lr": 1e-3, "device": "cpu"},
            "trainable_params": 10, "seconds": 60.0, "tapt": None, "fo": None,
            "zo": {"test_accuracy": sum(correct) / len(correct), "test_correct": correct, "dev_accuracy": [],
                   "mcnemar_vs_direct": {"p_value": 0.123}}}


def _run(path, arms, zero_shot=0.5):
    data = {"zero_shot": {"test_accuracy": zero_shot, "dev_accuracy": 0.5}, "n_test": 8, "total_seconds": 120.0,
            "evaluated_on": "test", "threads": 2, "command": "c", "note": "", "search": None, "arms": arms}
    path.write_text(json.dumps(data))
    return str(path)


def test_adapters_tapt_merge_joins_runs_and_recomputes_mcnemar(tmp_path):
    mod = _load("adapters_tapt")
    direct = [True, False, True, False, True, False, True, False]
    better = [True] * 8
    a = _run(tmp_path / "a.json", [_adapter_arm("direct", direct), _adapter_arm("tapt", direct)])
    b = _run(tmp_path / "b.json", [_adapter_arm("tapt", better), _adapter_arm("r4-direct", better, 4)])
    out = tmp_path / "out"
    out.mkdir()
    mod.main(["--out", str(out), "--merge", a, b])
    merged = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in merged["arms"]] == ["direct", "tapt", "r4-direct"]   # b's tapt replaced a's
    tapt = merged["arms"][1]
    assert tapt["zo"]["test_correct"] == better
    assert tapt["zo"]["mcnemar_vs_direct"]["p_value"] == pytest.approx(0.125)   # 4 discordant, one way: 2 / 2^4
    assert "mcnemar_vs_direct" not in merged["arms"][0]["zo"]                    # the stale 0.123 is dropped
    assert merged["total_seconds"] == 240.0 and a in merged["note"] and b in merged["note"]
    assert "| r4-direct | 4 |" in (out / "results.md").read_text()


def test_adapters_tapt_merge_refuses_runs_with_other_zero_shot(tmp_path):
    mod = _load("adapters_tapt")
    a = _run(tmp_path / "a.json", [_adapter_arm("direct", [True] * 8)])
    b = _run(tmp_path / "b.json", [_adapter_arm("tapt", [True] * 8)], zero_shot=0.625)
    with pytest.raises(SystemExit, match="zero-shot"):
        mod.main(["--out", str(tmp_path), "--merge", a, b])


def _prune_arm_dir(out, name, zs, ft, pruned=True):
    d = out / name
    d.mkdir(parents=True)
    cfg = {"tune": "final-norm", "max_steps": 5, "batch_size": 2, "lr": 0.2, "eps": 1e-3, "lr_scheduler": "linear",
           "device": "cpu"}
    (d / "metrics.json").write_text(json.dumps({
        "config": cfg, "n_test": len(zs), "trainable_params": 576, "seconds": {"total": 30.0},
        "zo": {"test_accuracy": sum(ft) / len(ft), "test_correct": ft}}))
    (d / "zero_shot.json").write_text(json.dumps({"test": sum(zs) / len(zs), "test_correct": zs, "dev": 0.5}))
    if pruned:
        (d / "prune_report.json").write_text(json.dumps({
            "config": {"eval_texts": 4, "calibration_examples": 2, "calibration_tokens": 8, "alpha": 100.0,
                       "ro_rounds": 5, "ro_samples": 32, "ro_lr": 3e-7},
            "prune": {"overall_sparsity": 0.5, "seconds": 12.0},
            "dense": {"heldout": {"perplexity": 100.0}}, "pruned": {"heldout": {"perplexity": 400.0}}}))


def test_prune_zo_collect_renders_the_finished_arms(tmp_path, capsys):
    mod = _load("prune_zo")
    out = tmp_path / "r"
    good = [True] * 8
    half = [True, False] * 4
    _prune_arm_dir(out, "dense", good, good, pruned=False)
    _prune_arm_dir(out, "wanda-50%", half, good)
    (out / "wanda-2of4").mkdir()                                   # started, never finished: left out
    mod.main(["--collect", "--out", str(out), "--arms", "dense,wanda-50%,wanda-2of4"])
    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["arms"]] == ["dense", "wanda-50%"]
    wanda = data["arms"][1]
    assert wanda["zero_shot_vs_dense"]["p_value"] == pytest.approx(0.125)
    assert wanda["finetuned_vs_dense"]["p_value"] == 1.0
    table = (out / "results.md").read_text()
    assert "| dense | 0 | 100.0 | 1.0000 |" in table and "| wanda-50% | 0.500 | 400.0 | 0.5000 | 0.12 |" in table
    assert "wanda-2of4: not finished" in capsys.readouterr().out
