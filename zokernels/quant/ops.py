"""QuZO ops on QuantizedWeight: quantization, out-of-place probe weights, the in-place update (thin wrappers
of the declared ops of zokernels.ops.quant, where the contract, the validation and the backend dispatch
live), the CPU step cache, and the reversible in-place perturbation of QuZO's inplace probe mode.

Step cache (CPU): QuZO keeps each layer's z and Q1 offsets for a step, because the reference Philox
dominates a CPU step: with the cache, 3 Philox passes per layer and query instead of 7. Those paths
(`cache=` of probe_delta, probe_values, update_target, apply_update_; also sr_seed / rounding_seed, which
redraw one rounding at a fixed z for tests) materialize z and the uniforms with zokernels.ops and apply
the reference backend's element functions (zokernels/numerics.py) to them, so they compute the kernels'
results bit for bit (Rademacher z; tested).

The quantized matmuls and activation quantization live in zokernels.quant.matmul (W8A8 names re-exported
here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import contract as C
from .. import numerics as N
from .. import ops
from ..ops import quant as OQ
from . import formats as F
from .matmul import activation_uniforms, int_mm_available, quantize_activations, w8a8_matmul  # noqa: F401

UPDATE_FORMS = OQ.UPDATE_FORMS
QUANT_OPS = OQ.QUANT_OPS
new_counter = OQ.new_counter
grid_dtype = OQ.grid_dtype


def quant_backend(device: torch.device, backend: str = "auto") -> str:
    """The name of the backend that runs the quantized-weight ops (QUANT_OPS) on `device` for this request
    (the registry's policy: 'auto' or $ZOKERNELS_BACKEND); BackendUnavailable, with every backend's reason,
    if the requested one cannot run them."""
    for op in QUANT_OPS:
        name = ops.backend_name(op, device, backend)
    return name


def _scalar(x: float, like: torch.Tensor) -> torch.Tensor:
    """x rounded to float32, as a 0-dim tensor on like's device (on CUDA, `t / python_scalar` multiplies by a
    reciprocal)."""
    return torch.tensor(C.round_f32(float(x)), dtype=torch.float32, device=like.device)


# ----------------------------------------------------------------------------- quantization
def quantize_into(w: torch.Tensor, scale: torch.Tensor, fmt: str, group_size: int, rounding: str, seed: int,
                  key: int, out: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """out <- storage of R(w / s) (zokernels.ops.quant_quantize); returns out."""
    return ops.quant_quantize(w, scale, fmt, group_size, rounding, seed, key, out, backend=backend)


# ----------------------------------------------------------------------------- probes
def _z(qw: F.QuantizedWeight, seed: int, key: int, query: int, dist: str, cache: dict | None = None) -> torch.Tensor:
    """z of (seed, query, key) over the logical weight; `cache` (a dict that lives for one step) keeps
    it for the other probe and the update."""
    if cache is None:
        return ops.perturbation(qw.shape, seed, key, query, dist, device=qw.scale.device)
    k = ("z", seed, key, query, dist)
    if k not in cache:
        cache[k] = ops.perturbation(qw.shape, seed, key, query, dist, device=qw.scale.device)
    return cache[k]


def _v(qw: F.QuantizedWeight, seed: int, key: int, query: int, stream: int) -> torch.Tensor:
    return ops.uniform(qw.shape, seed, key, query, stream=stream, device=qw.scale.device)


def scaled_direction(qw: F.QuantizedWeight, seed: int, key: int, query: int, eps: float,
                     dist: str = "gaussian", cache: dict | None = None) -> torch.Tensor:
    """d = (eps * z_query) / s, float32 [N, K]: the perturbation in grid units."""
    z = _z(qw, seed, key, query, dist, cache)
    return N.direction(z, _scalar(eps, z), F.scale_full(qw))


def probe_delta(qw: F.QuantizedWeight, seed: int, key: int, query: int, eps: float, dist: str = "gaussian",
                sr_seed: int | None = None, cache: dict | None = None) -> torch.Tensor:
    """Integer formats: D1 = Q1(eps z / s) = SRI(d) with the uniforms of STREAM_QUZO_PROBE (int32).
    sr_seed (default: seed) only exists so tests can redraw Q1 at a fixed z."""
    if qw.fmt == "fp8":
        raise ValueError("fp8 probes are not an integer offset; use probe_values")
    k = ("d1", seed, key, query, dist, float(eps), sr_seed)
    if cache is not None and k in cache:
        return cache[k]
    d = scaled_direction(qw, seed, key, query, eps, dist, cache)
    out = N.sr_int(d, _v(qw, seed if sr_seed is None else sr_seed, key, query, C.STREAM_QUZO_PROBE))
    if cache is not None:
        cache[k] = out
    return out


@dataclass
class ProbeResult:
    values: torch.Tensor    # grid values of the probe weights (int32, or float32 e4m3 values)
    saturated: int          # elements clamped at +-qmax


def probe_weights(qw: F.QuantizedWeight, seed: int, key: int, query: int, eps: float, sign: int,
                  dist: str = "gaussian", *, out_dtype: torch.dtype | None = None,
                  saturated: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The weights of probe (query, sign), out of place, by the backend kernel (zokernels.ops.quant_probe):
    grid values (out_dtype None: int8 for int formats, float8_e4m3fn for fp8) or dequantized values * s
    (out_dtype float32/bfloat16/float16), [N, K]; int4 with out_dtype uint8: packed like qw.q, [N, Kp / 2].
    Clamped elements are added to `saturated` (int64 [1]) if given."""
    return ops.quant_probe(qw.q, qw.scale, qw.fmt, qw.shape, qw.group_size, seed, key, query, eps, sign, dist,
                           out_dtype=out_dtype, saturated=saturated, backend=backend)


