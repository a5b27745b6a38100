"""QuantLinear (a quantized nn.Linear) and quantize_model (swap every nn.Linear for one).

Forward paths (`matmul=`; the kernels and their backends: zokernels.quant.matmul):
  "dequant": y = x @ (q * s)^T + b in float32 (every format; the reference path).
  "w8a8"   : int8 only. Activations quantized per token (s_m = amax_m / 127), to nearest or, during a
             QuZO probe with act_sr, stochastically (STREAM_ACT_SR, the probe's query, the layer key,
             j = m * K + k: both probes of a query draw the same uniforms); int8 x int8 -> int32
             accumulation, then y = acc * s_m * s_n + b (zokernels.quant.matmul.w8a8_matmul).
  "fp8"    : fp8 only. Activations per token to e4m3 (s_m = amax_m / 448; RN, or SR_e4m3 with the
             same act_sr uniforms as w8a8); e4m3 x e4m3 -> float32 accumulation, y = acc * s_m * s_n + b.
  "w4a16"  : int4 only. Activations stay in their dtype DT (fp16 / bf16 / fp32); the weight is unpacked
             and dequantized tile by tile to DT inside the matmul, float32 accumulation, + b.
  "auto"   : resolved per call from the input's device: on CUDA the format's own path (int8 -> w8a8,
             int4 -> w4a16, fp8 -> fp8), elsewhere "dequant" (the CPU paths are slower than dequant).
`matmul_backend` ("auto" | "reference" | "torch" | "triton") picks the implementation of the quantized
paths (see zokernels.quant.matmul; "auto": the registry's first backend that can run the call: Triton on
CUDA, then torch._int_mm / _scaled_mm / dequantize + torch.matmul, then the exact reference).

During a QuZO probe the optimizer sets `probe` on every QuantLinear; the forward then uses the probe
weights clamp(q +- Q1(eps z / s)) computed on the fly (drift-free: q itself is never written, the
scratch lives for this layer's forward only); each path consumes them in its own storage format
(int8 / repacked int4 / e4m3).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import contract as C
from . import formats as F
from . import matmul as MM
from . import ops as Q

MATMULS = ("dequant", "w8a8", "w4a16", "fp8", "auto")
# the format each quantized forward path needs, and the path "auto" resolves to on CUDA
MATMUL_FORMAT = {"w8a8": "int8", "w4a16": "int4", "fp8": "fp8"}
AUTO_MATMUL = {fmt: mode for mode, fmt in MATMUL_FORMAT.items()}


@dataclass
class ProbeSpec:
    """Probe (query, sign) of step seed `seed`; sr_seed / act_seed default to seed (tests redraw them)."""

    seed: int
    query: int
    sign: int
    eps: float
    dist: str = "gaussian"
    act_sr: bool = False
    sr_seed: int | None = None
    act_seed: int | None = None
    saturated: int = 0
    cache: dict | None = None    # shared by the probes and the update of one step (see ops._z)
    skip_keys: set = field(default_factory=set)   # layers already perturbed in place (inplace probes)
    backend: str = "auto"     # backend of the probe kernels (zokernels.ops.quant_probe)
    counters: dict = field(default_factory=dict)  # device -> int64 [1] saturation counter of the kernels

    def counter(self, device: torch.device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self.counters:
            self.counters[device] = Q.new_counter(device)
        return self.counters[device]

    def saturated_total(self) -> int:
        """Clamped elements of this probe so far (host sync on the kernels' counters)."""
        return self.saturated + sum(int(c) for c in self.counters.values())


class QuantLinear(torch.nn.Module):
    """y = x W^T + b with W stored quantized (see zokernels.quant.formats). Buffers: qweight, scale,
    bias (None or float); nothing here requires grad."""

    def __init__(self, qw: F.QuantizedWeight, bias: torch.Tensor | None, *, matmul: str = "dequant",
                 matmul_backend: str = "auto", out_dtype: torch.dtype = torch.float32, key: int = 0):
        super().__init__()
        if matmul not in MATMULS:
            raise ValueError(f"matmul must be one of {MATMULS}, got {matmul!r}")
        if matmul in MATMUL_FORMAT and qw.fmt != MATMUL_FORMAT[matmul]:
            raise ValueError(f"matmul={matmul!r} needs fmt={MATMUL_FORMAT[matmul]!r}, not {qw.fmt!r}")
        if matmul_backend not in MM.MATMUL_BACKENDS:
            raise ValueError(f"matmul_backend must be one of {MM.MATMUL_BACKENDS}, got {matmul_backend!r}")
        self.fmt = qw.fmt
        self.out_features, self.in_features = qw.shape
        self.group_size = qw.group_size
        self.matmul = matmul
        self.matmul_backend = matmul_backend
        self.out_dtype = out_dtype
        self.key = key
        self.probe: ProbeSpec | None = None
        self.register_buffer("qweight", qw.q)
        self.register_buffer("scale", qw.scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def qw(self) -> F.QuantizedWeight:
        """A view of the buffers (in-place ops on it change the module)."""
        return F.QuantizedWeight(self.fmt, self.qweight, self.scale, (self.out_features, self.in_features),
                                 self.group_size)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}{g}, "
                f"matmul={self.matmul}, matmul_backend={self.matmul_backend}, bias={self.bias is not None}")

    def resolved_matmul(self, device: torch.device) -> str:
        """The forward path used for inputs on `device` ("auto" resolved; see the module docstring)."""
        if self.matmul != "auto":
            return self.matmul
        return AUTO_MATMUL[self.fmt] if torch.device(device).type == "cuda" else "dequant"

    def _activation_uniforms(self, x2: torch.Tensor) -> torch.Tensor | None:
        """SR uniforms of the activations during a probe with act_sr (shared by both probes of a query)."""
        spec = self.probe
        if spec is None or not spec.act_sr:
            return None
        act_seed = spec.seed if spec.act_seed is None else spec.act_seed
        return MM.activation_uniforms(x2.shape, act_seed, self.key, spec.query, x2.device)

    def nbytes(self) -> int:
        b = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.qw.nbytes() + b

    def _probe_values(self, packed_int4: bool = False) -> torch.Tensor | None:
        """Grid values [N, K] of this layer's probe weights, or None outside a probe: int8 / float8_e4m3fn
        from the backend kernel (quant.ops.probe_weights), or int32 / float32 when the step caches z (CPU)
        or a test redraws Q1 (sr_seed). packed_int4 (int4 layers): uint8 [N, Kp / 2] in qweight's layout
        instead, written by the kernel directly (what the W4A16 matmul reads)."""
        spec = self.probe
        if spec is None or self.key in spec.skip_keys:
            return None
        packed = packed_int4 and self.fmt == "int4"
        if spec.cache is None and spec.sr_seed is None:
            return Q.probe_weights(self.qw, spec.seed, self.key, spec.query, spec.eps, spec.sign, spec.dist,
                                   out_dtype=torch.uint8 if packed else None,
                                   saturated=spec.counter(self.qweight.device), backend=spec.backend)
        res = Q.probe_values(self.qw, spec.seed, self.key, spec.query, spec.eps, spec.sign, spec.dist,
                             spec.sr_seed, spec.cache)
        spec.saturated += res.saturated
        return MM.pack_values_int4(self.qw, res.values) if packed else res.values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.resolved_matmul(x.device)
        vals = self._probe_values(packed_int4=mode == "w4a16")   # W4A16 reads the probe weights packed
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        out_dtype = x.dtype if x.is_floating_point() else self.out_dtype
        if mode == "w8a8":
            wq = self.qweight if vals is None else vals.to(torch.int8)
            xq, xs = MM.quantize_activations(x2, self._activation_uniforms(x2))
            y = MM.w8a8_matmul(xq, xs, wq, self.scale.reshape(-1), self.bias, self.matmul_backend)
        elif mode == "fp8":
            wq = self.qweight if vals is None else vals.to(torch.float8_e4m3fn)   # e4m3 grid values: exact
            xq, xs = MM.quantize_activations_fp8(x2, self._activation_uniforms(x2))
            y = MM.fp8_matmul(xq, xs, wq, self.scale.reshape(-1), self.bias, self.matmul_backend, out_dtype=out_dtype)
        elif mode == "w4a16":
            y = MM.w4a16_matmul(x2 if x.is_floating_point() else x2.to(torch.float32), self.qw, self.bias,
                                self.matmul_backend, packed=vals, out_dtype=out_dtype)
        else:
            w = F.dequantize(self.qw, vals)
            y = x2.to(torch.float32) @ w.t()
            if self.bias is not None:
                y = y + self.bias.to(torch.float32)
        return y.to(out_dtype).reshape(*lead, self.out_features)


