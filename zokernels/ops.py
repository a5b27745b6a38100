"""The op contracts. Each public op is declared here once — shapes, dtypes, what it mutates, errors —
validated here, grouped per (device, dtype), and dispatched to one backend per group.

Scalars (scale, coeffs, lr, weight_decay) are rounded to float32 before use; all arithmetic is
float32; 16-bit results are rounded once, at the end, to nearest or stochastically (contract §4).
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Iterable

import torch

from . import contract as C
from .backends import registry
from .backends._common import Group, UpdateSpec

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKEND_ENV = "ZOKERNELS_BACKEND"

__all__ = ["perturbation", "uniform", "stochastic_round", "perturb_", "perturbed_copy", "zo_update_",
           "masked_perturb_", "masked_perturbed_copy", "masked_zo_update_",
           "philox4x32", "select_backend", "OpError"]


class OpError(ValueError):
    """Bad input to a zokernels op."""


# ----------------------------------------------------------------------------- validation helpers
def _as_list(tensors, what: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = list(tensors)
    if not tensors:
        raise OpError(f"{what}: empty tensor list")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise OpError(f"{what}: item {i} is a {type(t).__name__}, not a tensor")
        if t.dtype not in FLOAT_DTYPES:
            raise OpError(f"{what}: tensor {i} has dtype {t.dtype}; supported: float32, bfloat16, float16 "
                          "(integer and quantized parameters go through zokernels.quant)")
        if not t.is_contiguous():
            raise OpError(f"{what}: tensor {i} (shape {tuple(t.shape)}) is not contiguous; "
                          "call .contiguous() on the parameter once before training")
        if t.device.type == "meta":
            raise OpError(f"{what}: tensor {i} is on the meta device (offloaded weights must be "
                          "materialized on a real device)")
    return tensors


def _per_tensor(values, n: int, what: str, check) -> list:
    if values is None:
        raise OpError(f"{what} is required")
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values] * n
    values = list(values)
    if len(values) != n:
        raise OpError(f"{what}: expected {n} values (one per tensor), got {len(values)}")
    return [check(v) for v in values]


def _f32(x: float, what: str) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise OpError(f"{what} must be a real number, got {x!r}") from None
    if not math.isfinite(x):
        raise OpError(f"{what} must be finite, got {x}")
    return x


def _keys(keys, n: int) -> list[int]:
    if isinstance(keys, int):
        keys = [keys]
    return _per_tensor(keys, n, "keys", lambda k: C.check_u64(k, "key"))


def _offsets(offsets, tensors) -> list[int]:
    if offsets is None:
        return [0] * len(tensors)
    offs = _per_tensor(offsets, len(tensors), "offsets", int)
    for o, t in zip(offs, tensors):
        C.check_range(o, t.numel())
    return offs


def _group(tensors, keys, offsets, lrs=None, wds=None) -> list[Group]:
    """Split into homogeneous (device, dtype) groups, preserving order inside each group."""
    groups: dict[tuple, Group] = {}
    for i, t in enumerate(tensors):
        g = groups.setdefault((t.device, t.dtype), Group([], [], []))
        g.tensors.append(t)
        g.keys.append(keys[i])
        g.offsets.append(offsets[i])
        if lrs is not None:
            g.lrs.append(lrs[i])
            g.wds.append(wds[i])
    return [g for g in groups.values() if any(t.numel() for t in g.tensors)]


def _check_perturb_args(seed, scale, query, dist, rounding, sr_stream) -> float:
    """Validate the scalar arguments shared by perturb_-like ops; returns scale as a float."""
    C.check_u64(seed, "seed")
    scale = _f32(scale, "scale")
    C.check_query(query)
    C.check_dist(dist)
    C.check_rounding(rounding)
    C.check_stream(sr_stream)
    return scale


def _update_args(tensors, seed, coeffs, lr, weight_decay, dist, rounding, sr_stream, restore_scale,
                 restore_query) -> tuple[UpdateSpec, list[float], list[float]]:
    """Validate zo_update_-like arguments: (UpdateSpec, per-tensor lrs, per-tensor weight decays)."""
    C.check_u64(seed, "seed")
    if isinstance(coeffs, numbers.Number) or getattr(coeffs, "ndim", None) == 0:  # a number, 0-d tensor / array
        raise OpError(f"coeffs must be a sequence of numbers, one per query (e.g. [g]), got {coeffs!r}")
    coeffs = tuple(_f32(c, "coeff") for c in coeffs)
    if len(coeffs) > C.MAX_QUERIES:
        raise OpError(f"at most {C.MAX_QUERIES} queries per update, got {len(coeffs)}")
    lrs = _per_tensor(lr, len(tensors), "lr", lambda v: _f32(v, "lr"))
    wds = _per_tensor(weight_decay, len(tensors), "weight_decay", lambda v: _f32(v, "weight_decay"))
    C.check_dist(dist)
    C.check_rounding(rounding)
    C.check_stream(sr_stream)
    if restore_scale is not None:
        restore_scale = _f32(restore_scale, "restore_scale")
        C.check_query(restore_query)
    return UpdateSpec(seed, coeffs, dist, rounding, sr_stream, restore_scale, restore_query), lrs, wds


def _check_outs(outs, tensors: list[torch.Tensor], what: str) -> list[torch.Tensor]:
    """outs given by the caller: one contiguous tensor per input, same shape, dtype and device."""
    outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
    if len(outs) != len(tensors):
        raise OpError(f"{what}: outs must have one tensor per input")
    for i, (o, t) in enumerate(zip(outs, tensors)):
        if o.shape != t.shape or o.dtype != t.dtype or o.device != t.device or not o.is_contiguous():
            raise OpError(f"{what}: outs[{i}] must be contiguous with shape {tuple(t.shape)}, "
                          f"dtype {t.dtype}, device {t.device}")
    return outs


def _requested(backend: str) -> tuple[str, bool]:
    """(the backend asked for, whether $ZOKERNELS_BACKEND chose it): the variable stands in for 'auto'."""
    if backend != "auto":
        return backend, False
    env = os.environ.get(BACKEND_ENV) or "auto"
    return env, env != "auto"


def select_backend(device: torch.device, backend: str = "auto"):
    """The backend module for tensors on `device`: 'auto' tries cuda, triton, reference (in that
    order, first usable); $ZOKERNELS_BACKEND forces one when backend='auto'."""
    backend, forced = _requested(backend)
    if backend == "auto":
        return registry.auto(device)
    try:
        return registry.require(backend, device)
    except registry.BackendUnavailable as e:
        if forced:
            raise registry.BackendUnavailable(f"{e} (backend {backend!r} comes from ${BACKEND_ENV}; unset it to let "
                                              "'auto' choose)") from None
        raise


# ----------------------------------------------------------------------------- ops
def philox4x32(counters: torch.Tensor, key: tuple[int, int], backend: str = "reference") -> torch.Tensor:
    """Raw Philox4x32-10: int64 counters [n, 4] holding uint32 values, key (k0, k1) -> int64 [n, 4].
    For known-answer tests. Mutates nothing."""
    if counters.ndim != 2 or counters.shape[1] != 4:
        raise OpError(f"counters must have shape [n, 4], got {tuple(counters.shape)}")
    if counters.numel() and (int(counters.min()) < 0 or int(counters.max()) > C.MASK32):
        raise OpError("counter words must be uint32 values")
    k0, k1 = (C.check_u64(k, "key word") & C.MASK32 for k in key)
    return select_backend(counters.device, backend).philox(counters, (k0, k1))


def perturbation(like: torch.Tensor | Sequence[int], seed: int, key: int, query: int = 0,
                 dist: str = "gaussian", offset: int = 0, *, stream: int = C.STREAM_Z,
                 device: torch.device | str | None = None, backend: str = "auto") -> torch.Tensor:
    """Materialize z(seed, stream, query, key, j) for j = offset .. offset + numel - 1, float32,
    shaped like `like` (a tensor or a shape). For tests and debugging; allocates the full tensor."""
    if isinstance(like, torch.Tensor):
        shape, dev = like.shape, like.device if device is None else torch.device(device)
    else:
        shape, dev = torch.Size(like), torch.device(device or "cpu")
    out = torch.empty(shape, dtype=torch.float32, device=dev)
    C.check_u64(seed, "seed")
    C.check_u64(key, "key")
    C.check_query(query)
    C.check_stream(stream)
    C.check_dist(dist)
    C.check_range(offset, out.numel())
    if out.numel():
        select_backend(dev, backend).fill_perturbation(out, seed, key, query, stream, dist, offset)
    return out


def uniform(like: torch.Tensor | Sequence[int], seed: int, key: int, query: int = 0, offset: int = 0, *,
            stream: int = C.STREAM_UPDATE_SR, device=None, backend: str = "auto") -> torch.Tensor:
    """Materialize the stochastic-rounding uniforms v in [0, 1) of a stream (float32)."""
    if isinstance(like, torch.Tensor):
        shape, dev = like.shape, like.device if device is None else torch.device(device)
    else:
        shape, dev = torch.Size(like), torch.device(device or "cpu")
    out = torch.empty(shape, dtype=torch.float32, device=dev)
    C.check_u64(seed, "seed")
    C.check_u64(key, "key")
    C.check_query(query)
    C.check_stream(stream)
    C.check_range(offset, out.numel())
    if out.numel():
        select_backend(dev, backend).fill_uniform(out, seed, key, query, stream, offset)
    return out


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int, key: int, query: int = 0,
                     offset: int = 0, *, stream: int = C.STREAM_UPDATE_SR, backend: str = "auto") -> torch.Tensor:
    """SR of float32 x to bfloat16/float16 with the contract's uniforms (new tensor; x unchanged)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise OpError("stochastic_round takes a float32 tensor")
    if dtype not in (torch.bfloat16, torch.float16):
        raise OpError(f"stochastic_round targets bfloat16 or float16, not {dtype}")
    x = x.contiguous()
    C.check_u64(seed, "seed")
    C.check_u64(key, "key")
    C.check_query(query)
    C.check_stream(stream)
    C.check_range(offset, x.numel())
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if x.numel():
        select_backend(x.device, backend).stochastic_round(x, out, seed, key, query, stream, offset)
    return out


