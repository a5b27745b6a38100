"""The op registry and its one dispatcher.

Each op is declared once (zokernels.ops: signature, contract, validation) with `declare`; each backend
registers the ops it implements with `register` when its module is imported. `resolve` applies one policy to
every op:

- backend "auto" (and $ZOKERNELS_BACKEND unset): the first backend in ORDER that can run this call; which one
  ran is recorded (`last_backend`). The Triton interpreter (CPU tensors) is for tests and never automatic.
- an explicit backend (argument, or $ZOKERNELS_BACKEND standing in for "auto"): it runs the call, or
  BackendUnavailable lists every backend and why it cannot run the call. Nothing falls back silently.

A backend module has NAME and unavailable_reason(device) -> str | None; an implementation may add
supports(device, call) -> str | None, where `call` holds the properties of the call that decide whether the
kernel can run it (dtype, format, output layout...). Backends are imported lazily, so `import zokernels`
never fails on a machine without a GPU, triton or the CUDA module.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

ORDER = ("cuda", "triton", "torch", "reference")
BACKEND_ENV = "ZOKERNELS_BACKEND"
AUTO_SKIPS_INTERPRETER = "the Triton interpreter (CPU tensors) is for tests; 'auto' never picks it"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this call; the message says why, for every backend."""


@dataclass(frozen=True)
class Impl:
    """One backend's kernel for one op; `supports(device, call)` -> None or why it cannot run the call."""

    op: str
    backend: str
    fn: Callable
    supports: Callable[[torch.device, dict], str | None] | None = None


_declared: dict[str, str] = {}              # op -> one-line contract
_impls: dict[str, dict[str, Impl]] = {}     # op -> backend -> Impl
_last: dict[tuple[str, str], str] = {}      # (op, device type) -> backend that ran it last
_modules: dict[str, Any] = {}
_import_errors: dict[str, str] = {}


# ----------------------------------------------------------------------------- declaring and registering
def declare(op: str, summary: str) -> None:
    """Declare op `op` (done once, by zokernels.ops); `summary` is its one-line contract."""
    if op in _declared and _declared[op] != summary:
        raise ValueError(f"op {op!r} is declared twice")
    _declared[op] = summary


def register(op: str, backend: str, supports: Callable[[torch.device, dict], str | None] | None = None):
    """Decorator: `fn` is backend `backend`'s kernel for op `op`."""
    if backend not in ORDER:
        raise ValueError(f"unknown backend {backend!r}; backends: {ORDER}")

    def deco(fn: Callable) -> Callable:
        _impls.setdefault(op, {})[backend] = Impl(op, backend, fn, supports)
        return fn
    return deco


def declared() -> dict[str, str]:
    """{op: one-line contract} of every declared op (imports zokernels.ops, which declares them)."""
    importlib.import_module("zokernels.ops")
    return dict(_declared)


def implementations(op: str) -> dict[str, Impl]:
    """{backend: Impl} of every importable backend that registered `op`."""
    for name in ORDER:
        _load(name)
    return dict(_impls.get(op, {}))


# ----------------------------------------------------------------------------- backends
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
        _import_errors[name] = f"cannot import zokernels.backends.{name}: {type(e).__name__}: {e}"
        return None
    _modules[name] = mod
    return mod


def module(name: str):
    """The backend module `name` (for its LAUNCHES counters and tests); BackendUnavailable if it fails to import."""
    mod = _load(name)
    if mod is None:
        raise BackendUnavailable(_import_errors[name])
    return mod


def not_supported(name: str, device: torch.device) -> str | None:
    """None if backend `name` can run on `device` at all, else the reason."""
    mod = _load(name)
    if mod is None:
        return _import_errors[name]
    return mod.unavailable_reason(torch.device(device))


def report(device: torch.device) -> dict[str, str]:
    """{backend: 'ok' or reason} for a device."""
    return {name: (not_supported(name, device) or "ok") for name in ORDER}


def interpreting() -> bool:
    """TRITON_INTERPRET is set: Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------- dispatch
def requested(backend: str) -> tuple[str, bool]:
    """(the backend asked for, whether $ZOKERNELS_BACKEND chose it): the variable stands in for 'auto'."""
    if backend != "auto":
        return backend, False
    env = os.environ.get(BACKEND_ENV) or "auto"
    return env, env != "auto"


def why_not(op: str, name: str, device: torch.device, call: dict | None = None) -> str | None:
    """None if backend `name` can run this call of `op` on `device`, else the reason."""
    if _load(name) is None:
        return _import_errors[name]
    impl = _impls.get(op, {}).get(name)
    if impl is None:
        return f"{name} does not implement {op}"
    reason = not_supported(name, device)
    if reason is not None:
        return reason
    return impl.supports(torch.device(device), call or {}) if impl.supports is not None else None


def _reasons(op: str, device: torch.device, call: dict | None) -> str:
    return "; ".join(f"{name}: {why_not(op, name, device, call) or 'ok'}" for name in ORDER)


def resolve(op: str, device: torch.device, backend: str = "auto", call: dict | None = None) -> Impl:
    """The implementation that runs this call of `op` (see the module docstring for the policy)."""
    if op not in _declared:
        raise KeyError(f"op {op!r} is not declared")
    device = torch.device(device)
    name, from_env = requested(backend)
    if name == "auto":
        for candidate in ORDER:
            if candidate == "triton" and device.type == "cpu":
                continue
            if why_not(op, candidate, device, call) is None:
                _last[(op, device.type)] = candidate
                return _impls[op][candidate]
        raise BackendUnavailable(f"{op}: no backend can run this call on {device} ({_reasons(op, device, call)})")
    if name not in ORDER:
        raise BackendUnavailable(f"unknown backend {name!r}"
                                 + (f" (from ${BACKEND_ENV})" if from_env else "")
                                 + f"; choose one of {ORDER} or 'auto'")
    reason = why_not(op, name, device, call)
    if reason is not None:
        where = f" (from ${BACKEND_ENV}; unset it to let 'auto' choose)" if from_env else ""
        raise BackendUnavailable(f"{op} cannot run on backend {name!r}{where} on {device}: {reason}. "
                                 f"Every backend: {_reasons(op, device, call)}")
    _last[(op, device.type)] = name
    return _impls[op][name]


def last_backend(op: str, device: torch.device | str) -> str | None:
    """The backend that last ran `op` on this device type in this process (None: not run yet)."""
    return _last.get((op, torch.device(device).type))


def table(device: torch.device) -> dict[str, dict[str, str]]:
    """{op: {backend: 'ok' or why not}} for every declared op on `device` (no per-call properties)."""
    ops = declared()
    for name in ORDER:
        _load(name)
    device = torch.device(device)
    out = {}
    for op in ops:
        row = {}
        for name in ORDER:
            reason = why_not(op, name, device)
            if reason is None and name == "triton" and device.type == "cpu":
                reason = "ok (interpreter; tests only)"
            row[name] = reason or "ok"
        out[op] = row
    return out

