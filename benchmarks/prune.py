"""Pruning on a GPU (issue "Pruning: Wanda and Wanda++ ..."): 2:4 semi-structured sparse matmuls against dense
ones, and the wall time of zokernels.prune.prune on a LLaMA-7B-shaped model. CUDA only: on CPU the part records
that it skipped, with the reason (the pruned linears stay dense there).

Matmuls, at the LLaMA-7B linear shapes (N x K = q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008) and
M = prune_tokens tokens (16 x 256), bf16 and fp16: y = F.linear(x [M, K], W [N, K]) with W pruned 2:4 by magnitude,

    dense                 cuBLAS on the pruned weight with its zeros (what a pruned model runs without this)
    2:4 cusparselt        the SparseSemiStructuredTensor weight (zokernels.prune.to_semi_structured), cuSPARSELt
    2:4 cutlass           the same through torch's CUTLASS kernels (compute capability 8.x only: skipped on Hopper)

TFLOP/s = 2 M N K / median time (the dense count, also for the sparse rows, which do half the multiply-adds);
speedup = dense median / sparse median; err = max |y_sparse - y_dense| / max |y_dense|; convert ms = one
compression of the weight (from_dense), timed once.

Pruning time: a random-init LLaMA-7B-shaped model (LlamaConfig hidden 4096, intermediate 11008, 32 heads, bf16,
prune_layers decoder layers: 4, --quick 1; 32 in the real model), calibration prune_samples random sequences of
prune_seq tokens (8 x 512, --quick 4 x 256; in batches of 4), pattern 2:4, methods magnitude, wanda++ with regional
optimization (RO: 5 rounds, up to 32 sequences), wanda++ (regional gradients only) and wanda; wall time of prune()
(synchronized), per block (report.blocks), peak GPU memory. The part stops starting cases after prune_seconds
(90 s, --quick 30 s) or when the run's --time-budget is used up, and skips a case the time left could not hold at
the last case's pace. Projections (estimates, labelled so):

    32 blocks, this calibration   capture + 32 x median seconds per block
    32 blocks, 128 x 2048 tokens  capture x T + 32 x (fixed + (block - fixed - ro) x T + ro x T_ro), with
                                  T = 128 x 2048 / (n x seq), T_ro = min(32, 128) x 2048 / (min(32, n) x seq),
                                  fixed = magnitude's median per block (scores and masks: no calibration), ro = the
                                  median RO seconds per block, n x seq = this calibration: the calibration passes are
                                  linear in tokens (attention's quadratic share, ~8% of a 7B block at 2048, ignored)
The paper (Wanda++, arXiv 2503.04992) prunes LLaMA-7B in under 10 minutes on one H100 with 128 x 2048 tokens.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from zokernels.prune import keep_mask, prune
from zokernels.prune import semistructured as SS

from .config import Config
from .record import Results
from .timing import peak_bytes, peak_reset, sync, time_adaptive

LLAMA_LINEARS = (("q/k/v/o_proj", 4096, 4096), ("gate/up_proj", 11008, 4096), ("down_proj", 4096, 11008))
MATMUL_DTYPES = (("bf16", torch.bfloat16), ("fp16", torch.float16))
SPARSE_BACKENDS = ("cusparselt", "cutlass")
PATTERN = "2:4"
CASES = (("magnitude", False), ("wanda++", True), ("wanda++", False), ("wanda", False))  # magnitude: the fixed cost
CALIB_BATCH = 4
RO_SAMPLES = 32
PAPER = {"blocks": 32, "samples": 128, "seq": 2048, "seconds": 600.0,
         "claim": "< 10 min for LLaMA-7B on one H100, 128 x 2048 calibration tokens (Wanda++)"}


def prune_sizes(cfg: Config) -> tuple[int, int, int]:
    """(decoder layers, calibration sequences, tokens per sequence): CLI values, else 4 x (8 x 512), --quick
    1 x (4 x 256)."""
    return (cfg.prune_layers or (1 if cfg.quick else 4), cfg.prune_samples or (4 if cfg.quick else 8),
            cfg.prune_seq or (256 if cfg.quick else 512))


def prune_cap(cfg: Config) -> float:
    """The part's own time cap in seconds: --prune-seconds, else 90 (--quick 30)."""
    return cfg.prune_seconds if cfg.prune_seconds is not None else (30.0 if cfg.quick else 90.0)


