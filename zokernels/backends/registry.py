"""Which backends exist, which are usable for a device, and why not. Imports backends lazily
so that `import zokernels` never fails on a machine without GPU, triton or the CUDA module."""
from __future__ import annotations

import importlib
import os

import torch

ORDER = ("cuda", "triton", "reference")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on these tensors; the message says why and how to fix it."""


_modules: dict[str, object] = {}
_import_errors: dict[str, str] = {}


def _load(name: str):
    if name in _modules:
        return _modules[name]
    if name in _import_errors:
        return None
    if name not in ORDER:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {ORDER} or 'auto'")
    try:
        mod = importlib.import_module(f"zokernels.backends.{name}")
    except Exception as e:  # noqa: BLE001 — any import failure makes the backend unavailable
        _import_errors[name] = f"{type(e).__name__}: {e}"
        return None
    if not callable(getattr(mod, "unavailable_reason", None)):
        _import_errors[name] = "the module does not implement the backend interface"
        return None
    _modules[name] = mod
    return mod


def not_supported(name: str, device: torch.device) -> str | None:
    """None if backend `name` can run on `device`, else the reason."""
    mod = _load(name)
    if mod is None:
        return f"cannot import zokernels.backends.{name}: {_import_errors[name]}"
    return mod.unavailable_reason(torch.device(device))


def require(name: str, device: torch.device):
    reason = not_supported(name, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} is not usable on {device}: {reason}")
    return _modules[name]


def auto(device: torch.device, needs: tuple[str, ...] = ()):
    """The first usable backend in ORDER that implements every op named in `needs`. The Triton
    interpreter (CPU tensors) is for tests and is never chosen automatically."""
    for name in ORDER:
        if not_supported(name, device) is None:
            if name == "triton" and torch.device(device).type == "cpu":
                continue
            mod = _modules[name]
            if all(hasattr(mod, op) for op in needs):
                return mod
    raise BackendUnavailable(f"no backend usable on {device}")  # reference always is; defensive


def report(device: torch.device) -> dict[str, str]:
    """{backend: 'ok' or reason} for a device."""
    return {name: (not_supported(name, device) or "ok") for name in ORDER}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
