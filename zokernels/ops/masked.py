"""Masked ops (MaZO): the dense contract on masked elements only, declared once, dispatched by the registry.

Masks are duck-typed (kind "rows" | "blocks" | "bits", shape, index, block; zokernels.mazo.ParamMask).
Backend kernels (registered under the op's name):
    masked_perturb_(group, masks, None, seed, scale, query, dist, rounding, sr_stream)     in place
    masked_perturbed_copy(group, masks, outs, seed, scale, query, dist, rounding, sr_stream)
    masked_zo_update_(group, masks, spec: UpdateSpec)                                       in place
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import contract as C
from ..backends import registry
from . import _checks as K
from ._checks import OpError

MASKED_OPS = ("masked_perturb_", "masked_perturbed_copy", "masked_zo_update_")
for _op, _summary in (
        ("masked_perturb_", "theta[m] <- R(theta[m] + scale * z_query[m]) on masked elements, in place"),
        ("masked_perturbed_copy", "out[m] = R(theta[m] + scale * z_query[m]); out elsewhere untouched"),
        ("masked_zo_update_", "zo_update_ on masked elements only (weight decay too)")):
    registry.declare(_op, _summary)


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
    """(Group, masks of the group, call properties) per (device, dtype)."""
    index = {id(t): i for i, t in enumerate(tensors)}
    out = []
    for g in K.groups(tensors, keys, offsets, lrs, wds):
        gm = [masks[index[id(t)]] for t in g.tensors]
        out.append((g, gm, {"dtype": g.dtype, "kinds": frozenset(m.kind for m in gm)}))
    return out


@torch.no_grad()  # mutates parameters in place, as torch.optim's step does
def masked_perturb_(tensors, masks, seed: int, scale: float, keys, *, query: int = 0, dist: str = "gaussian",
                    offsets=None, rounding: str = "nearest", sr_stream: int = C.STREAM_PROBE_SR_POS,
                    backend: str = "auto") -> None:
    """In place, masked elements only: theta[m] <- R(theta[m] + scale * z_query[m]); z[m] is the dense
    contract's z of (key, j = offset + m); unmasked elements are not read or written. Mutates `tensors`."""
    tensors = K.tensor_list(tensors, "masked_perturb_")
    masks = _masks(masks, tensors, "masked_perturb_")
    keys = K.keys_of(keys, len(tensors))
    offsets = K.offsets_of(offsets, tensors)
    scale = K.perturb_args(seed, scale, query, dist, rounding, sr_stream)
    for g, gm, call in _masked_groups(tensors, masks, keys, offsets):
        K.run("masked_perturb_", g.device, backend, call, g, gm, None, seed, scale, query, dist, rounding, sr_stream)


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
    tensors = K.tensor_list(tensors, "masked_perturbed_copy")
    masks = _masks(masks, tensors, "masked_perturbed_copy")
    keys = K.keys_of(keys, len(tensors))
    offsets = K.offsets_of(offsets, tensors)
    scale = K.perturb_args(seed, scale, query, dist, rounding, sr_stream)
    outs = [t.clone() for t in tensors] if outs is None else K.outs_for(outs, tensors, "masked_perturbed_copy")
    index = {id(t): i for i, t in enumerate(tensors)}
    for g, gm, call in _masked_groups(tensors, masks, keys, offsets):
        g_outs = [outs[index[id(t)]] for t in g.tensors]
        K.run("masked_perturbed_copy", g.device, backend, call, g, gm, g_outs, seed, scale, query, dist, rounding,
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
    tensors = K.tensor_list(tensors, "masked_zo_update_")
    masks = _masks(masks, tensors, "masked_zo_update_")
    keys = K.keys_of(keys, len(tensors))
    offsets = K.offsets_of(offsets, tensors)
    spec, lrs, wds = K.update_args(tensors, seed, coeffs, lr, weight_decay, dist, rounding, sr_stream,
                                   restore_scale, restore_query)
    for g, gm, call in _masked_groups(tensors, masks, keys, offsets, lrs, wds):
        K.run("masked_zo_update_", g.device, backend, call, g, gm, spec)
