"""Helpers shared by the ZO optimizers (ZOSGD, QuZO)."""
from __future__ import annotations

import contextlib
import numbers
import os
import sys

import torch


def scalar_loss(loss) -> float:
    """The closure's loss as a Python float: a 1-element tensor or a real number, nothing else."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"the closure must return a scalar loss; got a tensor of shape {tuple(loss.shape)} "
                             "(reduce it, e.g. .mean())")
        if loss.is_complex() or loss.dtype == torch.bool:
            raise TypeError(f"the closure must return a real scalar loss, got a {loss.dtype} tensor")
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):  # int, float, numpy scalars
        return float(loss)
    raise TypeError(f"the closure must return a scalar loss (0-d tensor or float), got {type(loss).__name__}")


_INTERNAL_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
                  os.path.dirname(os.path.abspath(torch.optim.__file__)) + os.sep)


def user_stacklevel() -> int:
    """The `stacklevel` that makes a warning raised by the caller of this function point at the user's code:
    the first frame outside zokernels, torch.optim (whose step wrapper sits between step() and the user) and
    the import machinery (a warning raised while a zokernels module is imported points at the import)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen importlib")
                                 or os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS)):
        frame, level = frame.f_back, level + 1
    return level


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
