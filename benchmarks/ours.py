"""Our ZO step built directly on zokernels.ops (independent of the optimizer classes).

In-place mode: perturb_(+eps), perturb_(-2 eps), zo_update_(restore_scale=eps): 3 passes, 6P bytes.
Drift-free mode: perturbed_copy(+eps) and perturbed_copy(-eps) of each tensor into a scratch buffer
(what the hooks probe does per module), then zo_update_ without restore: 3 passes, 6P bytes.
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from zokernels import ops
from zokernels.contract import param_key

from .baselines import decays

STEP_BYTES_FORMULA = "6P = 3 passes x 2P (read + write params, or read params + write scratch)"


class OursInPlace:
    def __init__(self, named_params: list[tuple[str, torch.Tensor]], eps: float, lr: float,
                 weight_decay: float = 0.0, backend: str = "auto", rounding: str = "nearest"):
        self.tensors = [p.data for _, p in named_params]
        self.keys = [param_key(n) for n, _ in named_params]
        self.wds = [weight_decay if decays(n) else 0.0 for n, _ in named_params]
        self.eps, self.lr, self.backend, self.rounding = eps, lr, backend, rounding

    def perturb(self, seed: int, scale: float) -> None:
        ops.perturb_(self.tensors, seed, scale, self.keys, backend=self.backend)

    def update(self, seed: int, projected_grad: float, restore: bool = True) -> None:
        ops.zo_update_(self.tensors, seed, self.keys, [projected_grad], self.lr, self.wds,
                       rounding=self.rounding, restore_scale=self.eps if restore else None,
                       backend=self.backend)

    def sweeps(self, seed: int, projected_grad: float) -> None:
        self.perturb(seed, self.eps)
        self.perturb(seed, -2 * self.eps)
        self.update(seed, projected_grad)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        seed = random.randrange(1 << 62)
        self.perturb(seed, self.eps)
        loss1 = closure()
        self.perturb(seed, -2 * self.eps)
        loss2 = closure()
        self.update(seed, ((loss1 - loss2) / (2 * self.eps)).item())
        return float(loss1)


class OursDriftFree(OursInPlace):
    """Parameters never change during the probes: each is copied, perturbed, into scratch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scratch: dict[torch.dtype, torch.Tensor] = {}
        for t in self.tensors:
            have = self.scratch.get(t.dtype)
            if have is None or have.numel() < t.numel():
                self.scratch[t.dtype] = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
        self.views = [self.scratch[t.dtype][:t.numel()].view(t.shape) for t in self.tensors]

    def probe(self, seed: int, scale: float) -> None:
        for t, key, out in zip(self.tensors, self.keys, self.views):
            ops.perturbed_copy(t, seed, scale, key, outs=[out], backend=self.backend)

    def sweeps(self, seed: int, projected_grad: float) -> None:
        self.probe(seed, self.eps)
        self.probe(seed, -self.eps)
        self.update(seed, projected_grad, restore=False)
