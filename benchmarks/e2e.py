"""End to end: one ZO step (2 forwards + perturbation/update) on randomly initialized HuggingFace
models (bf16), ours vs the MeZO baseline, plus a first-order AdamW step and peak memory; on the
LLaMA-7B-shaped model also Pfeiffer adapters r=16 (forward with vs without, a ZO step over the adapters).

outside-forward time = step time - 2 x (one no_grad forward with loss, timed alone);
its share is reported relative to the two forwards. Peak memory: torch.cuda.max_memory_allocated
after reset_peak_memory_stats, for one forward, one ZO step and one first-order step.
Transformers is imported here only (lazily): the suite's micro part does not need it.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch

from zokernels import ops

from .baselines import MeZO
from .config import Config
from .ours import OursInPlace
from .record import Results
from .timing import peak_bytes, peak_reset, time_adaptive

DTYPE = torch.bfloat16
# the adapter case: Pfeiffer bottleneck adapters on the LLaMA-7B-shaped model (HF LlamaForCausalLM, model_type
# "llama", which zokernels.adapters knows), after its other cases
ADAPTER_MODELS = ("llama-7b",)
ADAPTER_PLACEMENT, ADAPTER_REDUCTION = "pfeiffer", 16


def model_config(name: str, cfg: Config):
    """A transformers config with the real model's shapes (layers scaled by --scale), or a tiny one."""
    from transformers import LlamaConfig, OPTConfig

    def layers(n: int) -> int:
        return max(1, round(n * cfg.layer_scale))

    if name == "llama-7b":
        if cfg.e2e_tiny:
            return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=86, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
        return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=layers(32), num_attention_heads=32, num_key_value_heads=32,
                           max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if name == "opt-1.3b":
        if cfg.e2e_tiny:
            return OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=128, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32)
        return OPTConfig(vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=layers(24),
                         num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2048,
                         do_layer_norm_before=True, enable_bias=True, tie_word_embeddings=True)
    raise ValueError(f"unknown e2e model {name!r}")


def build_model(name: str, cfg: Config) -> torch.nn.Module:
    from transformers import LlamaForCausalLM, OPTForCausalLM
    conf = model_config(name, cfg)
    cls = LlamaForCausalLM if name == "llama-7b" else OPTForCausalLM
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)  # build in bf16 directly: no fp32 copy of a 7B model
    try:
        with torch.device(cfg.device):
            model = cls(conf)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _zosgd_class():
    """zokernels.ZOSGD when it exists, else (None, why)."""
    try:
        import zokernels
        cls = getattr(zokernels, "ZOSGD", None)
        if cls is None:
            from zokernels.optim import ZOSGD as cls  # noqa: N813
        return cls, None
    except Exception as e:  # noqa: BLE001 — written against the API; skipped with the reason until it lands
        return None, f"zokernels.ZOSGD not importable yet ({type(e).__name__}: {e})"


def largest_module_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the largest module's own parameters: what one module in flight can add."""
    best = 0
    for m in model.modules():
        best = max(best, sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)))
    return best


def run_e2e(cfg: Config, res: Results) -> None:
    for name in cfg.e2e_models:
        what = f"e2e {name}"
        if cfg.seconds_left() <= 0:
            res.skip(what, f"time budget of {cfg.time_budget_s:.0f} s used up (--time-budget)")
            continue
        try:
            run_model(cfg, res, name)
        except Exception as e:  # noqa: BLE001 — one model failing must not end the run
            res.error(what, e)
        gc.collect()
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        res.checkpoint()


