"""CUDA backend: the nvcc-built kernels of zokernels._cuda (csrc/), one launch per (op, group).

The extension takes raw pointers, so this module owns the per-launch tensor table: an int64 device tensor
[T, TABLE_COLS] with rows (ptr, out_ptr, numel, key, offset, first chunk, lr|wd bits, 0), cached per
parameter set (its content is a pure function of the cache key, so a hit is always valid).
Importing this module never fails; unavailable_reason says what is missing. Called directly with CPU
tensors, the functions below run the kernels' grid on the host (zokernels._cuda.host_launch), which is how
the multi-tensor path is tested without a GPU; zokernels.ops never routes CPU tensors here.
Masked ops (MaZO): masked.py, one launch per group over a table of MASK_COLS rows. QuZO quantized-weight
ops: quant.py, one launch per weight.
"""
from __future__ import annotations

import struct
from collections import Counter

import torch

from ... import contract as C
from .._common import Group, TableCache, UpdateSpec, chunk_table, philox_span
from ..registry import register

NAME = "cuda"
LAUNCHES: Counter = Counter()  # op name -> kernel launches (tests check one launch per group)

NOT_BUILT = ("zokernels._cuda is not built (no nvcc at install time); reinstall with CUDA_HOME set: "
             "pip install --no-build-isolation .")

try:
    from ... import _cuda as _ext
    _IMPORT_ERROR: str | None = None
except ImportError as e:  # not built, or built for another Python
    _ext = None
    # a module that exists but does not load (other Python ABI, missing symbol) says why
    _missing = "No module named" in str(e) or "cannot import name '_cuda'" in str(e)
    _IMPORT_ERROR = NOT_BUILT if _missing else (f"zokernels._cuda does not load ({e}); rebuild it with "
                                                  "CUDA_HOME set: pip install --no-build-isolation .")

_DTYPE_TAG = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DIST_TAG = {"gaussian": 0, "rademacher": 1}
_tables = TableCache()  # launch tables of the dense and masked kernels
_device_ok: dict[int, str | None] = {}


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA backend needs CUDA tensors (got {device.type})"
    if _ext is None:
        return _IMPORT_ERROR
    if not torch.cuda.is_available():
        return "torch reports no CUDA GPU (torch.cuda.is_available() is False)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_ok:
        _device_ok[index] = _check_device(index)
    return _device_ok[index]


