"""Run configuration: presets per device and --quick, overridable from the command line."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import shapes as S

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
BACKENDS = ("reference", "triton", "cuda")


@dataclass
class Config:
    device: torch.device
    quick: bool
    layer_scale: float
    width_div: int
    dtypes: list[str]
    backends: list[str]
    queries: list[int]
    big_sizes: list[int]
    models: list[str]
    warmup: int
    repeats: int
    case_seconds: float           # adaptive repeats: aim for about this much timed work per case
    copy_bytes: int
    rng_numel: int
    reference_max_numel: int      # the pure-torch reference is timed only on sets this small
    compile_dtypes: list[str]
    time_budget_s: float
    e2e_reserve_s: float          # part of the budget kept for the end-to-end part
    e2e_models: list[str]
    e2e_batch: int
    e2e_seq: int
    e2e_tiny: bool                # CPU smoke: tiny transformer configs (1 layer, width 32)
    e2e_repeats: int
    eps: float = 1e-3
    lr: float = 1e-6
    weight_decay: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def shape_sets(self) -> list[S.ShapeSet]:
        builders = {"llama-7b": S.llama7b, "opt-1.3b": S.opt1_3b}
        sets = [builders[m](self.layer_scale, self.width_div) for m in self.models]
        return sets + [S.big_tensor(n) for n in self.big_sizes]

    run_e2e: bool = True
    zosgd_probes: tuple[str, ...] = ("inplace", "hooks", "swap")
    # masked (MaZO) kernels, benchmarks/masked.py: projection matrices of this many LLaMA-7B layers
    masked_ratios: list[float] = field(default_factory=lambda: [0.01, 0.1, 0.5, 1.0])
    masked_blocks: list[int] = field(default_factory=lambda: [16])
    masked_layers: int = 1
    # quantized matmuls + QuZO memory, benchmarks/quant.py: tokens of the matmuls (16 x 256), the memory
    # model's decoder layers (None: 32, 4 with --quick), batch x seq, LoRA rank of the first-order baseline
    quant_tokens: int = 16 * 256
    quant_layers: int | None = None
    quant_batch: int | None = None
    quant_seq: int | None = None
    quant_lora_rank: int = 16
    quant_formats: list[str] = field(default_factory=lambda: ["int8", "int4", "fp8"])
    # pruning, benchmarks/prune.py (GPU only): tokens of the 2:4 matmuls (16 x 256); the pruning-time model's decoder
    # layers, its calibration sequences x tokens and the part's own time cap (None: 4, 8 x 512, 90 s; --quick 1,
    # 4 x 256, 30 s)
    prune_tokens: int = 16 * 256
    prune_layers: int | None = None
    prune_samples: int | None = None
    prune_seq: int | None = None
    prune_seconds: float | None = None

    def seconds_left(self) -> float:
        return self.time_budget_s - (time.monotonic() - self.started)

    def micro_seconds_left(self) -> float:
        return self.seconds_left() - (self.e2e_reserve_s if self.run_e2e else 0.0)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "started"}
        d["device"] = str(self.device)
        return d


def preset(device: str, quick: bool) -> Config:
    dev = torch.device(device)
    if dev.type == "cuda":
        return Config(
            device=dev, quick=quick, layer_scale=0.125 if quick else 1.0, width_div=1,
            dtypes=["bf16", "fp32"] if quick else ["bf16", "fp32", "fp16"], backends=list(BACKENDS),
            queries=[1, 4, 16], big_sizes=[1 << 24] if quick else [1 << 28, 1 << 24],
            models=["llama-7b", "opt-1.3b"], warmup=2 if quick else 3, repeats=5 if quick else 10,
            case_seconds=0.5 if quick else 1.5, copy_bytes=(512 << 20) if quick else (2 << 30),
            rng_numel=(1 << 24) if quick else (1 << 28), reference_max_numel=1 << 25,
            compile_dtypes=["bf16"], time_budget_s=240 if quick else 480, e2e_reserve_s=60 if quick else 170,
            e2e_models=["llama-7b", "opt-1.3b"], e2e_batch=4 if quick else 16, e2e_seq=128 if quick else 256,
            e2e_tiny=False, e2e_repeats=3 if quick else 5)
    return Config(
        device=dev, quick=quick, layer_scale=0.01 if quick else 1 / 16, width_div=128 if quick else 32,
        dtypes=["fp32", "bf16"], backends=list(BACKENDS), queries=[1, 4] if quick else [1, 4, 16],
        big_sizes=[1 << 15] if quick else [1 << 18], models=["llama-7b", "opt-1.3b"],
        warmup=1, repeats=3 if quick else 5, case_seconds=0.2 if quick else 1.0,
        copy_bytes=(16 << 20) if quick else (256 << 20), rng_numel=(1 << 15) if quick else (1 << 18),
        reference_max_numel=1 << 30, compile_dtypes=[], time_budget_s=120 if quick else 1200,
        e2e_reserve_s=30 if quick else 300,
        e2e_models=["opt-1.3b", "llama-7b"], e2e_batch=2, e2e_seq=16 if quick else 64, e2e_tiny=True,
        e2e_repeats=2 if quick else 3)
