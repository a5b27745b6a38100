"""Quantized matmuls (QuZO's forward) and the memory of a QuZO step (issue #6 benchmarks).

Matmuls, at the LLaMA-7B linear shapes (N x K = q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008)
and M = quant_tokens tokens (16 x 256), FLOPs = 2 M N K, TFLOP/s = FLOPs / median time:

    bf16 torch.matmul                  x bf16 @ W bf16^T (cuBLAS), the unquantized baseline
    W8A8   triton / torch._int_mm      int8 x int8 -> int32, dequant + bias epilogue (torch: epilogue in torch)
    FP8    triton / torch._scaled_mm   e4m3 x e4m3 -> fp32 (torch: unit scales, fp32 out, epilogue in torch);
                                       triton fast-accum: no float32 promotion of the sm_90 fp8 sums
           torch._scaled_mm rowwise    cuBLAS with the per-token / per-channel scales fused, bf16 out
    W4A16  triton / torch              bf16 x int4 (group 128) unpacked in the mainloop; torch: dequantize
                                       the whole weight to bf16, then cuBLAS
"kernel" rows take quantized activations as given; "layer" rows are QuantLinear.forward (activation
quantization included). Every row carries its max error relative to the float64 product of the same
quantized operands (a sanity check, not a target).

Memory (the paper's claim: QuZO needs 2.94x-5.47x less memory than quantized first-order training on
LLaMA-7B): a LLaMA-7B-shaped model (random init, quant_layers decoder layers, bf16 embeddings / norms /
lm_head), batch quant_batch x quant_seq, torch.cuda.max_memory_allocated over warmup + timed steps of

    bf16 ZO step          ZOSGD on the bf16 model
    QuZO int8/int4/fp8    zokernels.QuZO on quantize_model(fmt, matmul="auto") (W8A8 / W4A16 / FP8 forwards)
    QLoRA-style step      first order on the same quantized model: frozen quantized base (forward through
                          its quantized matmul, backward re-dequantizes the weight to bf16, as bitsandbytes
                          does), LoRA adapters (rank quant_lora_rank, on every quantized linear) trained by
                          AdamW; activations saved for the backward
plus one inference forward of each model. Ratio rows: QLoRA-style peak / QuZO peak per format.

On CPU the same code runs on tiny shapes (a smoke run: no Triton, no peak memory; the numbers mean nothing).
"""
from __future__ import annotations

import torch

from zokernels import quant
from zokernels.backends import registry
from zokernels.backends.triton import quant_matmul as T
from zokernels.quant import matmul as MM

from .config import Config
from .record import Results
from .timing import peak_bytes, peak_reset, time_adaptive

LLAMA_LINEARS = (("q/k/v/o_proj", 4096, 4096), ("gate/up_proj", 11008, 4096), ("down_proj", 4096, 11008))
INT4_GROUP = 128
FORMATS = ("int8", "int4", "fp8")


def run_quant(cfg: Config, res: Results) -> None:
    res.data.setdefault("quant", [])
    for part, fn in (("matmuls", run_matmuls), ("memory", run_memory)):
        if cfg.seconds_left() <= 0:
            res.skip(f"quant {part}", f"time budget of {cfg.time_budget_s:.0f} s used up (--time-budget)")
            continue
        try:
            fn(cfg, res)
        except Exception as e:  # noqa: BLE001 — one part failing must not end the run
            res.error(f"quant {part}", e)
        peak_reset(cfg.device)
        res.checkpoint()


