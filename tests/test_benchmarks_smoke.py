"""CPU smoke test of the benchmark suite: the timed functions do what they claim (checked against
the contract's z and torch's seeded normal), and the harness entry point writes complete results.
No performance thresholds here: those are evaluated by `python -m benchmarks` on a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import report, run
from benchmarks import masked as M
from benchmarks.baselines import ForeachZO, MeZO
from benchmarks.ours import OursInPlace
from benchmarks.shapes import big_tensor, llama7b, make_params, opt1_3b
from zokernels import mazo, ops
from zokernels.contract import param_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 50_021  # ~50K elements, odd: exercises the tail of a Philox block
SEED, EPS, LR, G = 1234, 1e-3, 1e-2, 0.75


def _bench(benchmark, fn):
    """A few rounds only: the reference backend is slow and CI has two cores."""
    return benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)


def _contract_z(name: str, like: torch.Tensor) -> torch.Tensor:
    return ops.perturbation(like, SEED, param_key(name), backend="reference")


def test_shape_sets_match_the_real_models():
    assert llama7b().numel == 6_738_415_616          # LLaMA-7B's published parameter count
    assert opt1_3b().numel == 1_315_758_080          # OPT-1.3B (lm_head tied to the embedding)
    assert len(llama7b(layer_scale=0.25).params) == 2 + 8 * 9 + 1


def test_perturb_reference(benchmark):
    params = make_params(big_tensor(N), torch.float32, torch.device("cpu"), seed=1)
    p0 = params[0][1].detach().clone()
    ours = OursInPlace(params, EPS, LR, backend="reference")
    ours.perturb(SEED, EPS)
    torch.testing.assert_close(params[0][1].data, p0 + EPS * _contract_z("big.weight", p0), rtol=0, atol=1e-7)

    def round_trip():
        ours.perturb(SEED, -EPS)
        ours.perturb(SEED, EPS)

    _bench(benchmark, round_trip)
    torch.testing.assert_close(params[0][1].data, p0 + EPS * _contract_z("big.weight", p0), rtol=0, atol=1e-6)


def test_restore_update_reference(benchmark):
    params = make_params(big_tensor(N), torch.float32, torch.device("cpu"), seed=2)
    p0 = params[0][1].detach().clone()
    ours = OursInPlace(params, EPS, LR, backend="reference")
    calls = [0]

    def probe_end_then_update():  # in-place probe ends at theta - eps z; the update restores it
        ours.perturb(SEED, -EPS)
        ours.update(SEED, G)
        calls[0] += 1

    _bench(benchmark, probe_end_then_update)
    expected = p0 - calls[0] * LR * G * _contract_z("big.weight", p0)
    torch.testing.assert_close(params[0][1].data, expected, rtol=0, atol=1e-6)


def _mezo_z(params) -> list[torch.Tensor]:
    torch.manual_seed(SEED)  # MeZO seeds once per sweep and draws z parameter after parameter
    return [torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype) for _, p in params]


def test_mezo_baseline(benchmark):
    params = make_params(llama7b(layer_scale=0.01, width_div=128), torch.float32, torch.device("cpu"), seed=3)
    p0 = [p.detach().clone() for _, p in params]
    mezo = MeZO(params, EPS, LR, weight_decay=0.0)
    calls = [0]

    def sweeps():
        mezo.sweeps(SEED, G)
        calls[0] += 1

    _bench(benchmark, sweeps)
    for (_, p), a, z in zip(params, p0, _mezo_z(params)):
        torch.testing.assert_close(p.data, a - calls[0] * LR * G * z, rtol=0, atol=1e-6)


def test_foreach_baseline_matches_mezo_math():
    params = make_params(llama7b(layer_scale=0.01, width_div=128), torch.float32, torch.device("cpu"), seed=4)
    p0 = [p.detach().clone() for _, p in params]
    fe = ForeachZO([p.data for _, p in params], EPS, LR)
    fe.sweeps(SEED, G)
    gen = torch.Generator().manual_seed(SEED)
    for (_, p), a in zip(params, p0):
        z = torch.empty_like(a).normal_(generator=gen)
        torch.testing.assert_close(p.data, a - LR * G * z, rtol=0, atol=1e-6)


def test_harness_cpu_quick(tmp_path):
    out = tmp_path / "results"
    rc = run.main(["--device", "cpu", "--quick", "--out", str(out), "--threads", "1", "--dtypes", "bf16",
                   "--models", "llama-7b", "--big-sizes", "", "--e2e-models", "llama-7b", "--warmup", "1",
                   "--repeats", "1", "--e2e-seq", "8", "--zosgd-probes", "inplace,hooks",
                   "--masked-ratios", "0.01,0.5"])  # the default ratios 1%, 10%, 50%, 100%: see below
    assert rc == 0
    files = sorted(os.listdir(out))
    stems = {os.path.splitext(f)[0] for f in files}
    assert len(stems) == 1 and {os.path.splitext(f)[1] for f in files} == {".json", ".md", ".png"}, files
    stem = os.path.join(out, stems.pop())
    data = json.load(open(stem + ".json"))
    assert data["errors"] == [], data["errors"]
    meta = data["meta"]
    for key in ("device_name", "driver_version", "torch", "triton", "transformers", "date", "command", "wall_s"):
        assert key in meta, key
    assert os.path.basename(stem).endswith(meta["date"])
    assert data["copy_bandwidth"]["gbps"] > 0
    assert {r["backend"] for r in data["rng"]} >= {"torch", "reference"}
    kernels = {(r["impl"], r["kernel"]) for r in data["micro"]}
    for k in [("ours", "perturb_"), ("ours", "zo_update_ restore+update"), ("ours", "zo_update_ q=4"),
              ("ours", "zo_update_ restore+update SR"), ("ours", "perturbed_copy (per tensor)"),
              ("ours", "step sweeps in-place"), ("ours", "step sweeps drift-free"), ("mezo", "step sweeps"),
              ("foreach", "step sweeps")]:
        assert k in kernels, k
    for r in data["micro"]:
        assert r["median_ms"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["bytes"] % r["param_bytes"] == 0 and r["bytes_formula"]
    e2e = {r["impl"] for r in data["e2e"]}
    assert {"forward (no_grad, with loss)", "mezo", "ours-ops", "first-order AdamW"} <= e2e, e2e
    zo = [r for r in data["e2e"] if r["impl"] in ("mezo", "ours-ops", "ZOSGD")]
    assert all(r["outside_forward_ms"] == pytest.approx(r["median_ms"] - 2 * r["forward_ms"]) for r in zo)
    names = {t["target"] for t in data["targets"]}
    assert {"perturb_ bandwidth vs copy", "ZO step time outside the 2 forwards",
            "whole ZO step speedup over MeZO"} <= names, names
    for t in data["targets"]:
        assert set(t) == {"target", "scope", "goal", "measured", "unit", "pass", "margin"}
    masked = data["masked"]
    cases = {(r["rule"], r["ratio"], r["kernel"]) for r in masked}
    assert {("dense", 1.0, k) for k in (M.K_PERTURB, M.K_UPDATE, M.K_COPY_DENSE)} <= cases
    for rule in ("rows", "blocks16"):
        for ratio in (0.01, 0.5):
            for k in (M.K_PERTURB, M.K_UPDATE, M.K_COPY_PERSISTENT, M.K_COPY_FRESH):
                assert (rule, ratio, k) in cases, (rule, ratio, k)
    for r in masked:
        assert r["backend"] == "reference" and r["median_ms"] > 0
        assert r["gbps"] == pytest.approx(r["bytes_touched"] / (r["median_ms"] * 1e-3) / 1e9)
        dense = next(d for d in masked if d["rule"] == "dense" and d["kernel"] == M.DENSE_OF.get(r["kernel"],
                                                                                                 r["kernel"]))
        assert r["vs_dense"] == pytest.approx(r["median_ms"] / dense["median_ms"])
        if r["rule"] != "dense":  # bytes touched follow the sector model of benchmarks/masked.py
            sector_bytes = 2 * 32 * r["sectors"] + r["index_bytes"]
            fresh = r["kernel"] == M.K_COPY_FRESH
            assert r["bytes_touched"] == sector_bytes + (2 * r["param_bytes"] if fresh else 0)
            assert r["bytes_moved"] == 2 * 2 * r["count"] + r["index_bytes"]  # bf16
            assert r["mask_ratio"] <= r["sector_fraction"] <= 1.0
    md = open(stem + ".md").read()
    assert meta["device_name"] in md and "## Targets" in md and "## End to end" in md
    assert "## Masked kernels (MaZO)" in md and M.K_COPY_PERSISTENT in md
    assert run.build_config(run.parse_args(["--device", "cpu"])).masked_ratios == [0.01, 0.1, 0.5, 1.0]
    with open(stem + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = report.readme_table(str(out), include_cpu=True)
    assert meta["device_name"] in table and os.path.basename(stem) + ".json" in table
    assert "No benchmark results" in report.readme_table(str(out))  # CPU smoke runs stay out of the README
    os.remove(stem + ".png")
    assert report.main([stem + ".json"]) == 0  # re-render from the JSON alone
    assert os.path.exists(stem + ".png") and "## Targets" in open(stem + ".md").read()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_masked_sector_count_matches_brute_force(dtype):
    """The byte model's S: distinct 32-byte sectors holding a masked element, against unique(j // per)."""
    es = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(5)
    for shape in [(37, 203), (5, 1037), (1, 4099), (12, 48)]:
        scores = torch.rand(shape, generator=gen)
        for rule, block in [("row_topk", 1), ("block_topk", 16), ("block_topk", 24), ("bits", 1)]:
            for ratio in (0.01, 0.1, 0.5, 1.0):
                m = mazo.build_masks({"w": scores}, ratio, rule, block=max(block, 16))["w"]
                brute = int(torch.unique(m.local_indices() // (32 // es)).numel())
                assert M.sectors_touched(m, es, chunk=64) == brute, (shape, rule, block, ratio)
    # a scattered 10% element mask of a wide bf16 matrix touches ~1 - 0.9^16 = 81% of the sectors
    m = mazo.build_masks({"w": torch.rand(64, 4096, generator=gen)}, 0.1)["w"]
    frac = M.sectors_touched(m, 2) / (64 * 4096 * 2 // 32)
    assert frac == pytest.approx(M.expected_sector_fraction(0.1, 2), abs=0.01)


def test_masked_harness_only_masked(tmp_path):
    """`--only masked` measures its own copy line and times both rules on the reference backend."""
    out = tmp_path / "masked"
    rc = run.main(["--device", "cpu", "--quick", "--out", str(out), "--threads", "1", "--only", "masked",
                   "--dtypes", "fp32", "--masked-ratios", "0.1", "--masked-blocks", "8,32", "--repeats", "1"])
    assert rc == 0
    (stem,) = {os.path.splitext(f)[0] for f in os.listdir(out)}
    data = json.load(open(os.path.join(out, stem + ".json")))
    assert data["errors"] == [] and data["copy_bandwidth"]["gbps"] > 0 and data["micro"] == []
    assert {r["rule"] for r in data["masked"]} == {"dense", "rows", "blocks32"}
    assert any("[8]" in s["what"] for s in data["skipped"])  # blocks < 16 are refused, with the reason
    assert {r["dtype"] for r in data["masked"]} == {"fp32"}


def _micro(kernel, backend, dtype, median_ms, pct, numel=6_738_415_616):
    return {"shape_set": "llama-7b", "numel": numel, "impl": "ours", "kernel": kernel, "backend": backend,
            "dtype": dtype, "median_ms": median_ms, "pct_copy_bw": pct}


def _e2e(impl, probe, median_ms, **kw):
    return {"model": "llama-7b", "layers": 32, "batch": 16, "seq": 256, "impl": impl, "probe": probe,
            "backend": "cuda", "median_ms": median_ms, **kw}


def test_targets_arithmetic_on_synthetic_gpu_results():
    gib = 2**30
    zo = dict(forward_ms=100.0, inference_peak_bytes=20 * gib, module_in_flight_bytes=gib // 4)
    data = {"micro": [_micro("perturb_", "cuda", "bf16", 9.0, 95.0),
                      _micro("zo_update_ restore+update", "cuda", "fp32", 20.0, 85.5),
                      _micro("zo_update_ q=16", "cuda", "bf16", 400.0, 2.0),
                      _micro("step sweeps in-place", "cuda", "bf16", 30.0, 90.0),
                      _micro("step sweeps drift-free", "cuda", "bf16", 33.0, 82.0)],
            "rng": [{"backend": "cuda", "elements_per_s": 2.0e11}],
            "e2e": [_e2e("mezo", "inplace", 360.0),
                    _e2e("ZOSGD", "inplace", 212.0, outside_share_pct=6.0, peak_bytes=20 * gib, **zo),
                    _e2e("ZOSGD", "hooks", 230.0, outside_share_pct=15.0, peak_bytes=21 * gib, **zo)]}
    t = {(x["target"], x["scope"].split(" (")[0]): x for x in report.evaluate_targets(data)}
    bw = t[("perturb_ bandwidth vs copy", "cuda bf16 llama-7b")]
    assert bw["pass"] is True and bw["margin"] == "passes by 5%"
    bw = t[("zo_update_ restore+update bandwidth vs copy", "cuda fp32 llama-7b")]
    assert bw["pass"] is False and bw["margin"] == "misses by 4.5%"
    q16 = t[("zo_update_ q=16 (compute bound, reported)", "cuda bf16 llama-7b")]
    assert q16["pass"] is None and "0.74x the RNG-only time" in q16["margin"]  # 400 ms / (16 * 6.74e9 / 2e11 s)
    df = t[("drift-free step sweeps within 5% of in-place", "micro cuda bf16 llama-7b")]
    assert df["pass"] is False and df["measured"] == pytest.approx(10.0)
    sp = t[("whole ZO step speedup over MeZO", "llama-7b ZOSGD probe=inplace [cuda]")]
    assert sp["pass"] is True and sp["measured"] == pytest.approx(360 / 212, abs=1e-3)
    assert t[("whole ZO step speedup over MeZO", "llama-7b ZOSGD probe=hooks [cuda]")]["pass"] is False
    assert t[("ZO step time outside the 2 forwards", "llama-7b ZOSGD probe=inplace [cuda]")]["pass"] is True
    assert t[("ZO step time outside the 2 forwards", "llama-7b ZOSGD probe=hooks [cuda]")]["pass"] is False
    mem = "ZO peak memory <= inference peak + params of modules in flight"
    assert t[(mem, "llama-7b ZOSGD probe=inplace [cuda]")]["pass"] is True
    hooks_mem = t[(mem, "llama-7b ZOSGD probe=hooks [cuda]")]
    assert hooks_mem["pass"] is False and hooks_mem["measured"] == pytest.approx(768.0)  # 1 GiB - 256 MiB
    assert t[("drift-free step within 5% of in-place", "llama-7b ZOSGD hooks vs inplace")]["pass"] is False


def test_script_entry_point_help():
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "run.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--only" in proc.stdout


@pytest.mark.gpu
def test_harness_gpu_quick(tmp_path):
    """The CUDA paths (events, peak memory, compiled foreach, GPU backends) on small sizes."""
    out = tmp_path / "gpu"
    rc = run.main(["--device", "cuda", "--quick", "--out", str(out), "--dtypes", "bf16", "--models", "none",
                   "--big-sizes", str(1 << 22), "--e2e-models", "opt-1.3b", "--scale", "0.05", "--e2e-batch", "2",
                   "--e2e-seq", "32", "--compile-dtypes", "bf16", "--repeats", "3"])
    assert rc == 0
    (stem,) = {os.path.splitext(f)[0] for f in os.listdir(out)}
    data = json.load(open(os.path.join(out, stem + ".json")))
    assert data["errors"] == [], data["errors"]
    assert data["meta"]["gpu_name"] and data["copy_bandwidth"]["gbps"] > 0
    impls = {(r["impl"], r["backend"]) for r in data["micro"]}
    assert ("mezo", "torch") in impls and ("foreach", "torch") in impls
    assert {b for i, b in impls if i == "ours"} & {"triton", "cuda"}, impls
    assert all(r["peak_bytes"] for r in data["memory"] if not r["oom"])
    masked = {(r["backend"], r["rule"]) for r in data["masked"]}
    assert ("triton", "rows") in masked and ("triton", "blocks16") in masked, masked


def _gpu_session(tmp_path, python: str, total: int, skip: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=python, ZK_TOTAL_S=str(total), ZK_SKIP=skip,
               ZK_SITE=str(tmp_path / "site"), PATH="/usr/bin:/bin")  # no nvidia-smi here
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    summary = (out / "summary.txt").read_text()
    assert summary in proc.stdout, proc.stdout + proc.stderr
    rows = {line.split(" | ")[0]: line for line in summary.splitlines() if " | " in line and not line.startswith(" ")}
    return proc, rows


def test_gpu_session_script_stages_and_outputs(tmp_path):
    """benchmarks/gpu_session.sh (the one-call H100 check) on CPU with the heavy stages skipped: every stage
    is listed with its result, a failing stage does not stop the next, the exit status counts the failed
    stages, and $OUT holds summary.txt and session.tgz with each stage's log."""
    import tarfile

    proc, rows = _gpu_session(tmp_path, sys.executable, 120, "build tests sanitizer bench")
    assert set(rows) == {"stage", "env", "wheels", "build", "report", "tests", "sanitizer", "bench", "table"}, rows
    assert rows["wheels"].startswith("wheels | rc 0")  # this venv imports every listed module: nothing to install
    assert "skipped (ZK_SKIP)" in rows["build"] and "skipped (ZK_SKIP)" in rows["bench"]
    assert "rc 0" not in rows["env"]  # nvidia-smi is missing: the stage fails ...
    assert rows["report"].startswith("report | rc 0") and rows["table"].startswith("table | rc 0")  # ... the rest runs
    assert proc.returncode == 1, proc.stdout
    with tarfile.open(tmp_path / "out" / "session.tgz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"env.log", "report.log", "table.log", "summary.txt"} <= names


STUB_PYTHON = """#!/bin/bash
# stands in for python3: records its arguments; `-m benchmarks` writes result files into --out
echo "$@" >> "$STUB_LOG"
if [[ " $* " == *" -m benchmarks "* ]]; then
  while [[ $# -gt 0 && $1 != --out ]]; do shift; done
  touch "$2/h100-x.json" "$2/h100-x.md" "$2/h100-x.png"
fi
"""


def test_gpu_session_budget_arithmetic(tmp_path, monkeypatch):
    """With a stub python: stage caps are clipped to the budget, the benchmark gets --time-budget = what is
    left minus a 50 s margin (and is not started under 60 s), and its result files come back in $OUT."""
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    monkeypatch.setenv("STUB_LOG", str(tmp_path / "calls.txt"))
    proc, rows = _gpu_session(tmp_path, str(stub), 200, "env build sanitizer")
    assert proc.returncode == 0, proc.stdout
    bench = [line for line in (tmp_path / "calls.txt").read_text().splitlines() if line.startswith("-m benchmarks ")]
    budget = int(bench[0].split("--time-budget ")[1].split()[0])
    assert 120 <= budget <= 130, bench  # 200 - 50 margin - 20 for the table (no sanitizer stage)
    assert {"h100-x.json", "h100-x.md", "h100-x.png"} <= set(os.listdir(tmp_path / "out"))
    assert "of cap 60 s" in rows["report"] and "of cap 170 s" in rows["tests"]

    proc, rows = _gpu_session(tmp_path / "short", str(stub), 40, "env build sanitizer")
    cap = int(rows["report"].split("of cap ")[1].split()[0])
    assert 22 <= cap <= 25, rows  # 40 s budget - 15 s reserve - the seconds the stages before it took (a loaded CI)
    assert rows["bench"].startswith("bench | not run") and proc.returncode == 1, rows
    (tmp_path / "calls.txt").unlink()
    proc, rows = _gpu_session(tmp_path / "with-sanitizer", str(stub), 300, "env build")  # 90 s more kept back
    bench = [line for line in (tmp_path / "calls.txt").read_text().splitlines() if line.startswith("-m benchmarks ")]
    assert 130 <= int(bench[0].split("--time-budget ")[1].split()[0]) <= 140, bench
