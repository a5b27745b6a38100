"""Types shared by every backend. Backends import this and zokernels.contract, never each other."""
from __future__ import annotations

from dataclasses import dataclass, field

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