# ----------------------------------------------------------------------------- matmuls
def matmul_shapes(cfg: Config) -> list[tuple[str, int, int, int]]:
    """(name, M, N, K): the LLaMA-7B linears at quant_tokens tokens, widths divided by width_div on CPU."""
    div = 1 if cfg.device.type == "cuda" else max(cfg.width_div, 1)
    return [(name, max(16, cfg.quant_tokens // div), max(16, n // div), max(16, k // div))
            for name, n, k in LLAMA_LINEARS]


def _triton_skip(kind: str, dev: torch.device) -> str | None:
    if dev.type == "cpu":
        return "Triton on CPU runs in the interpreter, a correctness tool: not benchmarked"
    return registry.why_not(f"{kind}_matmul", "triton", dev)


def run_matmuls(cfg: Config, res: Results) -> None:
    dev = cfg.device
    for name, m, n, k in matmul_shapes(cfg):
        if cfg.seconds_left() <= 0:
            res.skip(f"quant matmul {name}", "time budget used up (--time-budget)")
            continue
        try:
            run_matmul_shape(cfg, res, name, m, n, k)
        except Exception as e:  # noqa: BLE001
            res.error(f"quant matmul {name} {m}x{n}x{k}", e)
        peak_reset(dev)
        res.checkpoint()


def run_matmul_shape(cfg: Config, res: Results, name: str, m: int, n: int, k: int) -> None:
    dev = cfg.device
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
    bias = torch.randn(n, device=dev, generator=gen) * 0.1
    flops = 2 * m * n * k
    base = {"kind": "matmul", "shape": name, "M": m, "N": n, "K": k, "flops": flops, "activations": "bf16"}
    q8 = quant.quantize_weight(w, "int8")
    q4 = quant.quantize_weight(w, "int4", group_size=INT4_GROUP)
    qf = quant.quantize_weight(w, "fp8")
    xq8, xs8 = MM.quantize_activations(x, None)
    xqf, xsf = MM.quantize_activations_fp8(x)
    refs: dict[str, torch.Tensor] = {}

    def ref(fmt: str) -> torch.Tensor:
        """float64 product of the quantized operands (+ bias), computed once per format."""
        if fmt not in refs:
            if fmt == "bf16":
                a, b = x.double(), w.double()
            elif fmt == "int8":
                a, b = xq8.double() * xs8.double()[:, None], quant.dequantize(q8).double()
            elif fmt == "fp8":
                a, b = xqf.double() * xsf.double()[:, None], quant.dequantize(qf).double()
            else:
                a, b = x.double(), quant.dequantize(q4).double()
            refs[fmt] = a @ b.t() + bias.double()
        return refs[fmt]

    def case(impl: str, fmt: str, scope: str, fn, skip: str | None = None, note: str = "") -> None:
        what = f"quant matmul {name} {impl} ({scope})"
        if skip:
            res.skip(what, skip)
            return
        if cfg.seconds_left() <= 0:
            res.skip(what, "time budget used up (--time-budget)")
            return
        try:
            y = fn()
            err = float(((y.double() - ref(fmt)).abs().max() / ref(fmt).abs().max()))
            t = time_adaptive(fn, dev, cfg.warmup, cfg.repeats, cfg.case_seconds)
        except Exception as e:  # noqa: BLE001 — a backend failing is a result, not the end of the run
            res.error(what, e)
            return
        res.add("quant", {**base, "impl": impl, "format": fmt, "scope": scope, **t.as_dict(),
                          "tflops": flops / (t.median_ms * 1e-3) / 1e12, "max_rel_err": err, "note": note})

    cpu = dev.type == "cpu"
    case("bf16 torch.matmul", "bf16", "kernel", lambda: torch.nn.functional.linear(x, w, bias.to(x.dtype)))
    # W8A8
    case("W8A8 triton", "int8", "kernel",
         lambda: T.w8a8(xq8, xs8, q8.q, q8.scale, bias, out_dtype=torch.bfloat16), _triton_skip("w8a8", dev))
    case("W8A8 torch._int_mm", "int8", "kernel", lambda: MM.w8a8_matmul(xq8, xs8, q8.q, q8.scale, bias, "torch"),
         registry.why_not("w8a8_matmul", "torch", dev), "int32 out, epilogue in torch")
    # FP8
    case("FP8 triton", "fp8", "kernel",
         lambda: T.fp8(xqf, xsf, qf.q, qf.scale, bias, out_dtype=torch.bfloat16), _triton_skip("fp8", dev))
    case("FP8 triton fast-accum", "fp8", "kernel", lambda: T.fp8(xqf, xsf, qf.q, qf.scale, bias,
                                                               out_dtype=torch.bfloat16, fast_accum=True),
         _triton_skip("fp8", dev), "sm_90 fp8 sums never promoted to float32 (Triton's default)")
    no_scaled = registry.why_not("fp8_matmul", "torch", dev)
    case("FP8 torch._scaled_mm", "fp8", "kernel",
         lambda: MM.fp8_matmul(xqf, xsf, qf.q, qf.scale, bias, "torch", out_dtype=torch.bfloat16), no_scaled,
         "unit scales, fp32 out, epilogue in torch")
    case("FP8 torch._scaled_mm rowwise", "fp8", "kernel", lambda: _scaled_mm_rowwise(xqf, xsf, qf, bias),
         no_scaled or (None if n % 16 == 0 and k % 16 == 0 else "needs N, K multiples of 16")
         or _rowwise_skip(dev), "scales fused by cuBLAS, bf16 out")
    # W4A16
    case("W4A16 triton", "int4", "kernel", lambda: T.w4a16(x, q4.q, q4.scale, INT4_GROUP, bias,
                                                           out_dtype=torch.bfloat16), _triton_skip("w4a16", dev))
    case("W4A16 torch (dequant + bf16 matmul)", "int4", "kernel", lambda: MM.w4a16_matmul(x, q4, bias, "torch"))
    # layers (QuantLinear.forward, activation quantization included); on CPU the format's path is forced
    # (auto would resolve to dequant there) with the non-Triton backends: a smoke run of the same code
    for fmt, qw, mode in (("int8", q8, "w8a8"), ("int4", q4, "w4a16"), ("fp8", qf, "fp8")):
        layer = quant.QuantLinear(qw, bias, matmul=mode if cpu else "auto", key=1)
        if cpu:
            layer.matmul_backend = {"w8a8": "torch", "w4a16": "reference", "fp8": "reference"}[mode]
        case(f"QuantLinear {fmt} matmul={layer.matmul} -> {layer.resolved_matmul(dev)}", fmt, "layer",
             lambda layer=layer: layer(x), note=f"backend {layer.matmul_backend}")
    _tuned_configs(res, name)


def _rowwise_skip(dev: torch.device) -> str | None:
    """Why torch._scaled_mm with per-row/per-column scales cannot run here (None: it can). torch 2.11's CPU
    kernel takes tensor-wise scales only (2.13's takes both); on a GPU a failure is a result, not a skip."""
    if dev.type != "cpu":
        return None
    a = torch.ones(16, 16, device=dev).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=dev), scale_b=torch.ones(1, 16, device=dev),
                         out_dtype=torch.bfloat16)
    except RuntimeError as e:
        return f"torch {torch.__version__} on CPU: rowwise scales unsupported ({str(e).splitlines()[-1][:80]})"
    return None


