"""The pruning part of the benchmarks (benchmarks/prune.py): on CPU `--only prune` records its skip and nothing
else; the pruning-time cases run end to end on a tiny Llama (CPU) and give complete rows; the 128 x 2048
projection is the docstring's formula; the Markdown renders both tables. GPU: the 2:4 matmul rows and the
pruning-time rows on small sizes. No speed thresholds."""
from __future__ import annotations

import glob
import json
import math
import os

import pytest

from benchmarks import prune as BP
from benchmarks import report, run
from benchmarks.record import Results

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(out: str) -> tuple[dict, str]:
    (path,) = glob.glob(os.path.join(out, "*.json"))
    with open(path) as f:
        return json.load(f), path[:-5]


def test_only_prune_on_cpu_records_the_skip(tmp_path):
    out = str(tmp_path / "p")
    assert run.main(["--device", "cpu", "--only", "prune", "--out", out, "--threads", "1"]) == 0
    data, stem = _load(out)
    assert data["errors"] == [] and data["prune"] == []
    assert [s["what"] for s in data["skipped"]] == ["prune (2:4 semi-structured matmuls, pruning time)"]
    assert "need a CUDA GPU" in data["skipped"][0]["reason"]
    assert data["micro"] == [] and data["e2e"] == [] and "quant" not in data   # no other part ran
    with open(stem + ".md") as f:
        assert "on CPU the pruned linears stay dense" in f.read()


def _cfg(*argv: str):
    return run.build_config(run.parse_args(["--device", "cpu", "--quick", *argv]))


def test_prune_time_cases_on_a_tiny_llama():
    pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = _cfg("--prune-layers", "2", "--prune-samples", "3", "--prune-seq", "16")
    res = Results({}, {})
    res.data["prune"] = []
    BP.run_prune_time(cfg, res, tiny=True)
    assert res.data["errors"] == [] and res.data["skipped"] == []
    rows = {r["case"]: r for r in res.data["prune"]}
    assert list(rows) == ["magnitude", "wanda++ + RO", "wanda++", "wanda"]
    for r in rows.values():
        assert r["layers"] == 2 and len(r["block_s"]) == 2 and r["samples"] == 3 and r["seq"] == 16
        assert r["overall_sparsity"] == pytest.approx(0.5) and r["pattern"] == "2:4"
        assert r["wall_s"] >= sum(r["block_s"]) and r["per_block_s"] > 0 and r["peak_bytes"] is None
        assert math.isfinite(r["est_paper_s"]) and r["est_paper_s"] >= r["per_block_s"]
        assert r["est_32_blocks_s"] == pytest.approx(r["capture_s"] + 32 * r["per_block_s"])
    assert rows["wanda++ + RO"]["regional_opt"] and rows["wanda++ + RO"]["ro_per_block_s"] > 0
    assert rows["wanda"]["ro_per_block_s"] == 0
    md = report.to_markdown({"meta": {}, "prune": res.data["prune"]})
    assert "## Pruning: 2:4 semi-structured matmuls and pruning time" in md and "| wanda++ + RO |" in md


def test_projection_formula_and_markdown():
    rows = [{"kind": "prune_time", "case": "magnitude", "method": "magnitude", "samples": 8, "seq": 512,
             "per_block_s": 1.0, "ro_per_block_s": 0.0, "capture_s": 0.1},
            {"kind": "prune_time", "case": "wanda++ + RO", "method": "wanda++", "samples": 8, "seq": 512,
             "per_block_s": 3.0, "ro_per_block_s": 1.0, "capture_s": 0.5}]
    BP.add_projections(rows)
    # T = 128 * 2048 / (8 * 512) = 64, T_ro = 32 * 2048 / (8 * 512) = 16; fixed 1, calibration 3 - 1 - 1 = 1
    assert rows[0]["est_paper_s"] == pytest.approx(32 * 1.0)
    assert rows[1]["est_paper_s"] == pytest.approx(0.5 * 64 + 32 * (1 + 1 * 64 + 1 * 16))
    assert "128 x 2048" in rows[1]["est_paper_note"] and "10 min" in rows[1]["paper_claim"]
    common = {"layers": 4, "hidden": 4096, "pattern": "2:4", "wall_s": 9.0, "build_s": 1.0, "est_32_blocks_s": 96.0,
              "overall_sparsity": 0.5, "peak_bytes": 2**31}
    rows = [{**r, **common} for r in rows]
    mm = {"kind": "matmul", "shape": "gate/up_proj", "M": 4096, "N": 11008, "K": 4096, "dtype": "bf16",
          "impl": "2:4 cusparselt", "median_ms": 0.5, "p10_ms": 0.4, "p90_ms": 0.6, "tflops": 740.0,
          "speedup": 1.4, "max_rel_err": 1e-3, "convert_ms": 2.0}
    md = "\n".join(BP.prune_markdown([mm, *rows], report._table))
    assert "| gate/up_proj | 4096x11008x4096 | bf16 | 2:4 cusparselt |" in md
    assert "| wanda++ + RO | 9 | 1 | 0.5 | 3 | 1 | 96 | 2.62e+03 | 0.5 | 2 |" in md


@pytest.mark.gpu
def test_prune_part_on_gpu_small():
    """The CUDA paths on small sizes: 2:4 matmul rows (cuSPARSELt, and CUTLASS where it runs) and the pruning-time
    cases on a tiny Llama."""
    cfg = run.build_config(run.parse_args(["--device", "cuda", "--quick", "--repeats", "3"]))
    res = Results({}, {})
    res.data["prune"] = []
    for dname, dtype in BP.MATMUL_DTYPES:
        BP.matmul_shape(cfg, res, "small", 256, 512, 1024, dname, dtype)
    assert res.data["errors"] == [], res.data["errors"]
    rows = res.data["prune"]
    impls = {(r["dtype"], r["impl"]) for r in rows}
    assert {("bf16", "dense (cuBLAS, zeros kept)"), ("fp16", "dense (cuBLAS, zeros kept)")} <= impls
    sparse = [r for r in rows if r["impl"].startswith("2:4")]
    skipped = [s for s in res.data["skipped"] if "2:4" in s["what"]]
    assert len(sparse) + len(skipped) == 4 and sparse, (rows, skipped)
    for r in sparse:
        assert r["max_rel_err"] < 2e-2 and r["speedup"] > 0 and r["convert_ms"] > 0
    pytest.importorskip("transformers", reason="transformers is not installed")
    cfg.prune_layers, cfg.prune_samples, cfg.prune_seq = 1, 2, 32
    BP.run_prune_time(cfg, res, tiny=True)
    assert res.data["errors"] == [], res.data["errors"]
    times = [r for r in res.data["prune"] if r["kind"] == "prune_time"]
    assert len(times) == 4 and all(r["peak_bytes"] for r in times)
