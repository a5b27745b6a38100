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
import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch

from .. import contract as C
from ..log import (FineTuneLog, LogMismatch, base_fingerprint, fingerprint_diff, new_header, register_json_reader,
                   register_optimizer)
from . import ops as QO
from .linear import ProbeSpec, QuantLinear, quant_layers, quantize_model, weight_key
from ..step import StepRecord
from ..optim.base import ZOOptimizer, check_choice, check_eps, check_lr, check_n_queries
from ..optim.common import as_float, scalar_loss, user_stacklevel

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


@dataclass(frozen=True)
class QuZORecord(StepRecord):
    """One step (seed, projected gradients mu_q, lr of the one group, wd always 0) and its saturation counts:
    elements clamped at the grid edge in the probes and in the update (logged, not needed by replay)."""

    probe_saturated: int = 0
    update_saturated: int = 0


def quantized_fingerprint(names: list[str], layers: list[QuantLinear]) -> dict:
    """base_fingerprint of each layer's format, quantized weight bits and scales (replay checks it)."""
    named = []
    for n, m in zip(names, layers):
        named.append((f"{n}.qweight.{m.fmt}", m.qweight.detach().view(torch.uint8).to(torch.int32)))
        named.append((f"{n}.scale", m.scale))
    return base_fingerprint(named)


def layer_key(name: str) -> int:
    """Contract key of QuantLinear `name`'s weight (its nn.Linear's)."""
    return weight_key(C.canonical_name(name))


# ---------------------------------------------------------------------- the pure step function
def quzo_update(layers: list[QuantLinear], record: StepRecord, config: QuZOConfig, cache: dict | None = None,
                backend: str = "auto") -> int:
    """The weight change of one logged step (no forward): what QuZO.step and replay both run. Returns the
    number of saturated elements. Without a step cache: one update kernel per layer, the saturation
    counters read once at the end (one host sync per device)."""
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


apply_record = quzo_update


