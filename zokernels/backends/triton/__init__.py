"""Triton backend: the reference backend's interface with fused @triton.jit kernels (kernels.py).

One launch per Group per op: tensors of a group are addressed from one base pointer plus a per-tensor
int64 element delta, and a chunk table maps each program to (tensor, first Philox block); see
kernels.py. Host tables are cached, keyed by what they contain, so a training loop builds them once.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before
triton is imported; tests only, never chosen automatically). triton is imported lazily: importing
this module never fails, unavailable_reason() says what is missing.
"""
from __future__ import annotations

import collections
import importlib
from typing import NamedTuple

import torch

from ... import contract as C
from .._common import Group, TableCache, UpdateSpec, chunk_table, philox_span
from ..registry import interpreting, register

NAME = "triton"

# Kernel launches by kernel name: tests assert that the Triton path ran, once per group.
LAUNCHES: collections.Counter = collections.Counter()

# Philox blocks (rows of 4 elements) per program. GPU: 512 rows = 2048 elements per program with 4 warps, inside
# the usual 1K-4K elements per program of memory-bound elementwise kernels; not yet measured on a GPU.
# Interpreter: each tile operation costs a roughly fixed Python
# overhead, so bigger tiles are faster there.
BLOCKS_GPU = 512
NUM_WARPS_GPU = 4
BLOCKS_INTERPRETER = 1024
PHILOX_BLOCK = 256          # rows per program of the raw philox() op (known-answer tests)

_kernels = None
_kernels_error: str | None = None
_triton_error: str | None = None
_triton_checked = False
_launch_options: dict = {"enable_fp_fusion": False}
_cache = TableCache()         # launch tables of every kernel family (dense, masked, quant)

_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# ----------------------------------------------------------------------------- availability
def _triton_import_error() -> str | None:
    """None if `import triton` works, else why not."""
    global _triton_checked, _triton_error
    if not _triton_checked:
        try:
            import triton  # noqa: F401
        except ImportError as e:
            _triton_error = f"triton is not installed (pip install triton): {e}"
        except Exception as e:  # noqa: BLE001 — a broken install is as unusable as a missing one
            _triton_error = f"importing triton failed ({type(e).__name__}: {e})"
        _triton_checked = True
    return _triton_error


def _load_kernels():
    global _kernels, _kernels_error
    if _kernels is None and _kernels_error is None:
        try:
            from . import kernels
            _kernels = kernels
        except Exception as e:  # noqa: BLE001
            _kernels_error = f"cannot build the triton kernels ({type(e).__name__}: {e})"
    return _kernels


_interpreter_checked: list = []


def _interpreter_defect(kernels) -> str | None:
    """Why this triton's interpreter cannot run the kernels (None: it can); probed once."""
    if not _interpreter_checked:
        out = torch.zeros(1, dtype=torch.int32)
        try:
            kernels.runtime_loop_kernel[(1,)](out, 3)
            bad = None if int(out[0]) == 3 else f"a runtime-bounded loop counted {int(out[0])}, not 3"
        except Exception as e:  # noqa: BLE001 — whatever the interpreter raises, the kernels cannot run
            bad = f"{type(e).__name__}: {e}"
        version = getattr(kernels.triton, "__version__", "?")
        _interpreter_checked.append(None if bad is None else (
            f"triton {version}'s interpreter cannot run a loop bounded by a runtime argument ({bad}); "
            "triton 3.9 can (requirements/cpu.txt), or use backend='reference' on CPU"))
    return _interpreter_checked[0]


