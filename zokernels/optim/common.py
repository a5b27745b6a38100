"""Helpers shared by the ZO optimizers (ZOSGD, QuZO)."""
from __future__ import annotations

import contextlib

import torch


def scalar_loss(loss) -> float:
    """The closure's loss as a Python float: a 1-element tensor or a real number, nothing else."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"the closure must return a scalar loss; got a tensor of shape {tuple(loss.shape)} "
                             "(reduce it, e.g. .mean())")
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"the closure must return a scalar loss (0-d tensor or float), got {type(loss).__name__}")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module | None):
    """model.eval() for the duration (dropout off in probes), each module's mode restored after."""
    if model is None:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
