"""The two baselines, side by side with ours in the same run.

`MeZO`: the perturbation/update code of MeZO's trainer (princeton-nlp/MeZO, large_models/trainer.py),
kept faithful: torch.manual_seed(seed) at the start of every sweep, then per parameter
    z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
    p.data = p.data + scaling_factor * z * eps                    # sweeps +1, -2, +1
    p.data = p.data - lr * (projected_grad * z + wd * p.data)     # update (no wd on bias/LayerNorm)
with projected_grad = ((loss1 - loss2) / (2 eps)).item().

`ForeachZO`: what a skilled PyTorch user writes: z drawn once per step per tensor from a seeded
torch.Generator into preallocated buffers (costs one extra copy of the parameters in memory), then
torch._foreach_add_ sweeps: p += eps z; p += -2 eps z; p = p * (1 - lr wd) + (eps (1 - lr wd) - lr g) z.
`compiled=True` runs the sweeps through torch.compile (a 0-d tensor coefficient, so one graph
serves every sweep and step).
"""
from __future__ import annotations

import random
from typing import Callable

import torch

NO_DECAY = ("bias", "layer_norm", "layernorm")  # MeZO's rule for parameters without weight decay


def decays(name: str) -> bool:
    return not any(s in name for s in NO_DECAY)


class MeZO:
    """MeZO's in-place SPSA step (one query), as its trainer implements it."""

    # bytes moved per step: 4 sweeps x (read + write params) + 4 x (write z); P = bytes of params
    BYTES_FORMULA = "12P = 4 sweeps x (2P read+write params + P z generation writes)"
    BYTES_FACTOR = 12

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], eps: float, lr: float,
                 weight_decay: float = 0.0):
        self.named_params = named_params
        self.eps, self.lr, self.weight_decay = eps, lr, weight_decay

    def perturb(self, seed: int, scaling_factor: float) -> None:
        torch.manual_seed(seed)
        for _, param in self.named_params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.eps

    def update(self, seed: int, projected_grad: float) -> None:
        torch.manual_seed(seed)
        for name, param in self.named_params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            if decays(name):
                param.data = param.data - self.lr * (projected_grad * z + self.weight_decay * param.data)
            else:
                param.data = param.data - self.lr * (projected_grad * z)

    def sweeps(self, seed: int, projected_grad: float) -> None:
        """The perturbation/update work of one step, without the forwards."""
        self.perturb(seed, 1)
        self.perturb(seed, -2)
        self.perturb(seed, 1)
        self.update(seed, projected_grad)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        seed = random.randrange(1_000_000_000)
        self.perturb(seed, 1)
        loss1 = closure()
        self.perturb(seed, -2)
        loss2 = closure()
        projected_grad = ((loss1 - loss2) / (2 * self.eps)).item()
        self.perturb(seed, 1)
        self.update(seed, projected_grad)
        return float(loss1)


def _axpy_(params: list[torch.Tensor], zs: list[torch.Tensor], coef: torch.Tensor) -> None:
    torch._foreach_add_(params, torch._foreach_mul(zs, coef))


class ForeachZO:
    """Per-tensor z from a torch.Generator, then _foreach_ sweeps over the whole list."""

    BYTES_FORMULA = "10P = P z generation writes + 3 foreach_add sweeps x 3P (read p, read z, write p)"
    BYTES_FACTOR = 10  # with weight_decay = 0; each extra _foreach_mul_ adds 2P

    def __init__(self, params: list[torch.Tensor], eps: float, lr: float, weight_decay: float = 0.0,
                 compiled: bool = False):
        self.params = list(params)
        self.eps, self.lr, self.weight_decay = eps, lr, weight_decay
        device = self.params[0].device
        self.zs = [torch.zeros_like(p) for p in self.params]  # zeros: the compile call below adds 0 * z
        self.gen = torch.Generator(device=device)
        self.compiled = compiled
        if compiled:
            self._coef = torch.zeros((), dtype=torch.float32, device=device)
            self._axpy = torch.compile(_axpy_, dynamic=False)
            self._axpy(self.params, self.zs, self._coef)  # compile now: failures surface here (adds 0)

    def sample(self, seed: int) -> None:
        self.gen.manual_seed(seed)
        for z in self.zs:
            z.normal_(generator=self.gen)

    def _add(self, alpha: float) -> None:
        if self.compiled:
            self._coef.fill_(alpha)
            self._axpy(self.params, self.zs, self._coef)
        else:
            torch._foreach_add_(self.params, self.zs, alpha=alpha)

    def perturb(self, alpha: float) -> None:
        self._add(alpha)

    def update(self, projected_grad: float) -> None:
        """Restore (+eps z) fused with the SGD step: p = (p + eps z)(1 - lr wd) - lr g z."""
        decay = 1.0 - self.lr * self.weight_decay
        if self.weight_decay:
            torch._foreach_mul_(self.params, decay)
        self._add(self.eps * decay - self.lr * projected_grad)

    def sweeps(self, seed: int, projected_grad: float) -> None:
        self.sample(seed)
        self.perturb(self.eps)
        self.perturb(-2 * self.eps)
        self.update(projected_grad)

    def release(self) -> None:
        self.zs = []

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        self.sample(random.randrange(1_000_000_000))
        self.perturb(self.eps)
        loss1 = closure()
        self.perturb(-2 * self.eps)
        loss2 = closure()
        self.update(((loss1 - loss2) / (2 * self.eps)).item())
        return float(loss1)