@torch.no_grad()  # mutates parameters in place, as torch.optim's step does
def perturb_(tensors: torch.Tensor | Iterable[torch.Tensor], seed: int, scale: float, keys,
             *, query: int = 0, dist: str = "gaussian", offsets=None, rounding: str = "nearest",
             sr_stream: int = C.STREAM_PROBE_SR_POS, backend: str = "auto") -> None:
    """In place: theta <- R(theta + scale * z_query). R: nearest or stochastic (uniforms of
    `sr_stream`, same query) for 16-bit tensors; float32 is exact float32 arithmetic.
    One launch per (device, dtype) group. Mutates `tensors`."""
    tensors = _as_list(tensors, "perturb_")
    keys = _keys(keys, len(tensors))
    offsets = _offsets(offsets, tensors)
    scale = _check_perturb_args(seed, scale, query, dist, rounding, sr_stream)
    for g in _group(tensors, keys, offsets):
        select_backend(g.device, backend).perturb_(g, seed, scale, query, dist, rounding, sr_stream)


@torch.no_grad()  # probe scratch: no autograd history
def perturbed_copy(tensors: torch.Tensor | Iterable[torch.Tensor], seed: int, scale: float, keys, *,
                   query: int = 0, dist: str = "gaussian", offsets=None, rounding: str = "nearest",
                   sr_stream: int = C.STREAM_PROBE_SR_POS, outs=None,
                   backend: str = "auto") -> list[torch.Tensor]:
    """Out of place: out_i = R(theta_i + scale * z_query), same dtype/device as theta_i (the
    drift-free probe's scratch). `outs` (optional) must match each tensor's shape, dtype, device."""
    single = isinstance(tensors, torch.Tensor)
    tensors = _as_list(tensors, "perturbed_copy")
    keys = _keys(keys, len(tensors))
    offsets = _offsets(offsets, tensors)
    scale = _check_perturb_args(seed, scale, query, dist, rounding, sr_stream)
    if outs is None:
        outs = [torch.empty_like(t) for t in tensors]
    else:
        outs = _check_outs(outs, tensors, "perturbed_copy")
    index = {id(t): i for i, t in enumerate(tensors)}
    for g in _group(tensors, keys, offsets):
        g_outs = [outs[index[id(t)]] for t in g.tensors]
        select_backend(g.device, backend).perturbed_copy(g, g_outs, seed, scale, query, dist, rounding,
                                                         sr_stream)
    return outs[0] if single else outs


