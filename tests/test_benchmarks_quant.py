"""CPU smoke test of the quantized section of the benchmarks (benchmarks/quant.py): the harness runs it
and records complete rows (Triton rows skipped with the reason on CPU), the QLoRA-style baseline's
backward is the true gradient, and the memory ratios are computed from the rows. No thresholds."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from benchmarks import quant as BQ
from benchmarks import run
from benchmarks.record import Results
from zokernels import quant

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(out) -> dict:
    (path,) = glob.glob(os.path.join(out, "*.json"))
    return json.load(open(path)), path[:-5]


def test_quant_harness_cpu_quick(tmp_path):
    out = str(tmp_path / "quant")
    rc = run.main(["--device", "cpu", "--quick", "--out", out, "--threads", "1", "--only", "quant", "--repeats", "1",
                   "--quant-formats", "int8,int4"])
    assert rc == 0
    data, stem = _load(out)
    assert data["errors"] == [], data["errors"]
    rows = data["quant"]
    mm = {(r["shape"], r["impl"]) for r in rows if r["kind"] == "matmul"}
    for shape, _, _ in BQ.LLAMA_LINEARS:
        for impl in ("bf16 torch.matmul", "W8A8 torch._int_mm", "FP8 torch._scaled_mm",
                     "W4A16 torch (dequant + bf16 matmul)", "QuantLinear int8 matmul=w8a8 -> w8a8",
                     "QuantLinear int4 matmul=w4a16 -> w4a16", "QuantLinear fp8 matmul=fp8 -> fp8"):
            assert (shape, impl) in mm, (shape, impl)
    for r in rows:
        if r["kind"] == "matmul":
            assert r["median_ms"] > 0 and r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
            assert r["flops"] == 2 * r["M"] * r["N"] * r["K"]
            assert 0 < r["max_rel_err"] < 0.02, r   # quantized operands: only the output rounding remains
    triton_skips = [s for s in data["skipped"] if "triton" in s["what"]]
    assert len(triton_skips) == 12 and all("interpreter" in s["reason"] for s in triton_skips)
    mem = {(r["format"], r["what"]) for r in rows if r["kind"] == "memory"}
    assert ("bf16", "ZO step (ZOSGD, bf16)") in mem and ("bf16", "inference forward") in mem
    for fmt in ("int8", "int4"):
        assert (fmt, f"QuZO step ({fmt})") in mem and (fmt, "inference forward") in mem
        assert any(f == fmt and w.startswith("QLoRA-style first-order step") for f, w in mem)
    assert all(r["peak_bytes"] is None for r in rows if r["kind"] == "memory")   # CPU: no peak memory
    md = open(stem + ".md").read()
    assert "## Quantized matmuls and QuZO memory" in md and "QuZO step (int4)" in md


def test_qlora_baseline_backward_is_the_gradient():
    """The frozen quantized base's custom backward (weight re-dequantized) == autograd through x W^T."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))
    quant.quantize_model(model, "int4", exclude=(), group_size=32)
    adapters = BQ.add_lora(model, rank=4, dtype=torch.float32)
    assert len(adapters) == 4 and all(isinstance(m, BQ.QLoRALinear) for m in (model[0], model[2]))
    for p in adapters:
        torch.nn.init.normal_(p, std=0.1)   # B = 0 at init would make half the gradients trivially 0
    x = torch.randn(5, 40, requires_grad=True)
    loss = model(x).square().sum()
    loss.backward()
    got = [p.grad.clone() for p in adapters] + [x.grad.clone()]

    def plain(layer, h):   # the same function with the dequantized weight as an ordinary tensor
        w = quant.dequantize(layer.base.qw)
        return h @ w.t() + layer.base.bias + (h @ layer.lora_a.t() @ layer.lora_b.t()) * layer.scaling

    for p in adapters:
        p.grad = None
    x2 = x.detach().clone().requires_grad_(True)
    ref = plain(model[2], torch.nn.functional.gelu(plain(model[0], x2))).square().sum()
    ref.backward()
    want = [p.grad for p in adapters] + [x2.grad]
    torch.testing.assert_close(loss, ref)
    for g, w in zip(got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_memory_ratio_rows():
    res = Results({}, {})
    res.data["quant"] = [
        {"kind": "memory", "format": "bf16", "what": "ZO step (ZOSGD, bf16)", "peak_bytes": 16e9, "oom": False},
        {"kind": "memory", "format": "int8", "what": "QuZO step (int8)", "peak_bytes": 8e9, "oom": False},
        {"kind": "memory", "format": "int8", "what": "QLoRA-style first-order step (int8 base)", "peak_bytes": 30e9,
         "oom": False},
        {"kind": "memory", "format": "int4", "what": "QuZO step (int4)", "peak_bytes": 4e9, "oom": False},
        {"kind": "memory", "format": "int4", "what": "QLoRA-style first-order step (int4 base)", "peak_bytes": None,
         "oom": True}]
    BQ._ratios(res)
    ratios = {r["format"]: r for r in res.data["quant"] if r["kind"] == "memory_ratio"}
    assert ratios["int8"]["first_order_over_quzo"] == pytest.approx(3.75)
    assert ratios["int8"]["bf16_zo_over_quzo"] == pytest.approx(2.0)
    assert ratios["int4"]["first_order_over_quzo"] is None and ratios["int4"]["bf16_zo_over_quzo"] == 4.0
    assert "fp8" not in ratios


@pytest.mark.gpu
def test_quant_harness_gpu_quick(tmp_path):
    """The CUDA paths (Triton kernels, _int_mm / _scaled_mm, peak memory) on a 1-layer memory model."""
    out = str(tmp_path / "gpu")
    rc = run.main(["--device", "cuda", "--quick", "--out", out, "--only", "quant", "--quant-layers", "1",
                   "--repeats", "3"])
    assert rc == 0
    data, _ = _load(out)
    assert data["errors"] == [], data["errors"]
    impls = {r["impl"] for r in data["quant"] if r["kind"] == "matmul"}
    assert {"W8A8 triton", "W4A16 triton", "bf16 torch.matmul"} <= impls, impls
    assert all(r["peak_bytes"] for r in data["quant"] if r["kind"] == "memory" and not r["oom"])
    assert any(r["kind"] == "memory_ratio" for r in data["quant"])