def _scaled_mm_rowwise(xq: torch.Tensor, xs: torch.Tensor, qw, bias: torch.Tensor) -> torch.Tensor:
    return torch._scaled_mm(xq, qw.q.t(), scale_a=xs.reshape(-1, 1), scale_b=qw.scale.reshape(1, -1),
                            bias=bias.to(torch.bfloat16), out_dtype=torch.bfloat16)


def _tuned_configs(res: Results, shape: str) -> None:
    """The autotuner's choice per Triton kernel (what to pin once measured)."""
    for (kernel, group, _), tuner in T._tuned.items():
        best = getattr(tuner, "best_config", None)
        if best is not None:
            res.add("quant", {"kind": "autotune", "shape": shape, "kernel": kernel, "group": group,
                              "config": str(best)})


# ----------------------------------------------------------------------------- memory
class _FrozenQuantMatmul(torch.autograd.Function):
    """y = base(x) through the quantized forward; grad_x = grad_y @ dequant(W) in the activation dtype,
    the weight re-dequantized in the backward and dropped (nothing of W saved)."""

    @staticmethod
    def forward(ctx, x, base):  # noqa: D401
        ctx.base = base
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx, grad_y):
        w = quant.dequantize(ctx.base.qw).to(grad_y.dtype)
        return grad_y @ w, None


class QLoRALinear(torch.nn.Module):
    """Frozen quantized base + LoRA: y = base(x) + (alpha / r) B A x; A ~ N(0, 1/r) kaiming-like, B = 0
    (LoRA's init), adapters in the activation dtype."""

    def __init__(self, base: quant.QuantLinear, rank: int, dtype: torch.dtype, alpha: float = 16.0):
        super().__init__()
        self.base = base
        dev = base.qweight.device
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features, device=dev, dtype=dtype) / rank ** 0.5)
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dtype))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenQuantMatmul.apply(x, self.base) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling


