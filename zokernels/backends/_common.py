"""Types shared by every backend. Backends import this and zokernels.contract, never each other."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Group:
    """Tensors of one (device, dtype), validated by zokernels.ops: contiguous, floating, non-empty.

    keys[i], offsets[i]: contract key and global index of element 0 of tensors[i].
    lrs[i], wds[i]: per-tensor learning rate and weight decay (zo_update_ only).
    """

    tensors: list[torch.Tensor]
    keys: list[int]
    offsets: list[int]
    lrs: list[float] = field(default_factory=list)
    wds: list[float] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype


@dataclass(frozen=True)
class UpdateSpec:
    """theta <- R(theta' - lr * (sum_q coeffs[q] * z_q + wd * theta')),
    theta' = theta + restore_scale * z_{restore_query} (fp32, unrounded) when restore_scale is set."""

    seed: int
    coeffs: tuple[float, ...]
    dist: str
    rounding: str
    sr_stream: int
    restore_scale: float | None = None
    restore_query: int = 0



class TableCache:
    """Launch tables of tensor groups, shared by every kernel family (the multi-tensor-apply idea): a backend
    describes each tensor of a group by a row of integers (pointer or delta, numel, key, offset, ...), builds the
    device table of the group once and finds it again by those rows. A table is a pure function of its key, so
    a hit is always valid; least recently used tables are dropped past `size` (a training loop reuses a few)."""

    def __init__(self, size: int = 64):
        self.size = size
        self._tables: OrderedDict = OrderedDict()

    def get(self, key, build: Callable[[], Any]):
        hit = self._tables.get(key)
        if hit is not None:
            self._tables.move_to_end(key)
            return hit
        value = build()
        self._tables[key] = value
        while len(self._tables) > self.size:
            self._tables.popitem(last=False)
        return value

    def clear(self) -> None:
        self._tables.clear()

    def __len__(self) -> int:
        return len(self._tables)

    def values(self):
        return self._tables.values()


def philox_span(offset: int, numel: int) -> tuple[int, int]:
    """(first Philox block, number of blocks) that elements offset .. offset + numel - 1 touch (4 per block)."""
    if numel <= 0:
        return offset >> 2, 0
    first = offset >> 2
    return first, ((offset + numel - 1) >> 2) - first + 1


def chunk_table(spans: Sequence[tuple[int, int]], per_chunk: int) -> tuple[list[int], torch.Tensor]:
    """Work split into chunks of `per_chunk` items, tensor by tensor: spans[i] = (first item, items) of tensor i.
    Returns (index of each tensor's first chunk, int64 [P, 2] CPU tensor of (tensor, first item) per chunk)."""
    span = torch.tensor(list(spans), dtype=torch.int64).reshape(-1, 2)
    first, count = span[:, 0], span[:, 1]
    n = (count + per_chunk - 1) // per_chunk
    firsts = torch.cumsum(n, 0) - n
    index = torch.repeat_interleave(torch.arange(len(span), dtype=torch.int64), n)
    within = torch.arange(index.numel(), dtype=torch.int64) - firsts[index]
    return firsts.tolist(), torch.stack([index, first[index] + within * per_chunk], dim=1).contiguous()
