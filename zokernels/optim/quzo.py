"""QuZO (Zhou et al., EMNLP 2025): zeroth-order fine-tuning of a quantized model, forward only.

Step t, seed s_t = contract.step_seed(seed, t), queries q < n, for every QuantLinear (weight key k,
grid values q_w, scale s):

    D1_q = Q1(eps z_q / s)          SR on the format's grid, STREAM_QUZO_PROBE (query q)
    mu_q = [L(q_w + D1_q) - L(q_w - D1_q)] / (2 eps)       (probe weights clamped to the grid)
    update="single": q_w <- q_w - Q(lr * sum_q (mu_q / n) z_q / s)
    update="paper" : q_w <- q_w - Q(lr * sum_q (mu_q / n) D2_q / eps),  D2_q = Q2(eps z_q / s),
                     Q2 an SR independent of Q1 (STREAM_QUZO_UPDATE, query q)
    Q: SR with STREAM_UPDATE_SR (query 0). Both forms are unbiased given z: E[mu D2 | z] = E[mu | z] eps z / s
    because Q2 is independent of Q1 and of the activation SR; "single" rounds once and has less variance.
(fp8: the probe weights are SR_e4m3(q_w +- eps z / s) and the update SR_e4m3(q_w - x); see quant.ops.)
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .. import contract as C
from .. import distributed
from ..log import LogMismatch, base_fingerprint, fingerprint_diff
from ..quant import ops as QO
from ..quant.linear import ProbeSpec, QuantLinear, quant_layers, quantize_model, weight_key
from .common import as_float, check_number, eval_mode, scalar_loss, user_stacklevel
from .zosgd import NonFiniteLoss

PROBES = ("fused", "inplace")


@dataclass(frozen=True)
class QuZOConfig:
    eps: float
    n_queries: int
    update: str = "single"
    probe: str = "fused"
    act_sr: bool = False
    dist: str = "gaussian"
    fmt: str = "int8"


@dataclass
class QuZORecord:
    """One step: seed, projected gradients mu_q, lr per group, and saturation counts (elements clamped
    at the grid edge in the probes and in the update)."""

    seed: int
    grads: tuple[float, ...]
    lr: tuple[float, ...]
    skipped: bool = False
    probe_saturated: int = 0
    update_saturated: int = 0


@dataclass
class QuZOLog:
    config: dict
    base_seed: int
    names: list[str]
    steps: list[QuZORecord] = field(default_factory=list)
    contract_version: int = C.CONTRACT_VERSION
    base_fingerprint: dict | None = None   # of the quantized weights and scales training started from


def quantized_fingerprint(names: list[str], layers: list[QuantLinear]) -> dict:
    """base_fingerprint of each layer's format, quantized weight bits and scales (replay_quzo checks it)."""
    named = []
    for n, m in zip(names, layers):
        named.append((f"{n}.qweight.{m.fmt}", m.qweight.detach().view(torch.uint8).to(torch.int32)))
        named.append((f"{n}.scale", m.scale))
    return base_fingerprint(named)