def unavailable_reason(device: torch.device) -> str | None:
    """None if this backend can run on `device`, else the reason and the fix."""
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        return f"the triton backend runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device.type}"
    reason = _triton_import_error()
    if reason is not None:
        return reason
    if device.type == "cpu":
        if not interpreting():
            return "CPU tensors need TRITON_INTERPRET=1 (set before importing triton)"
        kernels = _load_kernels()
        if kernels is None:
            return _kernels_error
        if not kernels.INTERPRETED:
            return ("triton kernels were compiled for the GPU because TRITON_INTERPRET=1 was set after they were "
                    "imported; set it before importing triton to run CPU tensors")
        return _interpreter_defect(kernels)
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if interpreting():
        return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only; unset it to run on the GPU"
    kernels = _load_kernels()
    if kernels is None:
        return _kernels_error
    if kernels.INTERPRETED:
        return "the triton kernels were imported under TRITON_INTERPRET=1; restart without it to use the GPU"
    return None


def _k():
    kernels = _load_kernels()
    if kernels is None:
        raise RuntimeError(_kernels_error or _triton_import_error())
    return kernels


def kernels_module(name: str):
    """A kernels module of this package (masked_kernels, quant_kernels), imported on first use after the dense
    kernels (whose import says why triton is unusable, if it is)."""
    _k()
    return importlib.import_module(f"{__name__}.{name}")


# ----------------------------------------------------------------------------- host tables
def _i32(x: int) -> int:
    """uint32 -> int32 bit pattern (scalar kernel arguments always have type i32)."""
    x &= C.MASK32
    return x - (1 << 32) if x >= 1 << 31 else x


def _i64(x: int) -> int:
    """uint64 -> int64 bit pattern."""
    return x - (1 << 64) if x >= 1 << 63 else x


class _Tables(NamedTuple):
    tab: torch.Tensor      # int64 [T, 4]: element delta from the base pointer, numel, key bits, offset
    chunks: torch.Tensor   # int64 [P, 2]: tensor index, first Philox block of program p
    programs: int
    base: int              # index of the tensor whose pointer is the base pointer
    aligned: bool          # every delta, numel and offset is a multiple of 4 (the kernels' ALIGNED hint)


def _cached(key, build):
    return _cache.get(key, build)


def _deltas(tensors: list[torch.Tensor], base: int) -> list[int]:
    """Element distance of each tensor's data from tensors[base] (0 for empty tensors)."""
    base_ptr, size = tensors[base].data_ptr(), tensors[base].element_size()
    out = []
    for t in tensors:
        if t.numel() == 0:
            out.append(0)
            continue
        d, r = divmod(t.data_ptr() - base_ptr, size)
        if r:
            raise RuntimeError("triton backend: tensor data is not aligned to its element size")
        out.append(d)
    return out


def _build_tables(rows: tuple, blocks: int, device: torch.device, base: int) -> _Tables:
    tab = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
    _, chunks = chunk_table([philox_span(o, n) for _, n, _, o in rows], blocks)
    return _Tables(tab.to(device), chunks.to(device), chunks.shape[0], base, _quads(rows))


def _quads(rows) -> bool:
    """Every (delta, numel, offset) a multiple of 4 elements: then each Philox block's 4 elements are one
    aligned vector of the base pointer's alignment, and the ALIGNED kernels load/store them as one 8-byte
    (16-bit) or 16-byte (float32) access (sm_90 PTX: ld.global.v2/v4 instead of 4 scalar loads)."""
    return all(n == 0 or (d % 4 == 0 and n % 4 == 0 and o % 4 == 0) for d, n, _, o in rows)  # empty: no program


def _tables(tensors: list[torch.Tensor], keys: list[int], offsets: list[int], blocks: int) -> _Tables:
    """Tables of a tensor list, cached by content: (delta, numel, key, offset) per tensor."""
    base = next((i for i, t in enumerate(tensors) if t.numel()), 0)
    deltas = _deltas(tensors, base)
    rows = tuple((d, t.numel(), _i64(k), o) for d, t, k, o in zip(deltas, tensors, keys, offsets))
    device = tensors[0].device
    return _cached(("tab", device, blocks, base, rows), lambda: _build_tables(rows, blocks, device, base))


def _out_deltas(outs: list[torch.Tensor], base: int) -> tuple[torch.Tensor, bool]:
    """(device table of the outs' element deltas from outs[base], every delta a multiple of 4); empty outs
    have delta 0."""
    deltas = tuple(_deltas(outs, base))
    device = outs[0].device
    return _cached(("out", device, deltas), lambda: (torch.tensor(deltas, dtype=torch.int64, device=device),
                                                     all(d % 4 == 0 for d in deltas)))