def run_prune(cfg: Config, res: Results) -> None:
    """The part: the 2:4 matmuls, then the pruning-time cases (records "prune"); on CPU only its skip."""
    res.data.setdefault("prune", [])
    if cfg.device.type != "cuda":
        res.skip("prune (2:4 semi-structured matmuls, pruning time)", f"GPU part: {SS.CPU_MESSAGE}")
        return
    deadline = time.monotonic() + prune_cap(cfg)
    for part, fn in (("matmuls", run_matmuls), ("pruning time", run_prune_time)):
        if _left(cfg, deadline) <= 0:
            res.skip(f"prune {part}", _budget_reason(cfg))
            continue
        try:
            fn(cfg, res, deadline)
        except Exception as e:  # noqa: BLE001 — one part failing must not end the run
            res.error(f"prune {part}", e)
        peak_reset(cfg.device)
        res.checkpoint()


def _left(cfg: Config, deadline: float | None) -> float:
    """Seconds left: the run's --time-budget, and this part's own prune_seconds."""
    left = cfg.seconds_left()
    return left if deadline is None else min(left, deadline - time.monotonic())


def _budget_reason(cfg: Config) -> str:
    return f"time used up (--time-budget {cfg.time_budget_s:.0f} s, or this part's {prune_cap(cfg):.0f} s)"


# ----------------------------------------------------------------------------- matmuls
def run_matmuls(cfg: Config, res: Results, deadline: float | None = None) -> None:
    """Every LLaMA-7B linear shape in bf16 and fp16 (matmul_shape)."""
    dev = cfg.device
    for dname, dtype in MATMUL_DTYPES:
        for name, n, k in LLAMA_LINEARS:
            what = f"prune matmul {name} {dname}"
            if _left(cfg, deadline) <= 0:
                res.skip(what, _budget_reason(cfg))
                continue
            try:
                matmul_shape(cfg, res, name, cfg.prune_tokens, n, k, dname, dtype, deadline)
            except Exception as e:  # noqa: BLE001
                res.error(what, e)
            peak_reset(dev)
            res.checkpoint()


def matmul_shape(cfg: Config, res: Results, name: str, m: int, n: int, k: int, dname: str,
                 dtype: torch.dtype, deadline: float | None = None) -> None:
    """Dense F.linear on a 2:4-pruned W [n, k], then each sparse backend that can run here (skipped with the reason
    otherwise) on the same x [m, k] and W."""
    dev = cfg.device
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=gen).to(dtype)
    w = torch.randn(n, k, device=dev, generator=gen) * 0.02
    w = (w * keep_mask(w.abs(), 0.5, PATTERN)).to(dtype)
    flops = 2 * m * n * k
    base = {"kind": "matmul", "shape": name, "M": m, "N": n, "K": k, "flops": flops, "dtype": dname,
            "pattern": PATTERN}
    case_s = min(cfg.case_seconds, 0.5)
    y_dense = F.linear(x, w)
    t = time_adaptive(lambda: F.linear(x, w), dev, cfg.warmup, cfg.repeats, case_s)
    dense_ms = t.median_ms
    res.add("prune", {**base, "impl": "dense (cuBLAS, zeros kept)", **t.as_dict(),
                      "tflops": flops / (t.median_ms * 1e-3) / 1e12, "speedup": 1.0})
    for backend in SPARSE_BACKENDS:
        what = f"prune matmul {name} {dname} 2:4 {backend}"
        why = SS.backend_problem(dev, backend) or SS.layer_problem(w, backend)
        if why:
            res.skip(what, why)
            continue
        if _left(cfg, deadline) <= 0:
            res.skip(what, _budget_reason(cfg))
            continue
        try:
            sync(dev)
            t0 = time.perf_counter()
            ws = SS.semi_structured(w, backend)
            sync(dev)
            convert_ms = (time.perf_counter() - t0) * 1e3
            y = F.linear(x, ws)
            err = float((y.float() - y_dense.float()).abs().max() / y_dense.float().abs().max())
            t = time_adaptive(lambda ws=ws: F.linear(x, ws), dev, cfg.warmup, cfg.repeats, case_s)
        except Exception as e:  # noqa: BLE001 — a backend failing is a result, not the end of the run
            res.error(what, e)
            continue
        res.add("prune", {**base, "impl": f"2:4 {backend}", **t.as_dict(),
                          "tflops": flops / (t.median_ms * 1e-3) / 1e12, "speedup": dense_ms / t.median_ms,
                          "max_rel_err": err, "convert_ms": convert_ms})


