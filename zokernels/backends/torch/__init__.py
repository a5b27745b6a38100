"""The torch backend: vendor kernels reached through torch (cuBLAS / cuBLASLt int8 and fp8 GEMMs via
torch._int_mm and torch._scaled_mm, dequantize-then-matmul in the activation dtype). It implements the
quantized matmuls only (quant_matmul.py); its implementations say per call when the installed torch or
device cannot run them."""
from __future__ import annotations

import torch

NAME = "torch"


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"the torch backend runs on CPU or CUDA tensors, not {device.type}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    return None


from . import quant_matmul  # noqa: E402,F401  (its ops register on import)