def run_model(cfg: Config, res: Results, name: str) -> None:
    dev = cfg.device
    peak_reset(dev)
    model = build_model(name, cfg)
    conf = model.config
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    ids = torch.randint(0, conf.vocab_size, (cfg.e2e_batch, cfg.e2e_seq), device=dev, generator=gen)
    base = {"model": name, "layers": conf.num_hidden_layers, "hidden": conf.hidden_size, "params": n_params,
            "param_bytes": param_bytes, "batch": cfg.e2e_batch, "seq": cfg.e2e_seq, "dtype": "bf16",
            "tiny_config": cfg.e2e_tiny}

    def closure() -> torch.Tensor:
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return closure()

    def measure(what: str, fn, warmup: int | None = None) -> dict | None:
        """Peak memory over warmup + timed calls, and timing; OOM and errors become results."""
        if cfg.seconds_left() <= 0 and what != "inference forward":
            res.skip(f"e2e {name} {what}", "time budget used up (--time-budget)")
            return None
        peak_reset(dev)
        try:
            t = time_adaptive(fn, dev, warmup or cfg.warmup, cfg.e2e_repeats, cfg.case_seconds * 2, min_repeats=2)
        except torch.cuda.OutOfMemoryError as e:
            res.add("memory", {**base, "what": what, "peak_bytes": peak_bytes(dev), "oom": True,
                               "error": str(e).splitlines()[0][:300]})
            peak_reset(dev)
            return None
        except Exception as e:  # noqa: BLE001 — one implementation failing must not end the model's run
            res.error(f"e2e {name} {what}", e)
            peak_reset(dev)
            return None
        peak = peak_bytes(dev)
        res.add("memory", {**base, "what": what, "peak_bytes": peak, "oom": False})
        return {**t.as_dict(), "peak_bytes": peak}

    resident = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
    fwd = measure("inference forward", forward)
    if fwd is None:
        res.skip(f"e2e {name}", "the inference forward itself failed (see memory/errors)")
        del model
        return
    allowance = largest_module_param_bytes(model)
    res.add("e2e", {**base, "impl": "forward (no_grad, with loss)", "backend": "torch", **fwd,
                    "resident_bytes": resident, "module_in_flight_bytes": allowance})
    two_fwd = 2 * fwd["median_ms"]

    def zo_record(impl: str, probe: str, backend: str, stats: dict) -> None:
        outside = stats["median_ms"] - two_fwd
        # modules in flight: one module for hooks (and in-place, whose scratch is nil); all for swap
        in_flight = param_bytes if probe == "swap" else allowance
        res.add("e2e", {**base, "impl": impl, "probe": probe, "backend": backend, **stats,
                        "forward_ms": fwd["median_ms"], "outside_forward_ms": outside,
                        "outside_share_pct": 100 * outside / two_fwd,
                        "inference_peak_bytes": fwd["peak_bytes"], "module_in_flight_bytes": in_flight})

    params = [(n, p) for n, p in model.named_parameters()]
    with torch.no_grad():
        mezo = MeZO(params, cfg.eps, cfg.lr, cfg.weight_decay)
        stats = measure("ZO step mezo", lambda: mezo.step(closure))
        if stats:
            zo_record("mezo", "inplace", "torch", stats)
        del mezo

        backend = ops.backend_name("zo_update_", dev)
        ours = OursInPlace(params, cfg.eps, cfg.lr, cfg.weight_decay, backend="auto")
        stats = measure("ZO step ours-ops in-place", lambda: ours.step(closure))
        if stats:
            zo_record("ours-ops", "inplace", backend, stats)
        del ours

    time_zosgd_probes(cfg, res, name, model, closure, measure, lambda probe: f"ZOSGD probe={probe}",
                      lambda probe, stats: zo_record("ZOSGD", probe, backend, stats))

    if cfg.seconds_left() > 0:
        first_order(cfg, res, model, closure, base)
    else:
        res.skip(f"e2e {name} first-order AdamW", "time budget used up (--time-budget)")
    if name in ADAPTER_MODELS:  # last: the adapters stay in the model
        if cfg.seconds_left() <= 0:
            res.skip(f"e2e {name} adapters", "time budget used up (--time-budget)")
        else:
            try:
                adapter_case(cfg, res, name, model, base, forward, closure, measure)
            except Exception as e:  # noqa: BLE001
                res.error(f"e2e {name} adapters", e)
    del model, params
    peak_reset(dev)


