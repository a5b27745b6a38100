"""Triton quantized matmuls for QuantLinear's forward: W8A8 (int8), FP8 (e4m3) and W4A16 (int4).

    W8A8 : y[m, n] = float32(sum_k xq[m, k] wq[n, k]) * sx[m] * sw[n] (+ b[n])   int8 tl.dot -> int32
    FP8  : the same formula with e4m3 xq, wq                                      e4m3 tl.dot -> float32
    W4A16: y[m, n] = sum_k x[m, k] * DT(q[n, k] * s[n, k // G]) (+ b[n])          tl.dot in x's dtype DT
                                                                                  -> float32

W8A8 / FP8 ("scaled dot" kernel): the same float32 epilogue order as the torch/reference paths of
zokernels.quant.matmul (FP contraction off), so W8A8 agrees bitwise with them; FP8 accumulates in
float32 in tile order (the exact reference accumulates in float64).
W4A16: per K tile the kernel loads the packed bytes [BN, BK/2] of the tile, splits the nibbles
(element 2i in the low nibble), sign-extends them, multiplies by the tile's group scale (BK divides
the group size, so one scale per row and tile), casts to the activation dtype and accumulates
tl.dot(x, w^T) in float32 (fp32 activations: input_precision="ieee", no TF32). The padding columns
K..Kp of the packed weight are zero and x is masked there. The dequantized weight only ever exists as
one [BK, BN] tile in registers / shared memory.

Tails (M, N, K not multiples of the tiles) are masked loads with 0 fill. Runs on CUDA, or on CPU
tensors under TRITON_INTERPRET=1 (tests: int8, e4m3, fp16 and fp32 tl.dot are exact there; bf16 tl.dot
is not, and fp32 -> e4m3 casts inside a kernel truncate, so activations are quantized outside the
kernel). FP8 needs sm_89+ (tl.float8e4nv). On a GPU the tiles are autotuned (a few configs, keyed on
N, K and M rounded up to a power of two); `tiles=` pins them. triton is imported lazily.
"""
from __future__ import annotations

import os

import torch

# W8A8's fixed tiles before autotuning existed; kept as the `tiles=` example of the tests.
GPU_TILES = (64, 64, 64)
INTERPRETER_TILES = (32, 32, 32)
# (BM, BN, BK, num_warps, num_stages): untuned starting points (no GPU was available to measure).
SCALED_DOT_CONFIGS = ((128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                      (64, 64, 64, 4, 4))
W4A16_CONFIGS = ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 32, 4, 4),
                 (16, 128, 64, 4, 4))
FP8_MIN_CAPABILITY = (8, 9)