def _check_device(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return (f"GPU {index} has compute capability {major}.{minor}; zokernels._cuda is built for sm_80+ "
                "(use the triton backend)")
    if _ext.device_count() <= index:
        return f"zokernels._cuda sees {_ext.device_count()} CUDA devices, not device {index}"
    err = _ext.probe(index)
    if err:
        return (f"zokernels._cuda cannot run on GPU {index}: {err} (it links CUDA runtime 13 statically, "
                "which needs an NVIDIA driver >= 580)" if "driver" in err.lower() else
                f"zokernels._cuda cannot run on GPU {index}: {err}")
    return None


# ----------------------------------------------------------------------------- tables and launches
def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _table(device: torch.device, rows: tuple) -> tuple[torch.Tensor, int]:
    """(device int64 table, number of CUDA blocks) for rows (src, dst, numel, key, offset, lr, wd)."""
    def build():
        firsts, chunks = chunk_table([(0, philox_span(offset, numel)[1]) for _, _, numel, _, offset, _, _ in rows],
                                     _ext.CHUNK_BLOCKS)
        flat = []
        for (src, dst, numel, key, offset, lr, wd), first in zip(rows, firsts):
            flat += [src, dst, numel, _signed64(key), offset, first, _signed64(_f32_bits(lr) | _f32_bits(wd) << 32), 0]
        return torch.tensor(flat, dtype=torch.int64).view(-1, _ext.TABLE_COLS).to(device), chunks.shape[0]

    return _tables.get((device, rows), build)


def _launch(name: str, op: int, dtype: torch.dtype, dist: str, stochastic: bool, device: torch.device,
            rows: list[tuple], *, seed: int, scale: float = 0.0, query: int = 0, stream: int = 0,
            sr_stream: int = 0, coeffs: torch.Tensor | None = None, restore_scale: float | None = None,
            restore_query: int = 0) -> None:
    rows = tuple(r for r in rows if r[2] > 0)
    if not rows:
        return
    if _ext is None:
        raise RuntimeError(NOT_BUILT)
    table, chunks = _table(device, rows)
    args = (op, _DTYPE_TAG[dtype], _DIST_TAG[dist], bool(stochastic and dtype != torch.float32),
            table.data_ptr(), len(rows), chunks, seed, scale, query, stream, sr_stream,
            0 if coeffs is None else coeffs.data_ptr(), 0 if coeffs is None else coeffs.numel(),
            restore_scale is not None, restore_scale or 0.0, restore_query)
    if device.type == "cpu":  # the kernels' grid run on the host: tests of the multi-tensor path without a GPU
        _ext.host_launch(*args)
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        _ext.launch(*args, index, torch.cuda.current_stream(device).cuda_stream)
    LAUNCHES[name] += 1


def _row(src: torch.Tensor, dst: torch.Tensor, key: int, offset: int, lr: float = 0.0, wd: float = 0.0):
    return (src.data_ptr(), dst.data_ptr(), src.numel(), key, offset, lr, wd)


# ----------------------------------------------------------------------------- backend interface
@register("philox", NAME)
def philox(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of int64 counters [n, 4] (uint32 values) -> int64 [n, 4], via the host twin."""
    if _ext is None:
        raise RuntimeError(NOT_BUILT)
    c = counters.to("cpu", torch.int64).to(torch.int32).contiguous()  # uint32 bit patterns
    out = torch.empty_like(c)
    _ext.host_philox(c.data_ptr(), c.shape[0], key[0], key[1], out.data_ptr())
    return (out.to(torch.int64) & C.MASK32).to(counters.device)


@register("perturbation", NAME)
def fill_perturbation(out: torch.Tensor, seed: int, key: int, query: int, stream: int, dist: str,
                      offset: int) -> None:
    _launch("fill_perturbation", _ext.OPS["fill_perturbation"] if _ext else 0, torch.float32, dist, False,
            out.device, [_row(out, out, key, offset)], seed=seed, query=query, stream=stream)


@register("uniform", NAME)
def fill_uniform(out: torch.Tensor, seed: int, key: int, query: int, stream: int, offset: int) -> None:
    _launch("fill_uniform", _ext.OPS["fill_uniform"] if _ext else 0, torch.float32, "gaussian", False,
            out.device, [_row(out, out, key, offset)], seed=seed, query=query, stream=stream)


@register("stochastic_round", NAME)
def stochastic_round(x: torch.Tensor, out: torch.Tensor, seed: int, key: int, query: int, stream: int,
                     offset: int) -> None:
    _launch("stochastic_round", _ext.OPS["stochastic_round"] if _ext else 0, out.dtype, "gaussian", True,
            x.device, [_row(x, out, key, offset)], seed=seed, query=query, stream=stream)


@register("perturb_", NAME)
def perturb_(group: Group, seed: int, scale: float, query: int, dist: str, rounding: str,
             sr_stream: int) -> None:
    rows = [_row(t, t, k, o) for t, k, o in zip(group.tensors, group.keys, group.offsets)]
    _launch("perturb_", _ext.OPS["perturb"] if _ext else 0, group.dtype, dist, rounding == "stochastic",
            group.device, rows, seed=seed, scale=scale, query=query, sr_stream=sr_stream)


@register("perturbed_copy", NAME)
def perturbed_copy(group: Group, outs: list[torch.Tensor], seed: int, scale: float, query: int, dist: str,
                   rounding: str, sr_stream: int) -> None:
    rows = [_row(t, o, k, off) for t, o, k, off in zip(group.tensors, outs, group.keys, group.offsets)]
    _launch("perturbed_copy", _ext.OPS["perturb"] if _ext else 0, group.dtype, dist, rounding == "stochastic",
            group.device, rows, seed=seed, scale=scale, query=query, sr_stream=sr_stream)


@register("zo_update_", NAME)
def zo_update_(group: Group, spec: UpdateSpec) -> None:
    rows = [_row(t, t, k, o, lr, wd)
            for t, k, o, lr, wd in zip(group.tensors, group.keys, group.offsets, group.lrs, group.wds)]
    coeffs = (torch.tensor(spec.coeffs, dtype=torch.float32).to(group.device, non_blocking=False)
              if spec.coeffs else None)
    _launch("zo_update_", _ext.OPS["zo_update"] if _ext else 0, group.dtype, spec.dist,
            spec.rounding == "stochastic", group.device, rows, seed=spec.seed, sr_stream=spec.sr_stream,
            coeffs=coeffs, restore_scale=spec.restore_scale, restore_query=spec.restore_query)


def missing_entry(entry: str, what: str):
    """supports() of ops whose kernels a zokernels._cuda build may predate: the reason when `entry` is missing."""
    def supports(device: torch.device, call: dict) -> str | None:
        if _ext is not None and not hasattr(_ext, entry):
            return (f"this zokernels._cuda build has no {what} kernels (built before them); rebuild it: "
                    "pip install --no-build-isolation .")
        return None
    return supports


from . import masked, quant  # noqa: E402,F401  (their ops register on import)