@torch.no_grad()  # mutates parameters in place, as torch.optim's step does
def zo_update_(tensors: torch.Tensor | Iterable[torch.Tensor], seed: int, keys, coeffs: Sequence[float],
               lr, weight_decay=0.0, *, dist: str = "gaussian", offsets=None, rounding: str = "stochastic",
               restore_scale: float | None = None, restore_query: int = 0,
               sr_stream: int = C.STREAM_UPDATE_SR, backend: str = "auto") -> None:
    """In place, one pass: theta <- R(theta' - lr * (sum_q coeffs[q] * z_q + weight_decay * theta')),
    theta' = theta + restore_scale * z_{restore_query} (the fused restore of an in-place probe) or
    theta. z_q uses query q = 0..len(coeffs)-1 of `seed`; R's uniforms: `sr_stream`, query 0.
    lr and weight_decay: a number or one per tensor. Mutates `tensors`."""
    tensors = _as_list(tensors, "zo_update_")
    keys = _keys(keys, len(tensors))
    offsets = _offsets(offsets, tensors)
    spec, lrs, wds = _update_args(tensors, seed, coeffs, lr, weight_decay, dist, rounding, sr_stream,
                                  restore_scale, restore_query)
    for g in _group(tensors, keys, offsets, lrs, wds):
        select_backend(g.device, backend).zo_update_(g, spec)


