"""Quantized matmuls of the Triton backend: host side (kernels: quant_matmul_kernels.py, imported lazily, so
that importing the backend never imports triton). The ops and their contract: zokernels/ops/matmul.py.

The registered kernels take the operands as zokernels.ops.matmul validated them. w8a8 / fp8 / w4a16 below
are also the direct entry points of tests and benchmarks, with the Triton-only knobs: `tiles=(BM, BN, BK)`
pins the tiles (else fixed INTERPRETER_TILES under the interpreter, autotuned over a few configs on a GPU,
keyed on N, K and M rounded up to a power of two) and fp8's `fast_accum`.

Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (tests: int8, e4m3, fp16 and fp32 tl.dot are exact
there; bf16 tl.dot is not, and fp32 -> e4m3 casts inside a kernel truncate, so activations are quantized
outside the kernel). FP8 needs sm_89+ (tl.float8e4nv).
"""
from __future__ import annotations

import torch

from ..registry import register
from . import LAUNCHES, NAME

# W8A8's fixed tiles of the `tiles=` example in the tests and benchmarks.
GPU_TILES = (64, 64, 64)
INTERPRETER_TILES = (32, 32, 32)
# (BM, BN, BK, num_warps, num_stages): not yet measured on a GPU
# (benchmarks/quant.py records the autotuner's choice per shape).
SCALED_DOT_CONFIGS = ((128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                      (64, 64, 64, 4, 4))
W4A16_CONFIGS = ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 32, 4, 4),
                 (16, 128, 64, 4, 4))
FP8_MIN_CAPABILITY = (8, 9)

_mk = None
_mk_error: str | None = None
_tuned: dict = {}


def _kernels():
    """The kernels module, or None with _mk_error set (loaded once)."""
    global _mk, _mk_error
    if _mk is None and _mk_error is None:
        try:
            from . import quant_matmul_kernels
            _mk = quant_matmul_kernels
        except Exception as e:  # noqa: BLE001 — whatever fails, the kernels cannot run
            _mk_error = f"cannot build the triton matmul kernels ({type(e).__name__}: {e})"
    return _mk


def _unbuilt(device: torch.device, call: dict) -> str | None:
    """supports() of W8A8 / W4A16: the kernels module loads (the backend's unavailable_reason covered the rest)."""
    return _mk_error if _kernels() is None else None