_kernels: dict | None = None
_tuned: dict = {}
_error: str | None = None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _build() -> dict | None:
    global _kernels, _error
    if _kernels is not None or _error is not None:
        return _kernels
    try:
        import triton
        import triton.language as tl
    except Exception as e:  # noqa: BLE001
        _error = f"triton is not importable ({type(e).__name__}: {e}); pip install triton"
        return None

    @triton.jit
    def scaled_dot_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K, M_BUCKET, stride_am, stride_bn,
                          stride_cm, IS_INT: tl.constexpr, HAS_BIAS: tl.constexpr, FAST_ACC: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
        rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
        rk = tl.arange(0, BK).to(tl.int64)
        m_ok = rm < M
        n_ok = rn < N
        if IS_INT:
            acc = tl.zeros([BM, BN], dtype=tl.int32)
        else:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            k_ok = kk < K
            a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr + rn[None, :] * stride_bn + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IS_INT:
                acc += tl.dot(a, b, out_dtype=tl.int32)
            elif FAST_ACC:
                acc = tl.dot(a, b, acc)
            else:  # sm_90: promote the tensor cores' reduced-precision fp8 sums to float32 every K tile
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BK)
        sa = tl.load(sa_ptr + rm, mask=m_ok, other=0.0)
        sb = tl.load(sb_ptr + rn, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def w4a16_kernel(x_ptr, p_ptr, s_ptr, bias_ptr, c_ptr, M, N, K, M_BUCKET, stride_xm, stride_pn, stride_sn,
                     stride_cm, GROUP: tl.constexpr, IEEE: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
        rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
        rk = tl.arange(0, BK).to(tl.int64)
        rb = tl.arange(0, BK // 2).to(tl.int64)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :],
                        other=0.0)
            # k0 + BK <= Kp (BK divides GROUP, which divides Kp): the packed bytes need no K mask
            p = tl.load(p_ptr + rn[:, None] * stride_pn + (k0 // 2 + rb)[None, :], mask=n_ok[:, None],
                        other=0).to(tl.int32)
            lo = p & 15
            hi = (p >> 4) & 15
            q = tl.interleave(lo - ((lo & 8) << 1), hi - ((hi & 8) << 1))        # [BN, BK], -8..7
            s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_ok, other=0.0)
            w = (q.to(tl.float32) * s[:, None]).to(x.dtype)
            if IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        y = acc
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    _kernels = {"scaled_dot": scaled_dot_kernel, "w4a16": w4a16_kernel}
    return _kernels


def _autotuned(name: str, configs: tuple, group: int = 0):
    """The kernel wrapped in triton.autotune over `configs`, one wrapper per (name, group, configs)."""
    key = (name, group, configs)
    if key not in _tuned:
        import triton
        cfgs = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in configs if not group or group % bk == 0]
        _tuned[key] = triton.autotune(configs=cfgs, key=["M_BUCKET", "N", "K"])(_build()[name])
    return _tuned[key]


def unavailable_reason(device: torch.device, kind: str = "w8a8") -> str | None:
    """None if the Triton kernel `kind` ("w8a8" | "w4a16" | "fp8") can run on `device`, else why not."""
    device = torch.device(device)
    if device.type == "cpu" and not _interpreted():
        return "CPU tensors need TRITON_INTERPRET=1 (set before importing triton)"
    if device.type == "cuda" and _interpreted():
        return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only"
    if device.type not in ("cpu", "cuda"):
        return f"the triton kernels run on CUDA (or CPU under the interpreter), not {device.type}"
    if kind == "fp8" and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < FP8_MIN_CAPABILITY:
            return (f"e4m3 tl.dot needs compute capability >= 8.9 (Ada/Hopper); "
                    f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}")
    if _build() is None:
        return _error
    return None


def _check(kind: str, device: torch.device) -> None:
    reason = unavailable_reason(device, kind)
    if reason is not None:
        raise RuntimeError(f"triton {kind.upper()} matmul unavailable: {reason}")


def _pow2_at_least(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def _launch(name: str, configs: tuple, group: int, tiles, args: tuple, m: int, n: int, consts: dict,
            device: torch.device, autotune: bool | None = None) -> None:
    """Fixed tiles on CPU (interpreter) or when `tiles` is given; autotuned configs on a GPU (autotune=True
    forces the autotuned launch, which the interpreter runs when `configs` has one entry: tests)."""
    if autotune is None:
        autotune = device.type != "cpu" and tiles is None
    if not autotune:
        bm, bn, bk = tiles if tiles is not None else INTERPRETER_TILES
        grid = (-(-m // bm), -(-n // bn))
        kwargs = {} if device.type == "cpu" else {"enable_fp_fusion": False}
        _build()[name][grid](*args, **consts, BM=bm, BN=bn, BK=bk, **kwargs)
        return
    kernel = _autotuned(name, configs, group)
    kernel[lambda meta: (-(-m // meta["BM"]), -(-n // meta["BN"]))](*args, **consts, enable_fp_fusion=False)


def check_operands(x: torch.Tensor, k: int, n: int, x_scale: torch.Tensor | None, w: torch.Tensor,
                   w_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    """x [M, k], x_scale [M] (if any), w_scale [n] (or [n, G]: numel checked by the caller), bias [n], all on w's
    device: the kernels read raw memory from these sizes, so a mismatch must raise here."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"expected activations [M, {k}] for a weight {tuple(w.shape)}, got {tuple(x.shape)}")
    m = x.shape[0]
    if x_scale is not None and x_scale.numel() != m:
        raise ValueError(f"x_scale must have {m} values (one per row of x), got {x_scale.numel()}")
    if w_scale.ndim == 1 or w_scale.shape[-1] == 1:
        if w_scale.numel() != n:
            raise ValueError(f"w_scale must have {n} values (one per output row), got {w_scale.numel()}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must have {n} values, got {bias.numel()}")
    others = [t for t in (x, x_scale, w_scale, bias) if t is not None]
    if any(t.device != w.device for t in others):
        raise ValueError(f"all operands must be on one device, got {sorted({str(t.device) for t in others + [w]})}")


def _scaled_dot(kind: str, xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, tiles, fast_accum: bool = False) -> torch.Tensor:
    if wq.ndim != 2:
        raise ValueError(f"expected a weight [N, K], got shape {tuple(wq.shape)}")
    check_operands(xq, wq.shape[1], wq.shape[0], x_scale, wq, w_scale, bias)
    _check(kind, xq.device)
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
            {"IS_INT": kind == "w8a8", "HAS_BIAS": bias is not None, "FAST_ACC": fast_accum}, xq.device)
    return out


def w8a8(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
         bias: torch.Tensor | None, out_dtype: torch.dtype = torch.float32, tiles=None) -> torch.Tensor:
    """y = (xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias ([M, N], float32 unless out_dtype);
    xq [M, K], wq [N, K] int8; int32 accumulation (exact)."""
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise TypeError(f"w8a8 takes int8 operands, got {xq.dtype} and {wq.dtype}")
    return _scaled_dot("w8a8", xq, x_scale, wq, w_scale, bias, out_dtype, tiles)


def fp8(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
        bias: torch.Tensor | None, out_dtype: torch.dtype = torch.float32, tiles=None,
        fast_accum: bool = False) -> torch.Tensor:
    """y = (xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias; xq [M, K], wq [N, K] float8_e4m3fn;
    e4m3 x e4m3 products accumulated in float32. On sm_90 the wgmma sums are promoted to float32 every K
    tile (max_num_imprecise_acc=BK); fast_accum=True leaves them in the tensor cores' reduced-precision
    accumulator for the whole K (Triton's default for fp8; faster, less accurate)."""
    if xq.dtype != torch.float8_e4m3fn or wq.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8 takes float8_e4m3fn operands, got {xq.dtype} and {wq.dtype}")
    return _scaled_dot("fp8", xq, x_scale, wq, w_scale, bias, out_dtype, tiles, fast_accum)


W4A16_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def w4a16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int,
          bias: torch.Tensor | None, out_dtype: torch.dtype = torch.float32, tiles=None) -> torch.Tensor:
    """y = x @ (q * s)^T + bias with x [M, K] fp16/bf16/fp32, q int4 packed uint8 [N, Kp / 2] (element 2i in
    the low nibble, Kp a multiple of group_size >= K), s float32 [N, Kp / group_size]. The dequantized tile
    is cast to x's dtype; float32 accumulation."""
    if x.dtype not in W4A16_DTYPES:
        raise TypeError(f"w4a16 activations must be one of {W4A16_DTYPES}, got {x.dtype}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"w4a16 weights are packed uint8, got {packed.dtype}")
    if x.ndim != 2 or packed.ndim != 2:
        raise ValueError(f"expected x [M, K] and packed [N, Kp / 2], got {tuple(x.shape)} and {tuple(packed.shape)}")
    m, k = x.shape
    n, half = packed.shape
    kp = 2 * half
    if group_size <= 0 or kp % group_size or not k <= kp < k + group_size or scale.shape != (n, kp // group_size):
        raise ValueError(f"inconsistent int4 layout: K={k}, packed {tuple(packed.shape)}, scale "
                         f"{tuple(scale.shape)}, group_size={group_size}")
    check_operands(x, k, n, None, packed, scale, bias)
    _check("w4a16", x.device)
    x, packed = x.contiguous(), packed.contiguous()
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
