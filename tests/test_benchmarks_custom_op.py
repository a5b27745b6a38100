"""CPU smoke test of benchmarks/custom_op.py (issue #13): a tiny run (seconds; torch.compile with the
aot_eager backend, no C++ build) writes complete JSON + Markdown with positive timings, consistent derived
numbers, and the compile facts the report relies on (the custom op compiles without graph breaks and matches
eager; an opaque call breaks the graph)."""
from __future__ import annotations

import json
import os

import pytest

from benchmarks import custom_op as CO

pytestmark = pytest.mark.usefixtures("one_thread")


def test_custom_op_benchmark_tiny(tmp_path):
    out = str(tmp_path / "co")
    rc = CO.main(["--out", out, "--tensor-counts", "1,8", "--calls", "10", "--blocks", "5", "--sizes", "64K,256K",
                  "--repeats", "5", "--case-seconds", "0.2", "--compile-backend", "aot_eager", "--threads", "1"])
    data = json.load(open(os.path.join(out, "custom_op.json")))
    assert data["errors"] == [], data["errors"]
    assert rc == 0

    rows = {(r["body"], r["n_tensors"], r["route"]): r for r in data["dispatch"]}
    assert set(rows) == {(b, n, r) for b in CO.BODIES for n in (1, 8) for r in CO.ROUTES}
    for key, r in rows.items():
        assert r["us_per_call"] > 0 and r["p10_us"] <= r["us_per_call"] <= r["p90_us"], key
        assert r["blocks"] == 5 and r["calls_per_block"] == 10
        direct = rows[(key[0], key[1], "direct")]["us_per_call"]
        assert r["overhead_us"] == pytest.approx(r["us_per_call"] - direct)
    for n in (1, 8):   # going through the dispatcher costs more than a plain Python call
        assert rows[("noop", n, "custom_op")]["overhead_us"] > 0
        assert rows[("noop", n, "library")]["overhead_us"] > 0
    assert rows[("noop", 1, "custom_op")]["bumps_version_counter"] is True
    assert rows[("noop", 1, "direct")]["bumps_version_counter"] is False
    assert {(f["route"], f["body"]) for f in data["overhead_fit"]} == {(r, b) for r in CO.ROUTES[1:] for b in CO.BODIES}
    assert data["custom_op_profile"]["top_own_time"]

    passes = data["pass"]
    assert [(p["dtype"], p["numel"]) for p in passes] == [("fp32", 65536), ("fp32", 262144), ("bf16", 262144)]
    for p in passes:
        assert p["median_ms"] > 0 and p["gbps"] > 0
        assert p["gbps"] == pytest.approx(p["bytes_moved"] / (p["median_ms"] * 1e-3) / 1e9)
    p1b = {(p["target"], p["dtype"]): p for p in data["pass_1b"]}
    assert p1b[("H100 SXM", "fp32")]["pass_ms"] == pytest.approx(8e9 / 3.35e12 * 1e3)
    assert p1b[("H100 SXM", "bf16")]["pass_ms"] == pytest.approx(4e9 / 3.35e12 * 1e3)
    assert "published" in p1b[("H100 SXM", "fp32")]["source"]
    cpu = p1b[("this CPU", "fp32")]
    assert cpu["pass_ms"] > 0 and cpu["bandwidth_gbps"] == passes[1]["gbps"]   # the largest fp32 size
    assert len(data["overhead_share"]) == 2 * 2 * 4   # routes x counts x (target, dtype)
    for s in data["overhead_share"]:
        assert s["overhead_pct_of_pass"] == pytest.approx(100 * s["overhead_us"] * 1e-3 / s["pass_ms"])
        assert s["overhead_pct_of_pass"] > 0

    cases = data["compile"]["cases"]
    for route in ("custom_op", "library"):
        c = cases[route]
        assert c["ok"] and c["fullgraph_ok"] and c["graph_count"] == 1 and c["graph_break_count"] == 0, c
    opaque = cases["opaque (torch.compiler.disable)"]
    assert opaque["ok"] and not opaque["fullgraph_ok"] and opaque["graph_break_count"] >= 1, opaque

    v = data["verdict"]
    assert v["custom_op"]["n_tensors"] == 8 and v["custom_op"]["h100_bf16_pct"] > 0
    assert isinstance(v["custom_op"]["adopt"], bool)
    md = open(os.path.join(out, "custom_op.md")).read()
    for heading in ("### Dispatch", "### One pass over 1B parameters", "### torch.compile", "### Verdict"):
        assert heading in md