def adapter_case(cfg: Config, res: Results, name: str, model: torch.nn.Module, base: dict,
                 forward: Callable[[], torch.Tensor], closure: Callable[[], torch.Tensor],
                 measure: Callable[..., dict | None]) -> None:
    """Pfeiffer bottleneck adapters (zokernels.adapters, r = ADAPTER_REDUCTION, one after each block's MLP) on
    the model: (i) the forward (no_grad, with loss) timed just before and just after adding them (record
    `forward_ratio` = with / without); (ii) one ZOSGD step per probe over the adapter parameters only (the
    base is frozen), with its peak memory. An adapter adds 2*2*d*(d/r) matmul flops per token (recorded with
    the base's linear-layer flops, 2 x their weights) and holds 2 d (d/r) + d + d/r parameters; the step's
    perturbation/update passes touch those only (2 bytes each in bf16)."""
    from zokernels.adapters import add_adapters

    before = measure("inference forward (adapter case, without adapters)", forward)
    linear_flops = 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    names = add_adapters(model, ADAPTER_PLACEMENT, ADAPTER_REDUCTION)
    trained = [p for p in model.parameters() if p.requires_grad]
    d = model.config.hidden_size
    info = {"adapters": {"placement": ADAPTER_PLACEMENT, "reduction": ADAPTER_REDUCTION, "count": len(names),
                         "params": sum(p.numel() for p in trained),
                         "param_bytes": sum(p.numel() * p.element_size() for p in trained),
                         "added_flops_per_token": len(names) * 4 * d * (d // ADAPTER_REDUCTION),
                         "base_linear_flops_per_token": linear_flops}}
    label = f"{ADAPTER_PLACEMENT} adapters r={ADAPTER_REDUCTION}"
    after = measure(f"inference forward + {label}", forward)
    if before is None or after is None:
        res.skip(f"e2e {name} adapters", "a forward of the adapter case failed or ran out of time (see memory/errors)")
        return
    res.add("e2e", {**base, **info, "impl": f"forward + {label} (no_grad, with loss)", "backend": "torch", **after,
                    "base_forward_ms": before["median_ms"], "forward_ratio": after["median_ms"] / before["median_ms"]})
    two_fwd = 2 * after["median_ms"]
    backend = ops.backend_name("zo_update_", cfg.device)
    impl = f"ZOSGD, {label} only"

    def record(probe: str, stats: dict) -> None:
        outside = stats["median_ms"] - two_fwd
        res.add("e2e", {**base, **info, "impl": impl, "probe": probe, "backend": backend, **stats,
                        "forward_ms": after["median_ms"], "outside_forward_ms": outside,
                        "outside_share_pct": 100 * outside / two_fwd, "inference_peak_bytes": after["peak_bytes"]})

    time_zosgd_probes(cfg, res, name, model, closure, measure, lambda probe: f"{impl} probe={probe}", record)


def time_zosgd_probes(cfg: Config, res: Results, name: str, model: torch.nn.Module, closure: Callable[[], torch.Tensor],
                      measure: Callable[..., dict | None], what: Callable[[str], str],
                      record: Callable[[str, dict], None]) -> None:
    """One ZOSGD step per probe of cfg.zosgd_probes over the model's trainable parameters, timed by `measure` as
    "ZO step <what(probe)>" and handed to record(probe, stats); no ZOSGD class, a failed construction or step:
    a skip or error result instead."""
    zosgd, why = _zosgd_class()
    for probe in cfg.zosgd_probes:
        label = what(probe)
        if zosgd is None:
            res.skip(f"e2e {name} {label}", why)
            continue
        try:
            opt = zosgd(model, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, n_queries=1, probe=probe,
                        backend="auto")
        except Exception as e:  # noqa: BLE001
            res.skip(f"e2e {name} {label}", f"construction failed: {type(e).__name__}: {e}")
            continue
        try:
            with torch.no_grad():
                stats = measure(f"ZO step {label}", lambda: opt.step(closure))
            if stats:
                record(probe, stats)
        except Exception as e:  # noqa: BLE001
            res.error(f"e2e {name} {label}", e)
        del opt
        peak_reset(cfg.device)


def first_order(cfg: Config, res: Results, model: torch.nn.Module, closure, base: dict) -> None:
    """A standard AdamW step (backward + optimizer) for reference; OOM is a result, not a failure."""
    dev = cfg.device
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        closure().backward()
        opt.step()

    peak_reset(dev)
    try:
        t = time_adaptive(step, dev, 1, cfg.e2e_repeats, cfg.case_seconds * 2, min_repeats=2)
        peak = peak_bytes(dev)
        res.add("e2e", {**base, "impl": "first-order AdamW", "backend": "torch", **t.as_dict(), "peak_bytes": peak})
        res.add("memory", {**base, "what": "first-order AdamW step", "peak_bytes": peak, "oom": False})
    except torch.cuda.OutOfMemoryError as e:
        res.add("memory", {**base, "what": "first-order AdamW step", "peak_bytes": peak_bytes(dev), "oom": True,
                           "error": str(e).splitlines()[0][:300]})
        res.add("e2e", {**base, "impl": "first-order AdamW", "backend": "torch", "oom": True})
    finally:
        opt.zero_grad(set_to_none=True)
        del opt
        for p in model.parameters():
            p.requires_grad_(False)
        peak_reset(dev)