@dataclass
class QuantReport:
    """Bytes of the replaced nn.Linear weights + biases before and after, and the layers swapped."""

    fmt: str
    layers: list[str]
    bytes_before: int
    bytes_after: int
    model_bytes_before: int
    model_bytes_after: int

    @property
    def saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def __str__(self) -> str:
        mib = 1 << 20
        return (f"quantize_model({self.fmt}): {len(self.layers)} linear layers, {self.bytes_before / mib:.2f} MiB "
                f"-> {self.bytes_after / mib:.2f} MiB ({self.bytes_before / max(self.bytes_after, 1):.2f}x); "
                f"model {self.model_bytes_before / mib:.2f} -> {self.model_bytes_after / mib:.2f} MiB")


def _excluded(name: str, exclude) -> bool:
    if isinstance(exclude, str):  # one name, not its characters
        exclude = (exclude,)
    return any(name == e or name.endswith("." + e) for e in exclude)


def _model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def quant_layers(model: torch.nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def weight_key(module_name: str) -> int:
    """Contract key of a QuantLinear's weight: param_key('<module>.weight') (the nn.Linear's name)."""
    return C.param_key(f"{module_name}.weight" if module_name else "weight")


@torch.no_grad()
def quantize_model(model: torch.nn.Module, fmt: str = "int8", *, exclude=("lm_head",), group_size: int = 128,
                   rounding: str = "nearest", seed: int = 0, matmul: str = "dequant",
                   matmul_backend: str = "auto") -> QuantReport:
    """Replace every nn.Linear of `model` (in place) whose name is not in `exclude` (exact name or last
    segments, e.g. "lm_head") by a QuantLinear of format fmt ("int8" | "int4" | "fp8"). Quantization
    rounds to nearest or stochastically (STREAM_QUANT_SR, `seed`, the weight's key). Returns a QuantReport.
    matmul: the layers' forward path, "dequant" | "auto" (CUDA: the format's quantized path, CPU: dequant)
    | the format's own path ("w8a8" for int8, "w4a16" for int4, "fp8" for fp8); matmul_backend: see
    zokernels.quant.matmul.

    Raises ValueError, before changing anything, when no nn.Linear is left to quantize (none in the model, all
    excluded, or all already QuantLinear): a 0-layer "quantized" model is the float model, and a run would go
    on to train and report it as quantized (a warning scrolls past in a training log)."""
    F.check_format(fmt)
    if matmul in MATMUL_FORMAT and MATMUL_FORMAT[matmul] != fmt:
        raise ValueError(f"matmul={matmul!r} needs fmt={MATMUL_FORMAT[matmul]!r}, not {fmt!r}")
    linears = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    targets = [(n, m) for n, m in linears if not _excluded(n, exclude)]
    if not targets:
        done = len(quant_layers(model))
        why = (f"all {len(linears)} nn.Linear layers are excluded by exclude={exclude!r}" if linears else
               f"its {done} linear layers are already quantized (QuantLinear)" if done else
               "it has none (only exact nn.Linear modules are quantized; subclasses and Conv1D-style layers are not)")
        raise ValueError(f"quantize_model found no nn.Linear to quantize in {type(model).__name__}: {why}; "
                         "the model was not changed")
    before_model = _model_bytes(model)
    before = after = 0
    for name, lin in targets:
        key = weight_key(name)
        qw = F.quantize_weight(lin.weight, fmt, rounding=rounding, seed=seed, key=key, group_size=group_size)
        new = QuantLinear(qw, lin.bias, matmul=matmul, matmul_backend=matmul_backend,
                          out_dtype=lin.weight.dtype, key=key)
        before += lin.weight.numel() * lin.weight.element_size()
        if lin.bias is not None:
            before += lin.bias.numel() * lin.bias.element_size()
        after += new.nbytes()
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], new)
    return QuantReport(fmt, [n for n, _ in targets], before, after, before_model, _model_bytes(model))
