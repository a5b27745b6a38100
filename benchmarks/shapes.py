"""Parameter lists of real models (names and shapes as in HuggingFace), shrinkable for small devices.

`layer_scale` keeps round(layers * layer_scale) decoder layers (at least 1); `width_div` divides
every width (hidden, ffn, vocab, positions) for CPU smoke runs. Values are random (N(0, 0.02^2)),
never zeros, so no kernel can take a shortcut on special values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShapeSet:
    name: str
    params: tuple[tuple[str, tuple[int, ...]], ...]
    note: str

    @property
    def numel(self) -> int:
        return sum(_prod(s) for _, s in self.params)

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * torch.empty((), dtype=dtype).element_size()

    @property
    def largest(self) -> int:
        return max(_prod(s) for _, s in self.params)


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _w(x: int, div: int) -> int:
    return max(8, x // div)


def _layers(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def big_tensor(numel: int) -> ShapeSet:
    return ShapeSet(f"one-tensor-{numel}", (("big.weight", (numel,)),), f"a single tensor of {numel} elements")


def llama7b(layer_scale: float = 1.0, width_div: int = 1) -> ShapeSet:
    """LLaMA-7B: 32 layers of q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008, two RMSNorms;
    embed_tokens and lm_head 32000x4096 (untied), final norm."""
    h, f, v, n = _w(4096, width_div), _w(11008, width_div), _w(32000, width_div), _layers(32, layer_scale)
    ps: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(n):
        pre = f"model.layers.{i}."
        ps += [(pre + f"self_attn.{p}_proj.weight", (h, h)) for p in "qkvo"]
        ps += [(pre + "mlp.gate_proj.weight", (f, h)), (pre + "mlp.up_proj.weight", (f, h)),
               (pre + "mlp.down_proj.weight", (h, f)),
               (pre + "input_layernorm.weight", (h,)), (pre + "post_attention_layernorm.weight", (h,))]
    ps += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return ShapeSet("llama-7b" + _suffix(layer_scale, width_div, n, 32), tuple(ps),
                    f"LLaMA-7B parameter list: {n} layers, hidden {h}, ffn {f}, vocab {v}")


def opt1_3b(layer_scale: float = 1.0, width_div: int = 1) -> ShapeSet:
    """OPT-1.3B: 24 layers, d=2048, ffn 8192, biases everywhere, vocab 50272 (lm_head tied),
    learned positions 2050x2048, final LayerNorm."""
    d, f, v, pos = _w(2048, width_div), _w(8192, width_div), _w(50272, width_div), _w(2050, width_div)
    n = _layers(24, layer_scale)
    ps: list[tuple[str, tuple[int, ...]]] = [("model.decoder.embed_tokens.weight", (v, d)),
                                             ("model.decoder.embed_positions.weight", (pos, d))]
    for i in range(n):
        pre = f"model.decoder.layers.{i}."
        for p in ("k", "v", "q", "out"):
            ps += [(pre + f"self_attn.{p}_proj.weight", (d, d)), (pre + f"self_attn.{p}_proj.bias", (d,))]
        ps += [(pre + "self_attn_layer_norm.weight", (d,)), (pre + "self_attn_layer_norm.bias", (d,)),
               (pre + "fc1.weight", (f, d)), (pre + "fc1.bias", (f,)),
               (pre + "fc2.weight", (d, f)), (pre + "fc2.bias", (d,)),
               (pre + "final_layer_norm.weight", (d,)), (pre + "final_layer_norm.bias", (d,))]
    ps += [("model.decoder.final_layer_norm.weight", (d,)), ("model.decoder.final_layer_norm.bias", (d,))]
    return ShapeSet("opt-1.3b" + _suffix(layer_scale, width_div, n, 24), tuple(ps),
                    f"OPT-1.3B parameter list: {n} layers, d {d}, ffn {f}, vocab {v}, positions {pos}")


def _suffix(layer_scale: float, width_div: int, n: int, full: int) -> str:
    s = "" if n == full else f"-{n}of{full}layers"
    return s + ("" if width_div == 1 else f"-width/{width_div}")


def make_params(shapes: ShapeSet, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, Parameter) pairs, requires_grad=False, filled with N(0, 0.02^2) in `dtype`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    out = []
    for name, shape in shapes.params:
        t = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
        out.append((name, torch.nn.Parameter(t, requires_grad=False)))
    return out
