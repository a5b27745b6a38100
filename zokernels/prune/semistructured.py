"""2:4-pruned Linears on NVIDIA's sparse tensor cores: PyTorch's semi-structured sparse matmul
(`torch.sparse.to_sparse_semi_structured`, a SparseSemiStructuredTensor weight that nn.Linear's F.linear dispatches
to a 2:4 sparse GEMM). What it needs, checked before any weight changes:

    device   a CUDA GPU: compute capability >= 8.0 for cuSPARSELt (Ampere, Ada, Hopper, ...), exactly 8.x for
             torch's CUTLASS kernels (they refuse Hopper: sm_90 has cuSPARSELt only); on CPU the linears stay dense
    dtype    float16 or bfloat16 weights (cuSPARSELt has no float32 kernel; float32 is refused for both backends);
             the activations must have the weight's dtype
    pattern  at most 2 nonzeros in every 4 consecutive weights along the input dimension (is_two_four)
    shape    [out, in] multiples of the backend's block: cuSPARSELt (16, 16) for fp16/bf16, CUTLASS (32, 64)
             (torch's SparseSemiStructuredTensor*._DTYPE_SHAPE_CONSTRAINTS); the activation rows are padded

Backends: "cusparselt" (torch's default, when torch.backends.cusparselt.is_available()) or "cutlass" (torch's own
kernels, its fallback; also what SparseSemiStructuredTensor._FORCE_CUTLASS = True selects); "auto" picks as
to_sparse_semi_structured does (CUTLASS compresses on any GPU but its matmul fails off 8.x: checked here). The
converted weight is a frozen nn.Parameter (requires_grad False; the subclass supports only matmul-like ops):
convert for inference, after any ZO fine-tuning of the pruned model."""
from __future__ import annotations

import torch
from torch import nn

from .calibration import block_linears, decoder_blocks
from .patterns import PruneError

SEMI_DTYPES = (torch.float16, torch.bfloat16)
BACKENDS = ("auto", "cusparselt", "cutlass")
# (rows, cols) multiples of the weight per backend for fp16/bf16, as torch 2.11-2.13 state them; the classes'
# own _DTYPE_SHAPE_CONSTRAINTS win when present
_BLOCK = {"cusparselt": (16, 16), "cutlass": (32, 64)}
CPU_MESSAGE = "semi-structured sparse matmuls need a CUDA GPU; on CPU the pruned linears stay dense"