def probe_values(qw: F.QuantizedWeight, seed: int, key: int, query: int, eps: float, sign: int,
                 dist: str = "gaussian", sr_seed: int | None = None, cache: dict | None = None,
                 backend: str = "auto") -> ProbeResult:
    """The weights of probe (query, sign), as grid values, computed out of place (drift-free):
    int: clamp(q + sign * D1, -qmax, qmax); fp8: SR_e4m3(q + sign * d) (uniforms of STREAM_QUZO_PROBE).
    Without cache and sr_seed: the backend kernel (probe_weights); otherwise the step-cache path."""
    if cache is None and sr_seed is None:
        counter = new_counter(qw.q.device)
        vals = probe_weights(qw, seed, key, query, eps, sign, dist, saturated=counter, backend=backend)
        return ProbeResult(vals.to(torch.float32 if qw.fmt == "fp8" else torch.int32), int(counter))
    q = F.values(qw)
    if qw.fmt == "fp8":
        d = scaled_direction(qw, seed, key, query, eps, dist, cache)
        v = _v(qw, seed if sr_seed is None else sr_seed, key, query, C.STREAM_QUZO_PROBE)
        p, hit = N.probe_fp8(q, d, v, sign)
        return ProbeResult(p.to(torch.float32), int(hit.sum()))
    p, hit = N.probe_int(q, probe_delta(qw, seed, key, query, eps, dist, sr_seed, cache), sign, int(qw.qmax))
    return ProbeResult(p, int(hit.sum()))


# ----------------------------------------------------------------------------- in place, reversible
@dataclass
class Saturation:
    """What clamping destroyed in an in-place perturbation: flat indices and their values before."""

    index: torch.Tensor
    before: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.index.numel())


def perturb_int_(qw: F.QuantizedWeight, delta: torch.Tensor) -> Saturation:
    """In place: q <- clamp(q + delta, -qmax, qmax) (int formats). Returns the clamped elements'
    previous values, so that restore_int_ undoes it bitwise even where it saturated."""
    if qw.fmt == "fp8":
        raise ValueError("in-place reversible perturbation needs an integer format (int8, int4)")
    q = F.values(qw)
    clamped, hit = N.probe_int(q, delta.to(torch.int32), 1, int(qw.qmax))
    hit = hit.reshape(-1).nonzero().reshape(-1)
    sat = Saturation(hit, q.reshape(-1)[hit].clone())
    F.store_values_(qw, clamped)
    return sat