def _fp8_unsupported(device: torch.device, call: dict) -> str | None:
    """supports() of FP8: e4m3 tl.dot needs compute capability 8.9 (Ada / Hopper) on a GPU."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < FP8_MIN_CAPABILITY:
            return (f"e4m3 tl.dot needs compute capability >= 8.9 (Ada/Hopper); "
                    f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}")
    return _unbuilt(device, call)


def _k():
    mk = _kernels()
    if mk is None:
        raise RuntimeError(_mk_error)
    return mk


def _autotuned(name: str, configs: tuple, group: int = 0):
    """The kernel wrapped in triton.autotune over `configs`, one wrapper per (name, group, configs)."""
    key = (name, group, configs)
    if key not in _tuned:
        import triton
        cfgs = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in configs if not group or group % bk == 0]
        _tuned[key] = triton.autotune(configs=cfgs, key=["M_BUCKET", "N", "K"])(getattr(_k(), name + "_kernel"))
    return _tuned[key]


def _pow2_at_least(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def _launch(name: str, configs: tuple, group: int, tiles, args: tuple, m: int, n: int, consts: dict,
            device: torch.device, autotune: bool | None = None) -> None:
    """Kernel `name` ("scaled_dot" | "w4a16") with fixed tiles on CPU (interpreter) or when `tiles` is given,
    autotuned configs on a GPU (autotune=True forces the autotuned launch, which the interpreter runs when
    `configs` has one entry: tests). FP contraction off on the GPU. Counts the launch in LAUNCHES."""
    if autotune is None:
        autotune = device.type != "cpu" and tiles is None
    if not autotune:
        bm, bn, bk = tiles if tiles is not None else INTERPRETER_TILES
        grid = (-(-m // bm), -(-n // bn))
        kwargs = {} if device.type == "cpu" else {"enable_fp_fusion": False}
        getattr(_k(), name + "_kernel")[grid](*args, **consts, BM=bm, BN=bn, BK=bk, **kwargs)
    else:
        kernel = _autotuned(name, configs, group)
        kernel[lambda meta: (-(-m // meta["BM"]), -(-n // meta["BN"]))](*args, **consts, enable_fp_fusion=False)
    LAUNCHES[name + "_kernel"] += 1


def _scaled_dot(is_int: bool, xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, tiles, fast_accum: bool = False) -> torch.Tensor:
    xq, wq = xq.contiguous(), wq.contiguous()
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    sa = x_scale.to(torch.float32).reshape(-1).contiguous()
    sb = w_scale.to(torch.float32).reshape(-1).contiguous()
    b = bias.to(torch.float32).contiguous() if bias is not None else sb
    args = (xq, wq, sa, sb, b, out, m, n, k, _pow2_at_least(m), xq.stride(0), wq.stride(0), out.stride(0))
    _launch("scaled_dot", SCALED_DOT_CONFIGS, 0, tiles, args, m, n,
            {"IS_INT": is_int, "HAS_BIAS": bias is not None, "FAST_ACC": fast_accum}, xq.device)
    return out


@register("w8a8_matmul", NAME, supports=_unbuilt)
def w8a8(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
         bias: torch.Tensor | None, out_dtype: torch.dtype = torch.float32, tiles=None) -> torch.Tensor:
    """y = (xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias ([M, N] in out_dtype); xq [M, K], wq [N, K]
    int8; int32 accumulation (exact)."""
    return _scaled_dot(True, xq, x_scale, wq, w_scale, bias, out_dtype, tiles)


@register("fp8_matmul", NAME, supports=_fp8_unsupported)
def fp8(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
        bias: torch.Tensor | None, out_dtype: torch.dtype = torch.float32, tiles=None,
        fast_accum: bool = False) -> torch.Tensor:
    """y = (xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias; xq [M, K], wq [N, K] float8_e4m3fn;
    e4m3 x e4m3 products accumulated in float32. On sm_90 the wgmma sums are promoted to float32 every K
    tile (max_num_imprecise_acc=BK); fast_accum=True leaves them in the tensor cores' reduced-precision
    accumulator for the whole K (Triton's default for fp8; faster, less accurate)."""
    return _scaled_dot(False, xq, x_scale, wq, w_scale, bias, out_dtype, tiles, fast_accum)


def w4a16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int,
          bias: torch.Tensor | None, out_dtype: torch.dtype = torch.float32, tiles=None) -> torch.Tensor:
    """y = x @ (q * s)^T + bias with x [M, K] fp16/bf16/fp32, q int4 packed uint8 [N, Kp / 2] (element 2i in
    the low nibble, Kp a multiple of group_size >= K), s float32 [N, Kp / group_size]. The dequantized tile
    is cast to x's dtype; float32 accumulation. The K tile must divide group_size."""
    x, packed = x.contiguous(), packed.contiguous()
    m, k = x.shape
    n = packed.shape[0]
    sc = scale.to(torch.float32).contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if tiles is None and x.device.type == "cpu":
        tiles = (32, 32, min(32, group_size))
    if tiles is not None and group_size % tiles[2]:
        raise ValueError(f"the K tile {tiles[2]} must divide group_size={group_size}")
    b = bias.to(torch.float32).contiguous() if bias is not None else sc
    args = (x, packed, sc, b, out, m, n, k, _pow2_at_least(m), x.stride(0), packed.stride(0), sc.stride(0),
            out.stride(0))
    _launch("w4a16", W4A16_CONFIGS, group_size, tiles, args, m, n,
            {"GROUP": group_size, "IEEE": x.dtype == torch.float32, "HAS_BIAS": bias is not None}, x.device)
    return out


@register("w4a16_matmul", NAME, supports=_unbuilt)
def w4a16_matmul(x, packed, scale, k, group_size, bias, out_dtype) -> torch.Tensor:
    return w4a16(x, packed, scale, group_size, bias, out_dtype)