class QuZO(ZOOptimizer):
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

    `opt.log` is a zokernels.FineTuneLog (optimizer "quzo": seeds, mu_q, lr and saturation counts per step);
    `opt.log.save(path)` + `zokernels.replay(base_quantized_model, path)` rebuild the trained weights bitwise.
    """

    NAME, TITLE = "quzo", "QuZO"
    HYPERS = ("lr",)
    RECORD = QuZORecord
    MULTI_PROCESS = False
    MULTI_PROCESS_REFUSAL = ("no multi-process support (no seed broadcast, no loss all-reduce: the replicas would "
                             "diverge); run it in one process, or train float parameters on the quantized base "
                             "with ZOSGD (ZOTrainer zo_method='zosgd')")

    def __init__(self, model: torch.nn.Module, lr: float, eps: float = 1e-3, *, fmt: str | None = None,
                 n_queries: int = 1, seed: int | None = None, update: str = "single", act_sr: bool = False,
                 probe: str = "fused", dist: str = "gaussian", nonfinite: str = "skip",
                 cache_directions: bool | None = None, quantize_kwargs: dict | None = None,
                 backend: str = "auto"):
        if not isinstance(model, torch.nn.Module):
            raise TypeError("QuZO takes the model (an nn.Module holding QuantLinear layers, or one to quantize "
                            "with fmt=...)")
        check_lr(lr)
        check_eps(eps)
        self._init_seed(seed)   # refuses a multi-process world
        check_n_queries(n_queries)
        if update not in QO.UPDATE_FORMS:
            raise ValueError(f"update must be one of {QO.UPDATE_FORMS}, got {update!r}")
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
        check_choice(nonfinite, "nonfinite", ("skip", "raise"))
        C.check_dist(dist)
        self.quant_report = None
        layers = quant_layers(model)
        if not layers:
            if fmt is None:
                raise ValueError("the model has no QuantLinear layers: pass fmt='int8'|'int4'|'fp8' to quantize "
                                 "it, or call zokernels.quant.quantize_model first")
            self.quant_report = quantize_model(model, fmt, **(quantize_kwargs or {}))  # raises if none is left
            layers = quant_layers(model)
        fmts = {m.fmt for _, m in layers}
        if fmt is not None and fmts != {fmt}:
            raise ValueError(f"fmt={fmt!r} but the model's QuantLinear layers are {sorted(fmts)}")
        if probe == "inplace" and "fp8" in fmts:
            raise ValueError("probe='inplace' needs integer formats (fp8 probes are re-rounded, not offsets); "
                             "use probe='fused'")
        if act_sr and not any(m.resolved_matmul(m.qweight.device) in ("w8a8", "fp8") for _, m in layers):
            raise ValueError("act_sr=True needs layers that quantize their activations: quantize_model(..., "
                             "matmul='w8a8' (int8) or 'fp8'), or matmul='auto' on CUDA")
        self.model = model
        self.nonfinite = nonfinite
        self._names = [n for n, _ in layers]
        self._layers = [m for _, m in layers]
        for n, m in layers:
            m.key = layer_key(n)
        keys = [m.key for m in self._layers]
        if len(set(keys)) != len(keys):
            raise ValueError("two QuantLinear layers share a contract key (same canonical name)")
        self.config = QuZOConfig(eps=as_float(eps), n_queries=n_queries, update=update, probe=probe,
                                 act_sr=bool(act_sr), dist=dist, fmt=",".join(sorted(fmts)))
        self._init_groups([{"params": [m.qweight for m in self._layers]}], dict(lr=lr))
        # Keep each layer's z and Q1 offsets for the step (the - probe and the update reuse them): 3
        # Philox passes per layer and query instead of 7. Costs 8 bytes per weight element (z float32 +
        # offsets int32) while the step runs, so by default only where Philox is the slow reference (CPU).
        self.backend = backend
        devices = {m.qweight.device for m in self._layers}
        for dev in devices:
            QO.quant_backend(dev, backend)   # fail here, not mid-step, if the backend cannot run
        if cache_directions is None:
            cache_directions = all(d.type == "cpu" and QO.quant_backend(d, backend) == "reference"
                                   for d in devices)
        self.cache_directions = bool(cache_directions)
        self._new_log([self._names], dict(zip(self._names, keys)), quantized_fingerprint(self._names, self._layers))

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
    def _zo_step(self, closure, seed: int, lrs, wds) -> float:
        cfg = self.config
        plus, minus, sat = [], [], 0
        cache = {} if self.cache_directions else None
        for q in range(cfg.n_queries):
            lp, lm, s = self.projected_grad(closure, seed, q, cache=cache)
            plus.append(lp)
            minus.append(lm)
            sat += s
        loss = sum(plus + minus) / (2 * cfg.n_queries)
        grads = tuple((p - m) / (2.0 * cfg.eps) for p, m in zip(plus, minus))
        if not all(math.isfinite(g) for g in grads) or not math.isfinite(loss):
            self._commit(QuZORecord(seed, (math.nan,) * cfg.n_queries, lrs, wds, skipped=True, probe_saturated=sat))
            return self._warn_or_raise(f"non-finite loss or gradient {grads}", loss)
        record = QuZORecord(seed, grads, lrs, wds, probe_saturated=sat)
        updated = quzo_update(self._layers, record, cfg, cache, self.backend)
        self._commit(dataclasses.replace(record, update_saturated=updated))
        return loss

    # ------------------------------------------------------------------ ZOOptimizer hooks
    def _state_tensors(self):
        return [(f"{n}.{b}", getattr(m, b), True) for n, m in zip(self._names, self._layers)
                for b in ("qweight", "scale")]

    def _saved_log(self, extra: dict) -> FineTuneLog:
        if "log" in extra:
            return super()._saved_log(extra)
        # a state_dict of zokernels up to commit e04bf6d: the steps as dicts, the base's fingerprint apart
        log = FineTuneLog(dict(self.log.header, base_seed=str(int(extra["base_seed"])),
                               base_fingerprint=extra.get("base_fingerprint")))
        log.steps = [_legacy_record(r) for r in extra["steps"]]
        return log

    def _check_saved_log(self, log: FineTuneLog) -> None:
        if log.names != self._names:
            raise ValueError("the saved optimizer trained other layers (layer names differ)")
        super()._check_saved_log(log)


# ---------------------------------------------------------------------- replay
def bind_replay(model: torch.nn.Module, log: FineTuneLog, backend: str = "auto") -> list[QuantLinear]:
    """What zokernels.replay changes for a QuZO log: the model's QuantLinear layers the log names, checked
    against the log's key table and the fingerprint of the quantized base (format, bits, scales)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError("replay of a QuZO log needs the (quantized) model, an nn.Module")
    layers = dict(quant_layers(model))
    names = log.names
    missing = [n for n in names if n not in layers]
    if missing:
        raise LogMismatch(f"layers of the log are not in the model: {missing[:5]}")
    mods = [layers[n] for n in names]
    bad = [n for n, k in log.keys.items() if layer_key(n) != k]
    if bad:
        raise LogMismatch(f"the log's key table does not match the layers' contract keys for {bad[:5]}: written "
                          "by an incompatible zokernels")
    if log.base_fingerprint is None:
        warnings.warn("replay: the QuZO log has no base fingerprint (written before they were recorded): "
                      "the model cannot be checked to be the base training started from",
                      stacklevel=user_stacklevel())
    elif diff := fingerprint_diff(quantized_fingerprint(names, mods), log.base_fingerprint):
        raise LogMismatch(f"this is not the quantized base the log started from: {len(diff)} tensors differ "
                          f"(format, bits or scales), e.g. {diff[:4]}")
    for n, m in zip(names, mods):
        m.key = layer_key(n)
    return mods