def restore_int_(qw: F.QuantizedWeight, delta: torch.Tensor, saturation: Saturation) -> None:
    """Undo perturb_int_(qw, delta): q <- q - delta, then the clamped elements get their old values."""
    q = F.values(qw) - delta.to(torch.int32)
    if saturation.count:
        q.view(-1)[saturation.index] = saturation.before
    F.store_values_(qw, q)


# ----------------------------------------------------------------------------- the update
def update_target(qw: F.QuantizedWeight, seed: int, key: int, coeffs: Sequence[float], lr: float, eps: float,
                  form: str = "single", dist: str = "gaussian", cache: dict | None = None,
                  rounding_seed: int | None = None) -> torch.Tensor:
    """x = the update in grid units before its final rounding (float32 [N, K]); coeffs c_q = mu_q / n.

    single: x = lr * (sum_q c_q z_q) / s                      (one rounding later: unbiased, less variance)
    paper : x = lr * (sum_q c_q D2_q) / eps, D2_q = Q2(eps z_q / s) (uniforms: STREAM_QUZO_UPDATE, q)
    (sums start from the first term, as in the float ops.) rounding_seed (default seed) redraws Q2 at a
    fixed z (variance tests). Materialized here; the backends fuse it into quant_update_."""
    OQ.check_form(form)
    s = F.scale_full(qw)
    acc = None
    for q, c in enumerate(coeffs):
        if form == "single":
            z = _z(qw, seed, key, q, dist, cache)
            term = z * _scalar(c, z)
        else:
            d = scaled_direction(qw, seed, key, q, eps, dist, cache)
            v = _v(qw, seed if rounding_seed is None else rounding_seed, key, q, C.STREAM_QUZO_UPDATE)
            term = N.paper_term(qw.fmt, d, v, _scalar(c, d))
        acc = term if acc is None else acc + term
    return N.update_target(form, acc, _scalar(lr, s), _scalar(eps, s), s)


def update_values(qw: F.QuantizedWeight, x: torch.Tensor, seed: int, key: int,
                  rounding_seed: int | None = None) -> ProbeResult:
    """The new grid values q' = Q(q - x), Q = SR with the uniforms of STREAM_UPDATE_SR (query 0):
    int: q - SRI(x) clamped (the rounded step is what a replay recomputes); fp8: SR_e4m3(q - x)."""
    v = _v(qw, seed if rounding_seed is None else rounding_seed, key, 0, C.STREAM_UPDATE_SR)
    new, hit = N.update_values(qw.fmt, F.values(qw), x, v)
    return ProbeResult(new.to(torch.float32) if qw.fmt == "fp8" else new, int(hit.sum()))


def update_(qw: F.QuantizedWeight, seed: int, key: int, coeffs: Sequence[float], lr: float, eps: float,
            form: str = "single", dist: str = "gaussian", *, saturated: torch.Tensor | None = None,
            backend: str = "auto") -> torch.Tensor:
    """q <- Q(q - update_target(...)) in place by the backend kernel (zokernels.ops.quant_update_, one pass,
    no materialized z); saturated elements are added to `saturated` (int64 [1], returned; no host sync)."""
    return ops.quant_update_(qw.q, qw.scale, qw.fmt, qw.shape, qw.group_size, seed, key, coeffs, lr, eps, form,
                             dist, saturated=saturated, backend=backend)


def apply_update_(qw: F.QuantizedWeight, seed: int, key: int, coeffs: Sequence[float], lr: float, eps: float,
                  form: str = "single", dist: str = "gaussian", cache: dict | None = None,
                  backend: str = "auto") -> int:
    """q <- Q(q - update_target(...)) in place; returns the number of saturated elements. With a step
    cache (CPU) materialized here from the cached z; otherwise the backend kernel (update_)."""
    if cache is None:
        return int(update_(qw, seed, key, coeffs, lr, eps, form, dist, backend=backend))
    res = update_values(qw, update_target(qw, seed, key, coeffs, lr, eps, form, dist, cache), seed, key)
    F.store_values_(qw, res.values)
    return res.saturated
