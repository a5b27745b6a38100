"""Multi-process ZO on torch.distributed: process groups, the per-step loss all-reduce, and the global
element offsets of sharded (DTensor / FSDP2) parameters.

Data parallel: every rank draws the same z (same step seed, no communication), runs its probes on its
own micro-batch, and the only collective of a step is one all-reduce of the probe losses in float64:

    L_q = (1/W) * sum_r L_q^(r)      (2 scalars per query; Q+1 for one-sided SPSA)

so every rank computes the same g_q and applies the same update: replicas stay bitwise identical.
With `spread_queries`, rank r evaluates the queries q = r, r + W, ... only, and the all-reduce sums a
vector that holds each query's losses on the rank that evaluated it and zeros elsewhere.

Sharded parameters: a rank holds the local tensor of each DTensor parameter. Its element 0 is global
element `offset` of the full tensor (row offset * row numel for Shard(0)); the kernels take that
offset, so z, the probes' and the update's stochastic rounding are those of the unsharded run.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Sequence

import torch

from . import contract as C


class DistributedStepError(RuntimeError):
    """A collective of a ZO step failed: a rank died, timed out, or took a different code path."""


class UnsupportedLayout(ValueError):
    """A DTensor placement whose local shard is not one contiguous range of global indices."""


def _dist():
    import torch.distributed as dist
    return dist


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def resolve_group(process_group=None):
    """The group a ZO step reduces over, or None when no collective is needed.

    None -> the world group if torch.distributed is initialised; a group of size 1 -> None."""
    if not is_initialized():
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first, or launch with torchrun)")
        return None
    dist = _dist()
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def group_size(group) -> int:
    return 1 if group is None else _dist().get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else _dist().get_rank(group)


def collective_device(group) -> torch.device:
    """Where the group's backend wants its tensors: CUDA for NCCL, CPU otherwise (gloo)."""
    backend = str(_dist().get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _failed(what: str, group, err: BaseException) -> DistributedStepError:
    return DistributedStepError(
        f"zokernels: {what} over {group_size(group)} ranks failed: {type(err).__name__}: {err}. "
        "Another rank died, raised, timed out, or ran a different number of steps/forwards; every rank "
        "must call step() the same number of times. The wait is bounded by "
        "init_process_group(timeout=...).")


def broadcast_seed(seed: int, group) -> int:
    """Group rank 0's 64-bit seed on every rank (so all ranks draw the same z)."""
    C.check_u64(seed, "seed")
    if group is None:
        return seed
    dist = _dist()
    signed = seed - (1 << 64) if seed >= 1 << 63 else seed
    t = torch.tensor([signed], dtype=torch.int64, device=collective_device(group))
    try:
        dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    except Exception as err:
        raise _failed("the seed broadcast", group, err) from err
    return int(t.item()) & C.MASK64


def all_reduce_sum(values: Sequence[float], group, what: str = "the loss all-reduce") -> list[float]:
    """Elementwise sum over the group of a small float64 vector: one all_reduce call.

    Float32 losses are exact in float64 and their sum over W ranks is exact unless their exponents
    differ by more than ~29 - log2(W) binades, so the result does not depend on reduction order."""
    if group is None:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device(group))
    try:
        _dist().all_reduce(t, op=_dist().ReduceOp.SUM, group=group)
    except Exception as err:
        raise _failed(what, group, err) from err
    return [float(v) for v in t.cpu().tolist()]


def mean_losses(values: Sequence[float], group) -> list[float]:
    """(1/W) sum_r values^(r), float64; identical on every rank. NaN/inf anywhere -> non-finite everywhere."""
    if group is None:
        return [float(v) for v in values]
    w = group_size(group)
    return [v / w for v in all_reduce_sum(values, group)]


def assigned_queries(n_queries: int, group, spread: bool) -> list[int]:
    """Queries this rank evaluates: all of them, or q = r, r + W, ... when spread over the group."""
    if not spread or group is None:
        return list(range(n_queries))
    return list(range(group_rank(group), n_queries, group_size(group)))


def spread_losses(n_queries: int, mine: dict[int, tuple[float, float]], group) -> list[tuple[float, float]]:
    """Gather the (a_q, b_q) loss pairs of every query from the rank that evaluated it (zeros elsewhere,
    summed by one all_reduce of 2Q float64)."""
    flat = [0.0] * (2 * n_queries)
    for q, (a, b) in mine.items():
        flat[2 * q], flat[2 * q + 1] = a, b
    flat = all_reduce_sum(flat, group, "the spread-queries loss all-reduce")
    return [(flat[2 * q], flat[2 * q + 1]) for q in range(n_queries)]


def all_finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(v) for v in values)


# ----------------------------------------------------------------------------- sharded parameters
def is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(t, DTensor)


def _check_placements(name: str, param) -> None:
    from torch.distributed.tensor import Replicate, Shard
    for p in param.placements:
        if type(p) is Replicate:
            continue
        if type(p) is Shard:  # _StridedShard (FSDP2 + TP) is a different type on purpose
            continue
        raise UnsupportedLayout(
            f"parameter {name}: placement {p!r} is not supported. zokernels perturbs a local shard in "
            "place with its global element offset, which needs the shard to be one contiguous range of "
            "the full tensor: Replicate and Shard placements whose local block is contiguous (Shard(0) "
            "rows, FSDP2's default) are supported; Partial and strided shards are not.")


