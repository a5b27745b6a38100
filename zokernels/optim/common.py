"""Helpers shared by the ZO optimizers (ZOSGD, QuZO)."""
from __future__ import annotations

import contextlib
import math
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


FLOAT32_MAX = 3.4028234663852886e38  # the kernels take lr, weight decay and eps as float32


def as_float(v) -> float:
    """A Python number, numpy scalar, or one-element tensor / numpy array as a float (TypeError otherwise)."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool:
        return float(v.item())
    if type(v).__name__ == "ndarray" and getattr(v, "size", 0) == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(type(v).__name__)
    return float(v)


def check_number(v, what: str, ok, rule: str) -> None:
    try:
        x = as_float(v)
    except TypeError:
        raise ValueError(f"{what} must be a finite number {rule}, got {v!r} (a {type(v).__name__})") from None
    if not (math.isfinite(x) and abs(x) <= FLOAT32_MAX and ok(x)):
        raise ValueError(f"{what} must be a finite number {rule} (and within float32 range), got {v!r}")


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