# ----------------------------------------------------------------------------- masked ops (MaZO)
MASKED_OPS = ("masked_perturb_", "masked_zo_update_")


def _masked_backend(device: torch.device, backend: str):
    """Like select_backend, but only backends that implement the masked ops. A requested backend
    without them (a CUDA module built before the masked kernels existed) falls back to the 'auto'
    choice among those that have them — deterministically, so replay with the same request and the
    same build reproduces training."""
    if _requested(backend)[0] == "auto":
        return registry.auto(device, needs=MASKED_OPS)
    mod = select_backend(device, backend)  # a forced backend's errors name $ZOKERNELS_BACKEND
    if all(hasattr(mod, op) for op in MASKED_OPS):
        return mod
    return registry.auto(device, needs=MASKED_OPS)


def _masks(masks, tensors: list[torch.Tensor], what: str) -> list:
    """One mask per tensor (duck-typed zokernels.mazo.ParamMask: kind, shape, index, block), same
    shape, index on the tensor's device."""
    if not isinstance(masks, (list, tuple)):
        masks = [masks]
    masks = list(masks)
    if len(masks) != len(tensors):
        raise OpError(f"{what}: expected {len(tensors)} masks (one per tensor), got {len(masks)}")
    for i, (m, t) in enumerate(zip(masks, tensors)):
        if not all(hasattr(m, a) for a in ("kind", "shape", "index", "block")):
            raise OpError(f"{what}: mask {i} is a {type(m).__name__}, not a zokernels.mazo.ParamMask")
        if tuple(m.shape) != tuple(t.shape):
            raise OpError(f"{what}: mask {i} has shape {tuple(m.shape)}, its tensor {tuple(t.shape)}")
        if m.index.device != t.device:
            raise OpError(f"{what}: mask {i} lives on {m.index.device}, its tensor on {t.device}; "
                          "move the mask with mask.to(device)")
    return masks


def _masked_groups(tensors, masks, keys, offsets, lrs=None, wds=None):
    """(Group, masks of the group) per (device, dtype)."""
    index = {id(t): i for i, t in enumerate(tensors)}
    return [(g, [masks[index[id(t)]] for t in g.tensors]) for g in _group(tensors, keys, offsets, lrs, wds)]