def is_two_four(weight: torch.Tensor) -> bool:
    """True if `weight` [out, in] has at most 2 nonzeros (NaN counts as nonzero) in every group of 4 consecutive
    entries along the input dimension (`in` a multiple of 4); pure torch, any device."""
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] % 4:
        return False
    rows, cols = weight.shape
    nonzero = (weight.detach() != 0).reshape(rows, cols // 4, 4).sum(dim=-1)
    return bool((nonzero <= 2).all())


def _sparse_class(backend: str):
    return {"cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
            "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS}[backend]


def resolve_backend(backend: str = "auto") -> str:
    """"cusparselt" or "cutlass": `backend`, or for "auto" what to_sparse_semi_structured would use (cuSPARSELt
    unless torch lacks it or SparseSemiStructuredTensor._FORCE_CUTLASS is set)."""
    if backend not in BACKENDS:
        raise PruneError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    forced = torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS
    return "cutlass" if forced or not _has_cusparselt() else "cusparselt"


def _has_cusparselt() -> bool:
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return cusparselt is not None and cusparselt.is_available()


def backend_problem(device: torch.device | str, backend: str = "auto") -> str | None:
    """Why `backend` cannot run semi-structured sparse matmuls on `device`, None if it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_MESSAGE
    chosen = resolve_backend(backend)
    cap = torch.cuda.get_device_capability(device)
    gpu = f"{torch.cuda.get_device_name(device)} is compute capability {cap[0]}.{cap[1]}"
    if chosen == "cusparselt" and not _has_cusparselt():
        return f"torch {torch.__version__} has no cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
    if chosen == "cusparselt" and cap < (8, 0):
        return f"cuSPARSELt 2:4 matmuls need compute capability >= 8.0; {gpu}"
    if chosen == "cutlass" and cap[0] != 8:
        return f"torch's CUTLASS 2:4 matmuls run only on compute capability 8.x; {gpu} (use cuSPARSELt)"
    return None


def block_shape(dtype: torch.dtype, backend: str) -> tuple[int, int]:
    """(rows, cols) the weight's shape must be a multiple of, for `dtype` under `backend` ("cusparselt", "cutlass")."""
    cfg = getattr(_sparse_class(backend), "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    return (cfg.sparse_min_rows, cfg.sparse_min_cols) if cfg is not None else _BLOCK[backend]


def layer_problem(weight: torch.Tensor, backend: str) -> str | None:
    """Why `weight` cannot become a semi-structured sparse weight under `backend` (dtype, 2:4, shape), None if it
    can; the device is checked separately (to_semi_structured)."""
    if weight.dtype not in SEMI_DTYPES:
        return (f"dtype {weight.dtype} (semi-structured sparse matmuls take float16 / bfloat16: "
                "model.half() or model.to(torch.bfloat16) first)")
    if not is_two_four(weight):
        return "not 2:4 sparse (some group of 4 consecutive input weights has more than 2 nonzeros)"
    rows, cols = block_shape(weight.dtype, backend)
    out_f, in_f = weight.shape
    if out_f % rows or in_f % cols:
        return f"shape [out {out_f}, in {in_f}] is not a multiple of ({rows}, {cols}), the {backend} block"
    return None


def semi_structured(weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The SparseSemiStructuredTensor of a 2:4-sparse CUDA fp16/bf16 `weight` [out, in] (not requiring grad)."""
    return _sparse_class(resolve_backend(backend)).from_dense(weight.detach().contiguous())


def _targets(model: nn.Module, report, blocks: str | None) -> list[tuple[str, nn.Linear]]:
    if report is not None:
        if report.pattern != "2:4":
            raise PruneError(f"the report's pattern is {report.pattern!r}: only 2:4-pruned linears can use "
                             "semi-structured sparse matmuls (prune with pattern='2:4')")
        out = []
        for name in report.masks:
            try:
                module = model.get_submodule(name.removesuffix(".weight")) if name.endswith(".weight") else None
            except AttributeError:
                module = None
            if not isinstance(module, nn.Linear):
                raise PruneError(f"{name}: not the weight of an nn.Linear of this model")
            out.append((name, module))
        return out
    path, block_list = decoder_blocks(model, blocks)
    out = [(f"{path}.{i}.{n}.weight", m) for i, b in enumerate(block_list) for n, m in block_linears(b)]
    return [(name, m) for name, m in out
            if isinstance(m.weight, torch.sparse.SparseSemiStructuredTensor) or is_two_four(m.weight)]


def to_semi_structured(model: nn.Module, report=None, *, backend: str = "auto",
                       blocks: str | None = None) -> list[str]:
    """Replace the weight of every 2:4-pruned nn.Linear of `model` by its semi-structured sparse form (in place);
    returns the converted weights' names. With a PruneReport (pattern "2:4"): the Linears of report.masks; without:
    every Linear inside the decoder blocks (`blocks`: their path, as prune() takes it) whose weight is 2:4 sparse.
    Linears already converted are left as they are. Raises PruneError, before any weight changes, on CPU
    weights, float32 weights, a weight that is not 2:4 sparse or a shape the backend cannot take (naming the
    layers), or when nothing is 2:4 sparse. Every weight is compressed before the first is replaced (peak memory:
    the dense linears plus their compressed copies)."""
    chosen = resolve_backend(backend)
    found = _targets(model, report, blocks)
    if not found:
        raise PruneError("no 2:4-sparse nn.Linear to convert: prune with pattern='2:4' first")
    targets = [(n, m) for n, m in found if not isinstance(m.weight, torch.sparse.SparseSemiStructuredTensor)]
    cpu = [(n, m.weight.device) for n, m in targets if m.weight.device.type != "cuda"]
    if cpu:
        raise PruneError(f"{CPU_MESSAGE} ({cpu[0][0]} is on {cpu[0][1]}"
                         + (f", and {len(cpu) - 1} more" if len(cpu) > 1 else "") + ")")
    for dev in {m.weight.device for _, m in targets}:
        why = backend_problem(dev, chosen)
        if why:
            raise PruneError(f"semi-structured sparse matmuls ({chosen}) cannot run on {dev}: {why}")
    bad = [f"{n}: {why}" for n, m in targets if (why := layer_problem(m.weight, chosen)) is not None]
    if bad:
        raise PruneError(f"cannot convert {len(bad)} of {len(targets)} linears to 2:4 semi-structured sparse "
                         f"({chosen}): " + "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""))
    sparse = {n: semi_structured(m.weight, chosen) for n, m in targets}  # all compressed before any is replaced
    for n, m in targets:
        m.weight = nn.Parameter(sparse[n], requires_grad=False)
    return [n for n, _ in targets]
