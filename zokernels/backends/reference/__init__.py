"""Reference backend: pure torch, any device, chunked so that extra memory is O(CHUNK)."""
from __future__ import annotations

import torch

from .._common import Group, UpdateSpec
from ..registry import register
from . import philox as P

NAME = "reference"
CHUNK = 1 << 20  # elements per chunk: ~40 MB of int64/float32 temporaries at most


def unavailable_reason(device: torch.device) -> str | None:
    return None


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(CHUNK, n - start)


@register("philox", NAME)
def philox(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of int64 counters [n, 4] (uint32 values) -> int64 [n, 4]."""
    c = counters.to(torch.int64)
    out = P.philox4x32(c[:, 0], c[:, 1], c[:, 2], c[:, 3], key[0], key[1])
    return torch.stack(out, dim=1)


@register("perturbation", NAME)
def fill_perturbation(out: torch.Tensor, seed: int, key: int, query: int, stream: int, dist: str,
                      offset: int) -> None:
    flat = out.view(-1)
    for start, n in _chunks(flat.numel()):
        z = P.z_range(offset + start, n, seed, key, query, stream, dist, out.device)
        flat[start:start + n].copy_(z)


@register("uniform", NAME)
def fill_uniform(out: torch.Tensor, seed: int, key: int, query: int, stream: int, offset: int) -> None:
    flat = out.view(-1)
    for start, n in _chunks(flat.numel()):
        flat[start:start + n].copy_(P.uniform_range(offset + start, n, seed, key, query, stream, out.device))


@register("stochastic_round", NAME)
def stochastic_round(x: torch.Tensor, out: torch.Tensor, seed: int, key: int, query: int, stream: int,
                     offset: int) -> None:
    src, dst = x.view(-1), out.view(-1)
    for start, n in _chunks(src.numel()):
        v = P.uniform_range(offset + start, n, seed, key, query, stream, x.device)
        dst[start:start + n].copy_(P.stochastic_round(src[start:start + n].to(torch.float32), v, out.dtype))


def _perturbed(theta: torch.Tensor, start: int, n: int, offset: int, key: int, seed: int, scale: float,
               query: int, dist: str, rounding: str, sr_stream: int, dtype: torch.dtype) -> torch.Tensor:
    z = P.z_range(offset + start, n, seed, key, query, 0, dist, theta.device)
    x = theta.to(torch.float32) + z * scale
    return P.round_to(x, dtype, rounding,
                      lambda: P.uniform_range(offset + start, n, seed, key, query, sr_stream, theta.device))


@register("perturb_", NAME)
def perturb_(group: Group, seed: int, scale: float, query: int, dist: str, rounding: str,
             sr_stream: int) -> None:
    for t, key, off in zip(group.tensors, group.keys, group.offsets):
        flat = t.view(-1)
        for start, n in _chunks(flat.numel()):
            chunk = flat[start:start + n]
            chunk.copy_(_perturbed(chunk, start, n, off, key, seed, scale, query, dist, rounding,
                                   sr_stream, t.dtype))


@register("perturbed_copy", NAME)
def perturbed_copy(group: Group, outs: list[torch.Tensor], seed: int, scale: float, query: int, dist: str,
                   rounding: str, sr_stream: int) -> None:
    for t, out, key, off in zip(group.tensors, outs, group.keys, group.offsets):
        src, dst = t.view(-1), out.view(-1)
        for start, n in _chunks(src.numel()):
            dst[start:start + n].copy_(_perturbed(src[start:start + n], start, n, off, key, seed, scale,
                                                  query, dist, rounding, sr_stream, out.dtype))


@register("zo_update_", NAME)
def zo_update_(group: Group, spec: UpdateSpec) -> None:
    for t, key, off, lr, wd in zip(group.tensors, group.keys, group.offsets, group.lrs, group.wds):
        flat = t.view(-1)
        for start, n in _chunks(flat.numel()):
            chunk = flat[start:start + n]
            new = P.zo_updated(chunk.to(torch.float32),
                               lambda q: P.z_range(off + start, n, spec.seed, key, q, 0, spec.dist, t.device),
                               spec.coeffs, lr, wd, spec.restore_scale, spec.restore_query)
            chunk.copy_(P.round_to(new, t.dtype, spec.rounding,
                                   lambda: P.uniform_range(off + start, n, spec.seed, key, 0, spec.sr_stream,
                                                           t.device)))
from . import masked, quant, quant_matmul  # noqa: E402,F401  (their ops register on import)
