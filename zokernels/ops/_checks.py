"""Validation shared by the op declarations: every op checks its arguments here, once, before dispatch."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .. import contract as C
from ..backends import registry
from ..backends._common import Group, UpdateSpec

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class OpError(ValueError):
    """Bad input to a zokernels op."""


def run(op: str, device: torch.device, backend: str, call: dict | None, *args):
    """Dispatch one validated call of `op` (registry.resolve's policy) and run it."""
    return registry.resolve(op, device, backend, call).fn(*args)


def backend_name(op: str, device: torch.device, backend: str = "auto", call: dict | None = None) -> str:
    """The backend that runs `op` on `device` for this request (raises BackendUnavailable with every reason)."""
    return registry.resolve(op, device, backend, call).backend


# ----------------------------------------------------------------------------- scalars
def f32(x, what: str) -> float:
    """A finite real number within float32 range (the kernels take scalars as float32)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise OpError(f"{what} must be a real number, got {x!r}") from None
    if not math.isfinite(x):
        raise OpError(f"{what} must be finite, got {x}")
    if abs(x) > C.FLOAT32_MAX:
        raise OpError(f"{what} = {x} overflows float32 (|x| <= {C.FLOAT32_MAX:.6g}); the kernels compute in float32")
    return x


def per_tensor(values, n: int, what: str, check) -> list:
    if values is None:
        raise OpError(f"{what} is required")
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values] * n
    values = list(values)
    if len(values) != n:
        raise OpError(f"{what}: expected {n} values (one per tensor), got {len(values)}")
    return [check(v) for v in values]


def coeffs_of(coeffs) -> tuple[float, ...]:
    if isinstance(coeffs, numbers.Number) or getattr(coeffs, "ndim", None) == 0:  # a number, 0-d tensor / array
        raise OpError(f"coeffs must be a sequence of numbers, one per query (e.g. [g]), got {coeffs!r}")
    coeffs = tuple(f32(c, "coeff") for c in coeffs)
    if len(coeffs) > C.MAX_QUERIES:
        raise OpError(f"at most {C.MAX_QUERIES} queries per update, got {len(coeffs)}")
    return coeffs


# ----------------------------------------------------------------------------- tensors
def memory_span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, end byte) of a contiguous tensor's data."""
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def overlapping_pair(tensors: Sequence[torch.Tensor]) -> tuple[int, int] | None:
    """(i, j) of two non-empty tensors that share memory on one device, tensor i's data starting first, or None.
    Sorted by start, any overlap shows between neighbours: if spans a < c overlap, so do a and a + 1."""
    spans = sorted(((str(t.device),) + memory_span(t) + (i,) for i, t in enumerate(tensors) if t.numel()),
                   key=lambda s: s[:2])
    for (d0, _, e0, i), (d1, s1, _, j) in zip(spans, spans[1:]):
        if d0 == d1 and s1 < e0:
            return i, j
    return None


def check_disjoint(tensors: Sequence[torch.Tensor], what: str) -> None:
    """No tensor listed twice and no two tensors sharing memory: an in-place op would apply twice, an
    out-of-place op would read what it already wrote."""
    pair = overlapping_pair(tensors)
    if pair is not None:
        a, b = sorted(pair)
        same = memory_span(tensors[a]) == memory_span(tensors[b])
        raise OpError(f"{what}: tensors {a} and {b} " + ("are the same memory (a tensor listed twice)" if same else
                      "overlap in memory (views of one storage)") + "; each element may be listed once")


def tensor_list(tensors, what: str) -> list[torch.Tensor]:
    """Contiguous floating tensors on real devices, pairwise disjoint."""
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
    check_disjoint(tensors, what)
    return tensors


def keys_of(keys, n: int) -> list[int]:
    if isinstance(keys, int):
        keys = [keys]
    return per_tensor(keys, n, "keys", lambda k: C.check_u64(k, "key"))


def offsets_of(offsets, tensors) -> list[int]:
    if offsets is None:
        return [0] * len(tensors)
    offs = per_tensor(offsets, len(tensors), "offsets", int)
    for o, t in zip(offs, tensors):
        C.check_range(o, t.numel())
    return offs


def outs_for(outs, tensors: list[torch.Tensor], what: str) -> list[torch.Tensor]:
    """outs given by the caller: one contiguous tensor per input, same shape, dtype and device, sharing memory
    with neither another out nor any input."""
    outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
    if len(outs) != len(tensors):
        raise OpError(f"{what}: outs must have one tensor per input")
    for i, (o, t) in enumerate(zip(outs, tensors)):
        if not isinstance(o, torch.Tensor) or o.shape != t.shape or o.dtype != t.dtype or o.device != t.device \
                or not o.is_contiguous():
            raise OpError(f"{what}: outs[{i}] must be contiguous with shape {tuple(t.shape)}, "
                          f"dtype {t.dtype}, device {t.device}")
    check_disjoint(list(tensors) + outs, f"{what} (inputs then outs)")
    return outs


def groups(tensors, keys, offsets, lrs=None, wds=None) -> list[Group]:
    """Split into homogeneous (device, dtype) groups, preserving order inside each group."""
    out: dict[tuple, Group] = {}
    for i, t in enumerate(tensors):
        g = out.setdefault((t.device, t.dtype), Group([], [], []))
        g.tensors.append(t)
        g.keys.append(keys[i])
        g.offsets.append(offsets[i])
        if lrs is not None:
            g.lrs.append(lrs[i])
            g.wds.append(wds[i])
    return [g for g in out.values() if any(t.numel() for t in g.tensors)]


def perturb_args(seed, scale, query, dist, rounding, sr_stream) -> float:
    """Validate the scalar arguments shared by perturb_-like ops; returns scale as a float."""
    C.check_u64(seed, "seed")
    scale = f32(scale, "scale")
    C.check_query(query)
    C.check_dist(dist)
    C.check_rounding(rounding)
    C.check_stream(sr_stream)
    return scale


def update_args(tensors, seed, coeffs, lr, weight_decay, dist, rounding, sr_stream, restore_scale,
                restore_query) -> tuple[UpdateSpec, list[float], list[float]]:
    """Validate zo_update_-like arguments: (UpdateSpec, per-tensor lrs, per-tensor weight decays)."""
    C.check_u64(seed, "seed")
    coeffs = coeffs_of(coeffs)
    lrs = per_tensor(lr, len(tensors), "lr", lambda v: f32(v, "lr"))
    wds = per_tensor(weight_decay, len(tensors), "weight_decay", lambda v: f32(v, "weight_decay"))
    C.check_dist(dist)
    C.check_rounding(rounding)
    C.check_stream(sr_stream)
    if restore_scale is not None:
        restore_scale = f32(restore_scale, "restore_scale")
        C.check_query(restore_query)
    return UpdateSpec(seed, coeffs, dist, rounding, sr_stream, restore_scale, restore_query), lrs, wds


def like_shape(like, device) -> tuple[torch.Size, torch.device]:
    """(shape, device) of a tensor or a shape, `device` overriding the tensor's."""
    if isinstance(like, torch.Tensor):
        return like.shape, like.device if device is None else torch.device(device)
    return torch.Size(like), torch.device(device or "cpu")