def add_lora(model: torch.nn.Module, rank: int, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Wrap every QuantLinear in a QLoRALinear; returns the adapters (the only trainable parameters)."""
    params = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, quant.QuantLinear):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            wrapped = QLoRALinear(mod, rank, dtype)
            setattr(parent, name.rpartition(".")[2], wrapped)
            params += [wrapped.lora_a, wrapped.lora_b]
    return params


def memory_sizes(cfg: Config) -> tuple[int, int, int]:
    """(decoder layers, batch, seq) of the memory model: CLI values, else 32 x (16 x 256) on a GPU
    (4 x (4 x 128) with --quick), 1 x (2 x 8) on CPU (a tiny model)."""
    cpu, quick = cfg.device.type == "cpu", cfg.quick
    layers = cfg.quant_layers or (1 if cpu else 4 if quick else 32)
    batch = cfg.quant_batch or (2 if cpu else 4 if quick else 16)
    seq = cfg.quant_seq or (8 if cpu else 128 if quick else 256)
    return layers, batch, seq


def _llama_config(cfg: Config):
    from transformers import LlamaConfig
    layers = memory_sizes(cfg)[0]
    if cfg.device.type == "cpu":
        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _build(cfg: Config, fmt: str | None) -> tuple[torch.nn.Module, object]:
    from transformers import LlamaForCausalLM
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(cfg.device):
            model = LlamaForCausalLM(_llama_config(cfg))
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    rep = None
    if fmt is not None:  # only QuantLinear weights (buffers) are trained, the rest is frozen
        model.requires_grad_(False)
        rep = quant.quantize_model(model, fmt, exclude=("lm_head",), group_size=INT4_GROUP, matmul="auto")
    return model, rep


def run_memory(cfg: Config, res: Results) -> None:
    dev = cfg.device
    gen = torch.Generator(device=dev).manual_seed(0)
    conf = _llama_config(cfg)
    _, batch, seq = memory_sizes(cfg)
    ids = torch.randint(0, conf.vocab_size, (batch, seq), device=dev, generator=gen)
    base = {"kind": "memory", "model": "llama-7b-shaped", "layers": conf.num_hidden_layers,
            "hidden": conf.hidden_size, "batch": batch, "seq": seq,
            "lora_rank": cfg.quant_lora_rank, "tiny_config": dev.type == "cpu"}
    for fmt in [None, *cfg.quant_formats]:
        label = fmt or "bf16"
        if cfg.seconds_left() <= 0:
            res.skip(f"quant memory {label}", "time budget used up (--time-budget)")
            continue
        model = None
        try:
            peak_reset(dev)
            model, rep = _build(cfg, fmt)
            resident = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
            info = {**base, "format": label, "resident_bytes": resident,
                    "model_bytes": rep.model_bytes_after if rep else sum(p.numel() * p.element_size()
                                                                         for p in model.parameters()),
                    "matmul": sorted({m.resolved_matmul(dev) for _, m in quant.quant_layers(model)}) or ["bf16"]}
            memory_cases(cfg, res, model, ids, info, fmt)
        except Exception as e:  # noqa: BLE001
            res.error(f"quant memory {label}", e)
        del model
        peak_reset(dev)
        res.checkpoint()
    _ratios(res)


def memory_cases(cfg: Config, res: Results, model: torch.nn.Module, ids: torch.Tensor, info: dict,
                 fmt: str | None) -> None:
    import zokernels
    dev = cfg.device

    def closure() -> torch.Tensor:
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    def measure(what: str, fn, repeats: int = 2) -> None:
        peak_reset(dev)
        try:
            t = time_adaptive(fn, dev, 1, repeats, cfg.case_seconds, min_repeats=repeats)
        except torch.cuda.OutOfMemoryError as e:
            res.add("quant", {**info, "what": what, "peak_bytes": peak_bytes(dev), "oom": True,
                              "error": str(e).splitlines()[0][:300]})
            return
        res.add("quant", {**info, "what": what, **t.as_dict(), "peak_bytes": peak_bytes(dev), "oom": False})

    def forward() -> None:
        with torch.no_grad():
            closure()

    measure("inference forward", forward)
    if fmt is None:
        _zo_step(measure, zokernels.ZOSGD(model, lr=cfg.lr, eps=cfg.eps, n_queries=1, probe="inplace",
                                          backend="auto"), closure, "ZO step (ZOSGD, bf16)")
        return
    _zo_step(measure, zokernels.QuZO(model, lr=cfg.lr, eps=cfg.eps, n_queries=1, seed=0, probe="fused"), closure,
             f"QuZO step ({fmt})")
    peak_reset(dev)
    _first_order_step(measure, model, closure, cfg.quant_lora_rank, fmt)


def _zo_step(measure, opt, closure, what: str) -> None:
    """Time one optimizer's step; the optimizer is dropped on return."""
    with torch.no_grad():
        measure(what, lambda: opt.step(closure))


def _first_order_step(measure, model: torch.nn.Module, closure, rank: int, fmt: str) -> None:
    """LoRA adapters on every quantized linear + AdamW: backward through the frozen quantized base."""
    adapters = add_lora(model, rank, torch.bfloat16)
    adam = torch.optim.AdamW(adapters, lr=1e-4)

    def step() -> None:
        adam.zero_grad(set_to_none=True)
        closure().backward()
        adam.step()

    measure(f"QLoRA-style first-order step ({fmt} base, LoRA r={rank}, AdamW)", step)
    adam.zero_grad(set_to_none=True)


def _ratios(res: Results) -> None:
    """QLoRA-style peak / QuZO peak per format (the paper: 2.94x-5.47x on LLaMA-7B)."""
    rows = [r for r in res.data["quant"] if r.get("kind") == "memory" and r.get("peak_bytes") and not r.get("oom")]
    for fmt in FORMATS:
        quzo = next((r for r in rows if r["format"] == fmt and r["what"].startswith("QuZO step")), None)
        fo = next((r for r in rows if r["format"] == fmt and r["what"].startswith("QLoRA-style")), None)
        bf16 = next((r for r in rows if r["format"] == "bf16" and r["what"].startswith("ZO step")), None)
        if quzo and (fo or bf16):
            res.add("quant", {"kind": "memory_ratio", "format": fmt, "quzo_peak_bytes": quzo["peak_bytes"],
                              "first_order_peak_bytes": fo["peak_bytes"] if fo else None,
                              "first_order_over_quzo": fo["peak_bytes"] / quzo["peak_bytes"] if fo else None,
                              "bf16_zo_over_quzo": bf16["peak_bytes"] / quzo["peak_bytes"] if bf16 else None,
                              "paper_claim": "2.94x-5.47x (quantized first-order / QuZO, LLaMA-7B)"})


# ----------------------------------------------------------------------------- markdown
def quant_markdown(rows: list[dict], table) -> list[str]:
    """The quantized section of the result Markdown (`table` = report._table)."""
    out = ["## Quantized matmuls and QuZO memory (issue #6)", ""]
    mm = [r for r in rows if r.get("kind") == "matmul"]
    if mm:
        out += ["TFLOP/s = 2MNK / median time. kernel = quantized operands given; layer = QuantLinear.forward "
                "with the activation quantization. err = max |y - y64| / max |y64| against the float64 product "
                "of the same quantized operands.", "",
                table(["shape", "M x N x K", "impl", "scope", "median ms", "p10", "p90", "TFLOP/s",
                       "vs bf16", "err", "note"],
                      [[r["shape"], f"{r['M']}x{r['N']}x{r['K']}", r["impl"], r["scope"], r["median_ms"],
                        r["p10_ms"], r["p90_ms"], r["tflops"], _vs_bf16(mm, r), r["max_rel_err"], r["note"]]
                       for r in mm]), ""]
    tuned = [r for r in rows if r.get("kind") == "autotune"]
    if tuned:
        out += [table(["shape", "kernel", "group", "autotuned config"],
                      [[r["shape"], r["kernel"], r["group"], r["config"]] for r in tuned]), ""]
    mem = [r for r in rows if r.get("kind") == "memory"]
    if mem:
        out += [f"LLaMA-7B-shaped model, {mem[0]['layers']} layers, batch {mem[0]['batch']} x {mem[0]['seq']}; "
                "peak = torch.cuda.max_memory_allocated over the step's warmup and timed calls.", "",
                table(["format", "forward path", "what", "median ms", "peak GiB", "resident GiB", "OOM"],
                      [[r["format"], ",".join(r["matmul"]), r["what"], r.get("median_ms"), _gib(r.get("peak_bytes")),
                        _gib(r.get("resident_bytes")), r["oom"]] for r in mem]), ""]
    ratios = [r for r in rows if r.get("kind") == "memory_ratio"]
    if ratios:
        out += [table(["format", "QuZO peak GiB", "QLoRA-style peak GiB", "QLoRA-style / QuZO", "bf16 ZO / QuZO",
                       "paper"],
                      [[r["format"], _gib(r["quzo_peak_bytes"]), _gib(r["first_order_peak_bytes"]),
                        r["first_order_over_quzo"], r["bf16_zo_over_quzo"], r["paper_claim"]] for r in ratios]), ""]
    return out


def _vs_bf16(rows: list[dict], r: dict):
    b = next((x for x in rows if x["shape"] == r["shape"] and x["impl"] == "bf16 torch.matmul"), None)
    return None if b is None else b["median_ms"] / r["median_ms"]


def _gib(b) -> str:
    return "—" if b is None else f"{b / 2**30:.2f}"
