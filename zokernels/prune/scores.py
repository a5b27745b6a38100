"""Pruning scores of one Linear weight W [out, in] (higher = keep), in float64:

    magnitude   S_ij = |W_ij|
    wanda       S_ij = |W_ij| * ||X_j||,            ||X_j|| = sqrt(sum over calibration tokens of x_j^2 / N)
    wanda++     S_ij = |W_ij| * (alpha * G_ij + ||X_j||),  G_ij = sqrt(mean over the N samples of (dL_n/dW_ij)^2),
                L_n = ||f_block(X_n)||_2 the regional loss of calibration sequence n (real tokens only)

N is the number of calibration sequences: ||X_j|| is Wanda's code's normalization (a root mean over sequences of
each sequence's sum of squares), which does not change a row's ranking under Wanda and gives alpha its paper
meaning under Wanda++ (alpha = 100)."""
from __future__ import annotations

import torch

METHODS = ("magnitude", "wanda", "wanda++")


class InputNorms:
    """Forward hooks on a block's Linears that accumulate sum over real tokens of x_j^2 in float64."""

    def __init__(self, linears: list[tuple[str, torch.nn.Linear]]):
        self.sumsq = {n: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for n, m in linears}
        self.tokens: torch.Tensor | None = None  # the current batch's real-token weights [batch, tokens]
        self.samples = 0
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in linears]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0].detach().to(torch.float64)
            sq = x * x
            w = self.tokens
            if w is not None and w.numel() == sq[..., 0].numel():
                sq = sq * w.reshape(sq.shape[:-1]).unsqueeze(-1).to(sq.device)
            self.sumsq[name] += sq.reshape(-1, sq.shape[-1]).sum(dim=0)
        return hook

    def norms(self) -> dict[str, torch.Tensor]:
        """||X_j|| per Linear: sqrt(sum x_j^2 / N)."""
        return {n: (s / max(self.samples, 1)).sqrt() for n, s in self.sumsq.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def score(weight: torch.Tensor, method: str, norm: torch.Tensor | None = None, grad_rms: torch.Tensor | None = None,
          alpha: float = 100.0) -> torch.Tensor:
    """float64 [out, in] score of `weight` under `method` (the module docstring's formulas)."""
    w = weight.detach().to(torch.float64).abs()
    if method == "magnitude":
        return w
    act = norm.to(w.device, torch.float64)[None, :]
    if method == "wanda":
        return w * act
    return w * (alpha * grad_rms.to(w.device, torch.float64) + act)