@torch.no_grad()  # mutates parameters in place, as torch.optim's step does
def masked_perturb_(tensors, masks, seed: int, scale: float, keys, *, query: int = 0, dist: str = "gaussian",
                    offsets=None, rounding: str = "nearest", sr_stream: int = C.STREAM_PROBE_SR_POS,
                    backend: str = "auto") -> None:
    """In place, masked elements only: theta[m] <- R(theta[m] + scale * z_query[m]); z[m] is the dense
    contract's z of (key, j = offset + m); unmasked elements are not read or written. Mutates `tensors`."""
    tensors = _as_list(tensors, "masked_perturb_")
    masks = _masks(masks, tensors, "masked_perturb_")
    keys = _keys(keys, len(tensors))
    offsets = _offsets(offsets, tensors)
    scale = _check_perturb_args(seed, scale, query, dist, rounding, sr_stream)
    for g, gm in _masked_groups(tensors, masks, keys, offsets):
        _masked_backend(g.device, backend).masked_perturb_(g, gm, None, seed, scale, query, dist, rounding,
                                                           sr_stream)


@torch.no_grad()  # probe scratch: no autograd history
def masked_perturbed_copy(tensors, masks, seed: int, scale: float, keys, *, query: int = 0,
                          dist: str = "gaussian", offsets=None, rounding: str = "nearest",
                          sr_stream: int = C.STREAM_PROBE_SR_POS, outs=None, backend: str = "auto"):
    """out[m] = R(theta[m] + scale * z_query[m]) on masked elements only.

    outs=None: out starts as a clone of theta (a dense copy: its traffic is the full tensor's).
    outs given: only the masked elements of outs are written — the caller keeps outs equal to theta
    elsewhere (a persistent probe scratch: theta's unmasked elements never change under masked
    training, so traffic per probe scales with the mask)."""
    single = isinstance(tensors, torch.Tensor)
    tensors = _as_list(tensors, "masked_perturbed_copy")
    masks = _masks(masks, tensors, "masked_perturbed_copy")
    keys = _keys(keys, len(tensors))
    offsets = _offsets(offsets, tensors)
    scale = _check_perturb_args(seed, scale, query, dist, rounding, sr_stream)
    if outs is None:
        outs = [t.clone() for t in tensors]
    else:
        outs = _check_outs(outs, tensors, "masked_perturbed_copy")
    index = {id(t): i for i, t in enumerate(tensors)}
    for g, gm in _masked_groups(tensors, masks, keys, offsets):
        g_outs = [outs[index[id(t)]] for t in g.tensors]
        _masked_backend(g.device, backend).masked_perturb_(g, gm, g_outs, seed, scale, query, dist, rounding,
                                                           sr_stream)
    return outs[0] if single else outs


@torch.no_grad()  # mutates parameters in place, as torch.optim's step does
def masked_zo_update_(tensors, masks, seed: int, keys, coeffs: Sequence[float], lr, weight_decay=0.0, *,
                      dist: str = "gaussian", offsets=None, rounding: str = "stochastic",
                      restore_scale: float | None = None, restore_query: int = 0,
                      sr_stream: int = C.STREAM_UPDATE_SR, backend: str = "auto") -> None:
    """zo_update_ on masked elements only (weight decay too): for each masked m,
    theta[m] <- R(theta'[m] - lr * (sum_q coeffs[q] z_q[m] + wd * theta'[m])), theta' = theta
    (+ restore_scale * z_{restore_query}); unmasked elements are never read or written."""
    tensors = _as_list(tensors, "masked_zo_update_")
    masks = _masks(masks, tensors, "masked_zo_update_")
    keys = _keys(keys, len(tensors))
    offsets = _offsets(offsets, tensors)
    spec, lrs, wds = _update_args(tensors, seed, coeffs, lr, weight_decay, dist, rounding, sr_stream,
                                  restore_scale, restore_query)
    for g, gm in _masked_groups(tensors, masks, keys, offsets, lrs, wds):
        _masked_backend(g.device, backend).masked_zo_update_(g, gm, spec)