def _apply_step(layers: list[QuantLinear], record: StepRecord, config: QuZOConfig, backend: str) -> None:
    quzo_update(layers, record, config, backend=backend)


register_optimizer(QuZO.NAME, config_type=QuZOConfig, bind=bind_replay, apply_step=_apply_step,
                   record_type=QuZORecord)


def replay_quzo(model: torch.nn.Module, log, backend: str = "auto") -> FineTuneLog:
    """Deprecated: zokernels.replay(model, log) replays every optimizer's log, QuZO's included."""
    from ..log import replay

    warnings.warn("replay_quzo is deprecated: use zokernels.replay(model, log)", DeprecationWarning,
                  stacklevel=user_stacklevel())
    return replay(model, log, backend)


# ---------------------------------------------------------------------- the JSON log of older versions
def _legacy_record(r: dict) -> QuZORecord:
    lr = tuple(float(x) for x in r["lr"])
    return QuZORecord(seed=int(r["seed"]), grads=tuple(float(g) for g in r["grads"]), lr=lr, wd=(0.0,) * len(lr),
                      skipped=bool(r.get("skipped", False)), probe_saturated=int(r.get("probe_saturated", 0)),
                      update_saturated=int(r.get("update_saturated", 0)))


def from_json_log(data: dict) -> FineTuneLog:
    """The quzo_log.json of zokernels up to commit e04bf6d (zokernels.hf.tuning.save_quzo_log, format
    "zokernels.quzo_log" v1: config, base_seed, names, steps, contract_version, base_fingerprint) as a log."""
    if int(data.get("version", 1)) != 1:
        raise LogMismatch(f"QuZO JSON log version {data.get('version')} is not supported (this zokernels reads v1)")
    names = list(data["names"])
    steps = [_legacy_record(r) for r in data["steps"]]
    config = QuZOConfig(**data["config"])
    lr = steps[0].lr[0] if steps else 0.0
    header = new_header(optimizer=QuZO.NAME, config=dataclasses.asdict(config),
                        groups=[{"names": names, "lr": lr, "weight_decay": 0.0}],
                        keys={n: layer_key(n) for n in names}, base_seed=int(data["base_seed"]),
                        fingerprint=data.get("base_fingerprint"), record_type=QuZORecord)
    header["contract_version"] = int(data.get("contract_version", 1))
    return FineTuneLog(header, steps)


register_json_reader("zokernels.quzo_log", from_json_log)


def __getattr__(name: str):
    if name == "QuZOLog":
        warnings.warn("zokernels.quant.quzo.QuZOLog is deprecated: QuZO logs are zokernels.FineTuneLog",
                      DeprecationWarning, stacklevel=2)
        return FineTuneLog
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