# ----------------------------------------------------------------------------- pruning time
def llama_config(layers: int, tiny: bool = False):
    """LLaMA-7B's shapes (hidden 4096, MLP 11008, 32 heads) with `layers` decoder layers; `tiny`: a CPU-test size."""
    from transformers import LlamaConfig
    if tiny:
        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                       rms_norm_eps=1e-6, tie_word_embeddings=False)


def build_model(conf, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A random-init LlamaForCausalLM of `conf`, made directly on `device` in `dtype` (same seed: same weights)."""
    from transformers import LlamaForCausalLM
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(conf)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def calibration(conf, device: torch.device, samples: int, seq: int) -> list[dict]:
    """`samples` random sequences of `seq` tokens, as prune() takes them: batches {"input_ids": [<= 4, seq]}."""
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, conf.vocab_size, (samples, seq), device=device, generator=gen)
    return [{"input_ids": ids[i:i + CALIB_BATCH]} for i in range(0, samples, CALIB_BATCH)]


def run_prune_time(cfg: Config, res: Results, deadline: float | None = None, tiny: bool = False) -> None:
    """The pruning-time cases (CASES) on a fresh model each (same seed), then the projections."""
    dev = cfg.device
    layers, samples, seq = prune_sizes(cfg)
    conf = llama_config(layers, tiny)
    batches = calibration(conf, dev, samples, seq)
    last_s = 0.0
    for method, ro in CASES:
        label = f"{method}{' + RO' if ro else ''}"
        what = f"prune time {label}"
        if _left(cfg, deadline) <= last_s:
            res.skip(what, _budget_reason(cfg) + f"; the last case took {last_s:.0f} s")
            continue
        model = None
        t_case = time.perf_counter()
        try:
            peak_reset(dev)
            t0 = time.perf_counter()
            model = build_model(conf, dev)
            sync(dev)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = prune(model, None if method == "magnitude" else batches, method, pattern=PATTERN,
                           regional_opt=ro, ro_samples=RO_SAMPLES, progress=False)
            sync(dev)
            wall = time.perf_counter() - t0
            res.add("prune", prune_row(report, wall, conf, samples, seq, label, build_s, peak_bytes(dev)))
        except Exception as e:  # noqa: BLE001
            res.error(what, e)
        del model
        peak_reset(dev)
        last_s = time.perf_counter() - t_case
        res.checkpoint()
    add_projections(res.data["prune"])


def prune_row(report, wall: float, conf, samples: int, seq: int, label: str, build_s: float,
              peak: int | None) -> dict:
    """One pruning-time record from prune()'s report and the synchronized wall time."""
    blocks = [b["seconds"] for b in report.blocks]
    per_block = statistics.median(blocks)
    capture = max(0.0, wall - sum(blocks))
    return {"kind": "prune_time", "case": label, "method": report.method, "regional_opt": report.regional_opt,
            "pattern": report.pattern, "layers": conf.num_hidden_layers, "hidden": conf.hidden_size,
            "samples": samples, "seq": seq, "build_s": build_s, "wall_s": wall, "capture_s": capture,
            "block_s": blocks, "per_block_s": per_block,
            "ro_per_block_s": statistics.median(b.get("ro_seconds", 0.0) for b in report.blocks),
            "est_32_blocks_s": capture + PAPER["blocks"] * per_block,
            "overall_sparsity": report.overall_sparsity, "peak_bytes": peak}


def add_projections(rows: list[dict]) -> None:
    """est_paper_s on every pruning-time row (the module docstring's formula; magnitude gives the fixed cost)."""
    times = [r for r in rows if r.get("kind") == "prune_time"]
    mag = next((r for r in times if r["method"] == "magnitude"), None)
    for r in times:
        tokens = max(r["samples"] * r["seq"], 1)
        scale = PAPER["samples"] * PAPER["seq"] / tokens
        scale_ro = min(RO_SAMPLES, PAPER["samples"]) * PAPER["seq"] / (min(RO_SAMPLES, max(r["samples"], 1))
                                                                       * r["seq"])
        if r["method"] == "magnitude":
            per = r["per_block_s"]
        else:
            fixed = min(mag["per_block_s"] if mag else 0.0, r["per_block_s"] - r["ro_per_block_s"])
            calib = r["per_block_s"] - r["ro_per_block_s"] - fixed
            per = fixed + calib * scale + r["ro_per_block_s"] * scale_ro
        r.update(est_paper_s=(0.0 if r["method"] == "magnitude" else r["capture_s"] * scale) + PAPER["blocks"] * per,
                 est_paper_note=f"{PAPER['blocks']} blocks, {PAPER['samples']} x {PAPER['seq']} tokens: linear "
                                f"in tokens from {r['samples']} x {r['seq']} (an estimate, not measured)"
                                + ("" if mag else "; no magnitude row: all of a block's time scaled"),
                 paper_claim=PAPER["claim"])


# ----------------------------------------------------------------------------- markdown
def prune_markdown(rows: list[dict], table) -> list[str]:
    """The pruning section of the result Markdown (`table` = report._table)."""
    out = ["## Pruning: 2:4 semi-structured matmuls and pruning time", ""]
    mm = [r for r in rows if r.get("kind") == "matmul"]
    if mm:
        out += ["y = F.linear(x, W), W pruned 2:4. TFLOP/s = 2MNK / median time (dense count for every row); "
                "speedup = dense median / this median; err = max |y - y_dense| / max |y_dense|.", "",
                table(["shape", "M x N x K", "dtype", "impl", "median ms", "p10", "p90", "TFLOP/s", "speedup",
                       "err", "convert ms"],
                      [[r["shape"], f"{r['M']}x{r['N']}x{r['K']}", r["dtype"], r["impl"], r["median_ms"],
                        r["p10_ms"], r["p90_ms"], r["tflops"], r["speedup"], r.get("max_rel_err"),
                        r.get("convert_ms")] for r in mm]), ""]
    times = [r for r in rows if r.get("kind") == "prune_time"]
    if times:
        r0 = times[0]
        out += [f"prune() on a random-init LLaMA-7B-shaped model ({r0['layers']} of 32 layers, hidden "
                f"{r0['hidden']}, bf16), pattern {r0['pattern']}, calibration {r0['samples']} x {r0['seq']} tokens. "
                f"Estimates (benchmarks/prune.py): 32 blocks = capture + 32 x median per block; the 128 x 2048 "
                f"column = {times[0].get('est_paper_note', '')}. Paper: {PAPER['claim']}.", "",
                table(["method", "wall s", "build s", "capture s", "per block s", "RO per block s",
                       "est. 32 blocks s", "est. 32 blocks, 128 x 2048 s", "sparsity", "peak GiB"],
                      [[r["case"], r["wall_s"], r["build_s"], r["capture_s"], r["per_block_s"], r["ro_per_block_s"],
                        r["est_32_blocks_s"], r.get("est_paper_s"), r["overall_sparsity"],
                        None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30] for r in times]), ""]
    return out