def _contiguous_block(global_shape: Sequence[int], local_shape: Sequence[int]) -> bool:
    """True if a block of `local_shape` (at any offset) is one contiguous range of the flat global
    tensor: dims before the first partial dim have size 1, dims after it are full."""
    partial = [d for d, (g, l) in enumerate(zip(global_shape, local_shape)) if g != l]
    if not partial or math.prod(local_shape) == 0:
        return True
    d = partial[0]
    return all(global_shape[i] == 1 for i in range(d)) and all(
        local_shape[i] == global_shape[i] for i in range(d + 1, len(global_shape)))


def local_shard(name: str, param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the tensor the kernels work on, global flat index of its element 0).

    A plain tensor: (param, 0). A DTensor: its local tensor and offset = sum_d o_d * stride_d of the
    full contiguous tensor, o = the shard's global index offset (torch's own chunking rule, which is
    FSDP2's: ceil(n / W) rows per rank, the last ranks shorter or empty; FSDP2's padding sits past the
    local tensor's end, so it is never perturbed). Raises UnsupportedLayout for non-contiguous blocks."""
    if not is_dtensor(param):
        return param, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _check_placements(name, param)
    local = param._local_tensor
    if type(local) is not torch.Tensor and not isinstance(local, torch.nn.Parameter):
        raise UnsupportedLayout(f"parameter {name}: its local shard is a {type(local).__name__} tensor "
                                "subclass (e.g. float8 all-gather extensions); zokernels needs plain tensors")
    global_shape = tuple(param.shape)
    local_shape, global_offset = compute_local_shape_and_global_offset(global_shape, param.device_mesh,
                                                                       param.placements)
    if tuple(local.shape) != tuple(local_shape):
        raise UnsupportedLayout(f"parameter {name}: local shard has shape {tuple(local.shape)} but the "
                                f"placements {param.placements} give {tuple(local_shape)}")
    if not _contiguous_block(global_shape, local_shape):
        raise UnsupportedLayout(
            f"parameter {name}: placements {param.placements} give a local block {tuple(local_shape)} of "
            f"{global_shape} whose global indices are strided (e.g. Shard(1) column shards); supported: "
            "Replicate and row shards (Shard(0)), as FSDP2 uses by default. Re-shard it on dim 0 "
            "(fully_shard(..., shard_placement_fn=None)) or keep it replicated.")
    if not local.is_contiguous():
        raise UnsupportedLayout(f"parameter {name}: local shard is not contiguous")
    strides = [math.prod(global_shape[d + 1:]) for d in range(len(global_shape))]
    offset = sum(int(o) * s for o, s in zip(global_offset, strides)) if local.numel() else 0
    C.check_range(offset, local.numel())
    return local, offset


def local_shards(names: Sequence[str], params: Sequence[torch.Tensor]
                 ) -> tuple[list[torch.Tensor], list[int], frozenset[int]]:
    """local tensors, their global offsets, and the indices of DTensor parameters."""
    locals_, offsets, sharded = [], [], set()
    for i, (n, p) in enumerate(zip(names, params)):
        local, off = local_shard(n, p)
        locals_.append(local)
        offsets.append(off)
        if is_dtensor(p):
            sharded.add(i)
    return locals_, offsets, frozenset(sharded)


def full_tensors(params: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each parameter as a full tensor, one at a time (a DTensor is all-gathered: a collective every
    rank must join). Only for the log's base fingerprint at construction, never per step."""
    for p in params:
        if is_dtensor(p):
            with torch.no_grad():
                yield p.full_tensor()
        else:
            yield p


# ----------------------------------------------------------------------------- FSDP2
def fsdp_modules(model: torch.nn.Module | None) -> list[torch.nn.Module]:
    """The FSDP2 (`fully_shard`) modules of a model, or []."""
    if model is None or not torch.distributed.is_available():
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def fresh_gather(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Reshard FSDP2 modules before and after a forward.

    A probe writes R(theta +- eps z) into the local shards, so the forward must all-gather them anew.
    FSDP2 keeps the root module unsharded after its forward (reshard_after_forward is False for the
    root) and then skips the next all-gather: without this, the next probe would read the previous
    probe's weights, and a later forward the perturbed ones. reshard() is a no-op when sharded."""
    for m in modules:
        m.reshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()


def reduce_probe_losses(plus: list[float], minus: list[float], loss0: float | None, queries: list[int],
                        n_queries: int, group, spread: bool) -> tuple[list[float], list[float], float | None]:
    """One all-reduce per step. Without spreading: the group mean of [L+_q.., L-_q.., L0]. Spread
    (two-sided only): every query's (L+_q, L-_q) from the rank that evaluated it."""
    if group is None:
        return plus, minus, loss0
    if spread:
        pairs = spread_losses(n_queries, {q: (p, m) for q, p, m in zip(queries, plus, minus)}, group)
        return [p for p, _ in pairs], [m for _, m in pairs], None
    values = mean_losses(list(plus) + list(minus) + ([] if loss0 is None else [loss0]), group)
    n_plus, n_minus = len(plus), len(minus)
    return (values[:n_plus], values[n_plus:n_plus + n_minus],
            None if loss0 is None else values[n_plus + n_minus])


def reshard(model: torch.nn.Module | None) -> None:
    """Put every FSDP2 module of `model` back in its sharded state (no-op otherwise). After a forward,
    FSDP2 leaves the root's parameters unsharded (plain tensors registered on the modules); an
    optimizer built then would capture those instead of the DTensor shards."""
    for m in fsdp_modules(model):
        m.reshard()