class QuZO(torch.optim.Optimizer):
    """Zeroth-order SGD on the quantized weights of a model's QuantLinear layers (QuZO).

    `model` may already be quantized (zokernels.quant.quantize_model); otherwise pass fmt= and it is
    quantized in place here (quantize_kwargs go to quantize_model; the report is `self.quant_report`).
    Only QuantLinear weights are trained; every other parameter (embeddings, norms, an excluded lm_head)
    stays frozen. `step(closure)` runs 2 n_queries forwards under torch.no_grad() and eval mode and
    returns the mean probe loss. torch's global RNG is never used.

    Probes (`probe=`): "fused" (default): each QuantLinear computes its probe weights clamp(q +- D1)
    during its own forward (drift-free, no restore; extra memory: one layer's weights in flight).
    "inplace" (int8/int4): q <- clamp(q +- D1) in the buffers, forward, then exact restore (the
    clamped elements' old values are recorded, so restore is bitwise even when the grid saturates).
    Both give bitwise-identical losses.

    act_sr (layers whose forward quantizes activations: matmul "w8a8" / "fp8"): activations are rounded stochastically during probes, both probes
    of a query drawing the same uniforms (common random numbers, STREAM_ACT_SR with the query).

    backend: the kernels of the probe weights and the update (zokernels.quant.ops.quant_backend; "auto":
    reference on CPU, cuda / triton on GPU; "triton" on CPU runs the interpreter, for tests). On CPU with
    the reference backend the step caches each layer's z and Q1 offsets instead (cache_directions), which
    is faster there; results are bitwise the same with Rademacher z (Gaussian z may differ by float32 ulps
    between backends, see docs/perturbation.md).
    """

    def __init__(self, model: torch.nn.Module, lr: float, eps: float = 1e-3, *, fmt: str | None = None,
                 n_queries: int = 1, seed: int | None = None, update: str = "single", act_sr: bool = False,
                 probe: str = "fused", dist: str = "gaussian", nonfinite: str = "skip",
                 cache_directions: bool | None = None, quantize_kwargs: dict | None = None,
                 backend: str = "auto"):
        if not isinstance(model, torch.nn.Module):
            raise TypeError("QuZO takes the model (an nn.Module holding QuantLinear layers, or one to quantize "
                            "with fmt=...)")
        check_number(lr, "lr", lambda v: v >= 0, ">= 0")
        check_number(eps, "eps", lambda v: v > 0, "> 0")
        if distributed.resolve_group(None) is not None:
            raise NotImplementedError("QuZO has no multi-process support (no seed broadcast, no loss all-reduce: "
                                      "the replicas would diverge); run it in one process, or train float "
                                      "parameters on the quantized base with ZOSGD (ZOTrainer zo_method='zosgd')")
        if isinstance(n_queries, bool) or not isinstance(n_queries, int) or not 1 <= n_queries <= C.MAX_QUERIES:
            raise ValueError(f"n_queries must be an int in [1, {C.MAX_QUERIES}], got {n_queries!r}")
        if update not in QO.UPDATE_FORMS:
            raise ValueError(f"update must be one of {QO.UPDATE_FORMS}, got {update!r}")
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        C.check_dist(dist)
        self.quant_report = None
        layers = quant_layers(model)
        if not layers:
            if fmt is None:
                raise ValueError("the model has no QuantLinear layers: pass fmt='int8'|'int4'|'fp8' to quantize "
                                 "it, or call zokernels.quant.quantize_model first")
            self.quant_report = quantize_model(model, fmt, **(quantize_kwargs or {}))
            layers = quant_layers(model)
            if not layers:
                raise ValueError("quantize_model found no nn.Linear to quantize (all excluded?)")
        fmts = {m.fmt for _, m in layers}
        if fmt is not None and fmts != {fmt}:
            raise ValueError(f"fmt={fmt!r} but the model's QuantLinear layers are {sorted(fmts)}")
        if probe == "inplace" and "fp8" in fmts:
            raise ValueError("probe='inplace' needs integer formats (fp8 probes are re-rounded, not offsets); "
                             "use probe='fused'")
        if act_sr and not any(m.resolved_matmul(m.qweight.device) in ("w8a8", "fp8") for _, m in layers):
            raise ValueError("act_sr=True needs layers that quantize their activations: quantize_model(..., "
                             "matmul='w8a8' (int8) or 'fp8'), or matmul='auto' on CUDA")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")  # never torch's global RNG
        self.base_seed = C.check_u64(seed, "seed")
        self.model = model
        self.nonfinite = nonfinite
        self._names = [n for n, _ in layers]
        self._layers = [m for _, m in layers]
        for n, m in layers:
            m.key = weight_key(C.canonical_name(n))
        keys = [m.key for m in self._layers]
        if len(set(keys)) != len(keys):
            raise ValueError("two QuantLinear layers share a contract key (same canonical name)")
        self.config = QuZOConfig(eps=as_float(eps), n_queries=n_queries, update=update, probe=probe,
                                 act_sr=bool(act_sr), dist=dist, fmt=",".join(sorted(fmts)))
        self._building = True
        super().__init__([{"params": [m.qweight for m in self._layers]}], dict(lr=lr))
        self._building = False
        self._step = 0
        # Keep each layer's z and Q1 offsets for the step (the - probe and the update reuse them): 3
        # Philox passes per layer and query instead of 7. Costs 8 bytes per weight element (z float32 +
        # offsets int32) while the step runs, so by default only where Philox is the slow reference (CPU).
        self.backend = backend
        devices = {m.qweight.device for m in self._layers}
        for dev in devices:
            QO.quant_backend(dev, backend)   # fail here, not mid-step, if the backend cannot run
        if cache_directions is None:
            cache_directions = all(d.type == "cpu" and QO.quant_backend(d, backend).NAME == "reference"
                                   for d in devices)
        self.cache_directions = bool(cache_directions)
        self.log = QuZOLog(asdict(self.config), self.base_seed, list(self._names),
                           base_fingerprint=quantized_fingerprint(self._names, self._layers))

    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_building", False):
            raise NotImplementedError("QuZO fixes its layers at construction; build a new optimizer instead")
        super().add_param_group(param_group)

    @property
    def steps_taken(self) -> int:
        return self._step

    # ------------------------------------------------------------------ probes
    @contextlib.contextmanager
    def probing(self, spec: ProbeSpec):
        """Forwards inside see probe `spec` (fused: set on each layer; inplace: q perturbed in the buffers)."""
        undo = []
        try:
            if self.config.probe == "inplace":
                for m in self._layers:
                    qw = m.qw
                    d = QO.probe_delta(qw, spec.seed, m.key, spec.query, spec.eps, spec.dist, spec.sr_seed,
                                       spec.cache)
                    d = d * spec.sign
                    sat = QO.perturb_int_(qw, d)
                    spec.saturated += sat.count
                    undo.append((m, d, sat))
                    spec.skip_keys.add(m.key)
            for m in self._layers:
                m.probe = spec
            yield spec
        finally:
            for m in self._layers:
                m.probe = None
            for m, d, sat in reversed(undo):
                QO.restore_int_(m.qw, d, sat)

    def projected_grad(self, closure, seed: int, query: int, *, sr_seed: int | None = None,
                       act_seed: int | None = None, act_seed_minus: int | None = None,
                       cache: dict | None = None) -> tuple[float, float, int]:
        """(L+, L-, saturated) of query `query` at step seed `seed`. sr_seed / act_seed (default seed)
        redraw Q1 / the activation SR at a fixed z; act_seed_minus != act_seed breaks the common
        random numbers (for tests)."""
        cfg = self.config
        losses, sat = [], 0
        if cache is None and self.cache_directions:
            cache = {}
        for sign, aseed in ((+1, act_seed), (-1, act_seed if act_seed_minus is None else act_seed_minus)):
            spec = ProbeSpec(seed, query, sign, cfg.eps, cfg.dist, cfg.act_sr, sr_seed, aseed, cache=cache,
                             backend=self.backend)
            with self.probing(spec):
                losses.append(scalar_loss(closure()))
            sat += spec.saturated_total()
        return losses[0], losses[1], sat

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], torch.Tensor | float] | None = None) -> torch.Tensor:
        """One QuZO step; closure() runs a forward and returns a scalar loss. Returns the mean probe loss."""
        if closure is None:
            raise ValueError("QuZO.step needs a closure returning the loss (called 2 * n_queries times)")
        cfg = self.config
        seed = C.step_seed(self.base_seed, self._step)
        for g in self.param_groups:  # a scheduler or the user may have changed it since the last step
            check_number(g["lr"], "lr", lambda x: x >= 0, ">= 0")
        lrs = tuple(as_float(g["lr"]) for g in self.param_groups)
        plus, minus, sat = [], [], 0
        cache = {} if self.cache_directions else None
        with torch.no_grad(), self._eval_mode():
            for q in range(cfg.n_queries):
                lp, lm, s = self.projected_grad(closure, seed, q, cache=cache)
                plus.append(lp)
                minus.append(lm)
                sat += s
            loss = sum(plus + minus) / (2 * cfg.n_queries)
            grads = tuple((p - m) / (2.0 * cfg.eps) for p, m in zip(plus, minus))
            if not all(math.isfinite(g) for g in grads) or not math.isfinite(loss):
                self._commit(QuZORecord(seed, (math.nan,) * cfg.n_queries, lrs, True, sat))
                msg = f"QuZO step {self._step - 1}: non-finite loss or gradient {grads}; step skipped"
                if self.nonfinite == "raise":
                    raise NonFiniteLoss(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=user_stacklevel())
                return torch.tensor(loss, dtype=torch.float32)
            record = QuZORecord(seed, grads, lrs, False, sat)
            record.update_saturated = apply_record(self._layers, record, cfg, cache, self.backend)
        self._commit(record)
        return torch.tensor(loss, dtype=torch.float32)

    def _commit(self, record: QuZORecord) -> None:
        self.log.steps.append(record)
        self._step += 1

    def _eval_mode(self):
        return eval_mode(self.model)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["quzo"] = {"base_seed": self.base_seed, "step": self._step, "config": asdict(self.config),
                      "steps": [asdict(r) for r in self.log.steps],
                      "base_fingerprint": self.log.base_fingerprint}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("quzo", None)
        if extra is None:
            raise ValueError("not a QuZO state dict (no 'quzo' entry)")
        if extra["config"] != asdict(self.config):
            raise ValueError(f"QuZO config differs from the saved one: {extra['config']} vs {asdict(self.config)}")
        super().load_state_dict(state_dict)
        self.base_seed = int(extra["base_seed"])
        self._step = int(extra["step"])
        self.log.steps = [QuZORecord(**{**r, "grads": tuple(r["grads"]), "lr": tuple(r["lr"])})
                          for r in extra["steps"]]
        # the base the run started from, not the (trained) weights this optimizer was built on
        self.log.base_fingerprint = extra.get("base_fingerprint")


