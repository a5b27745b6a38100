"""Dense ops of the perturbation contract: declared here once (signature, contract, validation), run by the
backend the registry resolves (zokernels.backends.registry).

Scalars (scale, coeffs, lr, weight_decay) are rounded to float32 before use; all arithmetic is float32;
16-bit results are rounded once, at the end, to nearest or stochastically (contract section 4).
Backend kernels (registered under the op's name):
    philox(counters, key)                                             -> int64 [n, 4]
    perturbation(out, seed, key, query, stream, dist, offset)          fills float32 out with z
    uniform(out, seed, key, query, stream, offset)                     fills float32 out with v
    stochastic_round(x, out, seed, key, query, stream, offset)         out = SR(x) (16-bit)
    perturb_(group, seed, scale, query, dist, rounding, sr_stream)     in place
    perturbed_copy(group, outs, seed, scale, query, dist, rounding, sr_stream)
    zo_update_(group, spec: UpdateSpec)                                in place
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Iterable

import torch

from .. import contract as C
from ..backends import registry
from . import _checks as K
from ._checks import OpError

for _op, _summary in (
        ("philox", "raw Philox4x32-10 of int64 counters [n, 4] (uint32 values) -> int64 [n, 4]"),
        ("perturbation", "z(seed, stream, query, key, offset + i) into a new float32 tensor"),
        ("uniform", "stochastic-rounding uniforms v in [0, 1) into a new float32 tensor"),
        ("stochastic_round", "SR of float32 x to bfloat16/float16 with the contract's uniforms"),
        ("perturb_", "theta <- R(theta + scale * z_query), in place, one pass per (device, dtype) group"),
        ("perturbed_copy", "out = R(theta + scale * z_query), out of place (drift-free probe scratch)"),
        ("zo_update_", "theta <- R(theta' - lr (sum_q c_q z_q + wd theta')), in place, restore fused")):
    registry.declare(_op, _summary)


def _float32_target(like, device, seed: int, key: int, query: int, stream: int, offset: int) -> torch.Tensor:
    """The float32 tensor a materializing op fills, after checking the counter fields it will use."""
    shape, dev = K.like_shape(like, device)
    out = torch.empty(shape, dtype=torch.float32, device=dev)
    C.check_u64(seed, "seed")
    C.check_u64(key, "key")
    C.check_query(query)
    C.check_stream(stream)
    C.check_range(offset, out.numel())
    return out


def philox4x32(counters: torch.Tensor, key: tuple[int, int], backend: str = "reference") -> torch.Tensor:
    """Raw Philox4x32-10: int64 counters [n, 4] holding uint32 values, key (k0, k1) -> int64 [n, 4].
    For known-answer tests. Mutates nothing."""
    if counters.ndim != 2 or counters.shape[1] != 4:
        raise OpError(f"counters must have shape [n, 4], got {tuple(counters.shape)}")
    if counters.numel() and (int(counters.min()) < 0 or int(counters.max()) > C.MASK32):
        raise OpError("counter words must be uint32 values")
    k0, k1 = (C.check_u64(k, "key word") & C.MASK32 for k in key)
    return K.run("philox", counters.device, backend, None, counters, (k0, k1))


def perturbation(like: torch.Tensor | Sequence[int], seed: int, key: int, query: int = 0,
                 dist: str = "gaussian", offset: int = 0, *, stream: int = C.STREAM_Z,
                 device: torch.device | str | None = None, backend: str = "auto") -> torch.Tensor:
    """Materialize z(seed, stream, query, key, j) for j = offset .. offset + numel - 1, float32,
    shaped like `like` (a tensor or a shape). For tests and debugging; allocates the full tensor."""
    out = _float32_target(like, device, seed, key, query, stream, offset)
    C.check_dist(dist)
    if out.numel():
        K.run("perturbation", out.device, backend, None, out, seed, key, query, stream, dist, offset)
    return out


def uniform(like: torch.Tensor | Sequence[int], seed: int, key: int, query: int = 0, offset: int = 0, *,
            stream: int = C.STREAM_UPDATE_SR, device=None, backend: str = "auto") -> torch.Tensor:
    """Materialize the stochastic-rounding uniforms v in [0, 1) of a stream (float32)."""
    out = _float32_target(like, device, seed, key, query, stream, offset)
    if out.numel():
        K.run("uniform", out.device, backend, None, out, seed, key, query, stream, offset)
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
        K.run("stochastic_round", x.device, backend, {"dtype": dtype}, x, out, seed, key, query, stream, offset)
    return out


@torch.no_grad()  # mutates parameters in place, as torch.optim's step does
def perturb_(tensors: torch.Tensor | Iterable[torch.Tensor], seed: int, scale: float, keys,
             *, query: int = 0, dist: str = "gaussian", offsets=None, rounding: str = "nearest",
             sr_stream: int = C.STREAM_PROBE_SR_POS, backend: str = "auto") -> None:
    """In place: theta <- R(theta + scale * z_query). R: nearest or stochastic (uniforms of
    `sr_stream`, same query) for 16-bit tensors; float32 is exact float32 arithmetic.
    One launch per (device, dtype) group. Mutates `tensors`."""
    tensors = K.tensor_list(tensors, "perturb_")
    keys = K.keys_of(keys, len(tensors))
    offsets = K.offsets_of(offsets, tensors)
    scale = K.perturb_args(seed, scale, query, dist, rounding, sr_stream)
    for g in K.groups(tensors, keys, offsets):
        K.run("perturb_", g.device, backend, {"dtype": g.dtype}, g, seed, scale, query, dist, rounding, sr_stream)


@torch.no_grad()  # probe scratch: no autograd history
def perturbed_copy(tensors: torch.Tensor | Iterable[torch.Tensor], seed: int, scale: float, keys, *,
                   query: int = 0, dist: str = "gaussian", offsets=None, rounding: str = "nearest",
                   sr_stream: int = C.STREAM_PROBE_SR_POS, outs=None,
                   backend: str = "auto") -> list[torch.Tensor]:
    """Out of place: out_i = R(theta_i + scale * z_query), same dtype/device as theta_i (the
    drift-free probe's scratch). `outs` (optional) must match each tensor's shape, dtype, device and share
    memory with no input and no other out."""
    single = isinstance(tensors, torch.Tensor)
    tensors = K.tensor_list(tensors, "perturbed_copy")
    keys = K.keys_of(keys, len(tensors))
    offsets = K.offsets_of(offsets, tensors)
    scale = K.perturb_args(seed, scale, query, dist, rounding, sr_stream)
    outs = [torch.empty_like(t) for t in tensors] if outs is None else K.outs_for(outs, tensors, "perturbed_copy")
    index = {id(t): i for i, t in enumerate(tensors)}
    for g in K.groups(tensors, keys, offsets):
        g_outs = [outs[index[id(t)]] for t in g.tensors]
        K.run("perturbed_copy", g.device, backend, {"dtype": g.dtype}, g, g_outs, seed, scale, query, dist,
              rounding, sr_stream)
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
    tensors = K.tensor_list(tensors, "zo_update_")
    keys = K.keys_of(keys, len(tensors))
    offsets = K.offsets_of(offsets, tensors)
    spec, lrs, wds = K.update_args(tensors, seed, coeffs, lr, weight_decay, dist, rounding, sr_stream,
                                   restore_scale, restore_query)
    for g in K.groups(tensors, keys, offsets, lrs, wds):
        K.run("zo_update_", g.device, backend, {"dtype": g.dtype}, g, spec)