def _lr_wd(lrs: list[float], wds: list[float], device: torch.device) -> torch.Tensor:
    key = ("lrwd", device, tuple(lrs), tuple(wds))
    return _cached(key, lambda: torch.tensor(list(zip(lrs, wds)), dtype=torch.float32, device=device).reshape(-1))


# ----------------------------------------------------------------------------- launching
def _blocks(device: torch.device) -> int:
    return BLOCKS_INTERPRETER if device.type == "cpu" else BLOCKS_GPU


def _pointer(t: torch.Tensor) -> torch.Tensor:
    """bfloat16 goes through int16 bit patterns (exact everywhere; the interpreter's casts truncate)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _launch(kernel, grid: tuple, device: torch.device, *args, **meta) -> None:
    """kernel[grid](*args) with FP contraction off; counts the launch in LAUNCHES."""
    global _launch_options
    if "BLOCKS" in meta:  # tile kernels: libdevice precise math on GPU, numpy's under the interpreter
        meta["PRECISE"] = not _k().INTERPRETED
    if device.type == "cuda":
        ctx = torch.cuda.device(device)
    else:  # interpreter: numpy warns about the intended inf - inf / NaN lanes of the rounding code
        import numpy
        ctx = numpy.errstate(all="ignore")
    with ctx:
        try:
            kernel[grid](*args, **meta, num_warps=NUM_WARPS_GPU, **_launch_options)
        except Exception as e:  # a triton without the enable_fp_fusion option: launch without it
            if not _launch_options or "enable_fp_fusion" not in str(e):
                raise
            _launch_options = {}
            kernel[grid](*args, **meta, num_warps=NUM_WARPS_GPU)
    LAUNCHES[_kernel_name(kernel)] += 1


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(kernel))


def _seed_words(seed: int) -> tuple[int, int]:
    lo, hi = C.philox_key(seed)
    return _i32(lo), _i32(hi)


def _c1_high(query: int, stream: int) -> int:
    """Counter word C1 without the block bits: query << 16 | stream << 28, as int32 bits."""
    return _i32((query << 16) | (stream << 28))


# ----------------------------------------------------------------------------- interface
@register("philox", NAME)
def philox(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of int64 counters [n, 4] (uint32 values) -> int64 [n, 4]."""
    kernels = _k()
    ctr = counters.to(torch.int64).contiguous()
    out = torch.empty_like(ctr)
    n = ctr.shape[0]
    if n:
        grid = (-(-n // PHILOX_BLOCK),)
        _launch(kernels.philox_kernel, grid, ctr.device, ctr, out, n, _i32(key[0]), _i32(key[1]), BLOCK=PHILOX_BLOCK)
    return out


def _fill(mode: int, src: torch.Tensor, out: torch.Tensor, seed: int, key: int, query: int, stream: int,
          gaussian: bool, offset: int) -> None:
    kernels = _k()
    blocks = _blocks(out.device)
    tabs = _tables([out], [key], [offset], blocks)
    _launch(kernels.fill_kernel, (tabs.programs,), out.device, src, _pointer(out), tabs.tab, tabs.chunks,
            *_seed_words(seed), _c1_high(query, stream),
            MODE=mode, GAUSSIAN=gaussian, KIND=_KIND[out.dtype], BLOCKS=blocks, ALIGNED=tabs.aligned)


@register("perturbation", NAME)
def fill_perturbation(out: torch.Tensor, seed: int, key: int, query: int, stream: int, dist: str,
                      offset: int) -> None:
    """out[i] = z(seed, stream, query, key, offset + i) (float32)."""
    _fill(0, out, out, seed, key, query, stream, dist == "gaussian", offset)


@register("uniform", NAME)
def fill_uniform(out: torch.Tensor, seed: int, key: int, query: int, stream: int, offset: int) -> None:
    """out[i] = v(seed, stream, query, key, offset + i) in [0, 1) (float32)."""
    _fill(1, out, out, seed, key, query, stream, True, offset)


@register("stochastic_round", NAME)
def stochastic_round(x: torch.Tensor, out: torch.Tensor, seed: int, key: int, query: int, stream: int,
                     offset: int) -> None:
    """out = SR(x float32 -> out.dtype) with the uniforms v of (seed, stream, query, key, offset + i)."""
    _fill(2, x.contiguous(), out, seed, key, query, stream, True, offset)


def _perturb(group: Group, outs: list[torch.Tensor] | None, seed: int, scale: float, query: int, dist: str,
             rounding: str, sr_stream: int) -> None:
    kernels = _k()
    device = group.device
    blocks = _blocks(device)
    tabs = _tables(group.tensors, group.keys, group.offsets, blocks)
    if tabs.programs == 0:
        return
    src = _pointer(group.tensors[tabs.base])
    if outs is None:
        dst, out_deltas, aligned = src, tabs.tab, tabs.aligned
    else:
        out_deltas, outs_aligned = _out_deltas(outs, tabs.base)
        dst, aligned = _pointer(outs[tabs.base]), tabs.aligned and outs_aligned
    stochastic = rounding == "stochastic" and group.dtype != torch.float32
    _launch(kernels.perturb_kernel, (tabs.programs,), device, src, dst, tabs.tab, out_deltas, tabs.chunks,
            *_seed_words(seed), _c1_high(query, C.STREAM_Z), _c1_high(query, sr_stream), float(scale),
            KIND=_KIND[group.dtype], GAUSSIAN=dist == "gaussian", STOCHASTIC=stochastic, COPY=outs is not None,
            BLOCKS=blocks, ALIGNED=aligned)


@register("perturb_", NAME)
def perturb_(group: Group, seed: int, scale: float, query: int, dist: str, rounding: str,
             sr_stream: int) -> None:
    """theta <- R(theta + scale * z_query), one launch for the group."""
    _perturb(group, None, seed, scale, query, dist, rounding, sr_stream)


@register("perturbed_copy", NAME)
def perturbed_copy(group: Group, outs: list[torch.Tensor], seed: int, scale: float, query: int, dist: str,
                   rounding: str, sr_stream: int) -> None:
    """outs[i] = R(theta_i + scale * z_query), one launch for the group."""
    _perturb(group, outs, seed, scale, query, dist, rounding, sr_stream)


@register("zo_update_", NAME)
def zo_update_(group: Group, spec: UpdateSpec) -> None:
    """theta <- R(theta' - lr * (sum_q c_q z_q + wd * theta')), theta' = theta (+ restore_scale * z_rq);
    one launch for the group, queries looped inside the kernel."""
    kernels = _k()
    device = group.device
    blocks = _blocks(device)
    tabs = _tables(group.tensors, group.keys, group.offsets, blocks)
    if tabs.programs == 0:
        return
    coeffs = torch.tensor(list(spec.coeffs) or [0.0], dtype=torch.float32, device=device)
    restore = spec.restore_scale is not None
    stochastic = spec.rounding == "stochastic" and group.dtype != torch.float32
    _launch(kernels.update_kernel, (tabs.programs,), device, _pointer(group.tensors[tabs.base]), tabs.tab,
            tabs.chunks, _lr_wd(group.lrs, group.wds, device), coeffs, len(spec.coeffs), *_seed_words(spec.seed),
            float(spec.restore_scale) if restore else 0.0,
            _c1_high(spec.restore_query if restore else 0, C.STREAM_Z), _c1_high(0, spec.sr_stream),
            KIND=_KIND[group.dtype], GAUSSIAN=spec.dist == "gaussian", STOCHASTIC=stochastic, RESTORE=restore,
            BLOCKS=blocks, ALIGNED=tabs.aligned)
from . import masked, quant, quant_matmul  # noqa: E402,F401  (their ops register on import)