def apply_record(layers: list[QuantLinear], record: QuZORecord, config: QuZOConfig,
                 cache: dict | None = None, backend: str = "auto") -> int:
    """The weight change of one logged step (no forward): what QuZO.step and replay_quzo both run.
    Returns the number of saturated elements. Without a step cache: one update kernel per layer, the
    saturation counters read once at the end (one host sync per device)."""
    if record.skipped:
        return 0
    coeffs = tuple(g / config.n_queries for g in record.grads)
    lr = record.lr[0]
    if lr == 0.0:
        return 0
    if cache is not None:
        return sum(QO.apply_update_(m.qw, record.seed, m.key, coeffs, lr, config.eps, config.update,
                                    config.dist, cache) for m in layers)
    counters: dict = {}
    for m in layers:
        dev = m.qweight.device
        if dev not in counters:
            counters[dev] = QO.new_counter(dev)
        QO.update_(m.qw, record.seed, m.key, coeffs, lr, config.eps, config.update, config.dist,
                   saturated=counters[dev], backend=backend)
    return sum(int(c) for c in counters.values())


def replay_quzo(model: torch.nn.Module, log: QuZOLog, backend: str = "auto") -> None:
    """Re-apply a QuZO log to the base quantized model (same quantization), bitwise, without forwards
    (with Gaussian z, bitwise on the backend that trained; another backend may differ by float32 ulps of z)."""
    layers = dict(quant_layers(model))
    missing = [n for n in log.names if n not in layers]
    if missing:
        raise LogMismatch(f"layers of the log are not in the model: {missing[:5]}")
    mods = [layers[n] for n in log.names]
    if int(log.contract_version) != C.CONTRACT_VERSION:
        raise LogMismatch(f"the log was written under perturbation contract v{log.contract_version}; this "
                          f"zokernels implements v{C.CONTRACT_VERSION}: its z differ, replay would be wrong")
    if log.base_fingerprint is None:
        warnings.warn("replay_quzo: the log has no base fingerprint (written before they were recorded): "
                      "the model cannot be checked to be the base training started from", stacklevel=2)
    elif diff := fingerprint_diff(quantized_fingerprint(log.names, mods), log.base_fingerprint):
        raise LogMismatch(f"this is not the quantized base the log started from: {len(diff)} tensors differ "
                          f"(format, bits or scales), e.g. {diff[:4]}")
    for n, m in zip(log.names, mods):
        m.key = weight_key(C.canonical_name(n))
    config = QuZOConfig(**log.config)
    with torch.no_grad():
        for record in log.steps:
            apply_record(mods, record, config, backend=backend)
