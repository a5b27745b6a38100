"""Every op of the package, declared once: dense (dense.py), masked (masked.py), quantized-weight (quant.py)
and quantized matmuls (matmul.py). Each declaration validates its arguments and dispatches through the one
registry (zokernels.backends.registry); `python -m zokernels` prints the op x backend table."""
from __future__ import annotations

from ..backends.registry import BACKEND_ENV, BackendUnavailable
from ._checks import FLOAT_DTYPES, OpError, backend_name, memory_span, overlapping_pair
from ._checks import f32 as _f32  # noqa: F401  (the scalar check other layers share)
from .dense import (perturb_, perturbation, perturbed_copy, philox4x32, stochastic_round, uniform,
                    zo_update_)
from .masked import MASKED_OPS, masked_perturb_, masked_perturbed_copy, masked_zo_update_
from .matmul import MATMUL_OPS, fp8_matmul, w4a16_matmul, w8a8_matmul
from .quant import QUANT_OPS, quant_probe, quant_quantize, quant_update_, quantize_activations

__all__ = ["perturbation", "uniform", "stochastic_round", "perturb_", "perturbed_copy", "zo_update_",
           "masked_perturb_", "masked_perturbed_copy", "masked_zo_update_", "philox4x32", "backend_name",
           "memory_span", "overlapping_pair", "OpError", "BackendUnavailable", "BACKEND_ENV", "FLOAT_DTYPES",
           "MASKED_OPS", "quant_quantize",
           "quant_probe", "quant_update_", "quantize_activations", "QUANT_OPS", "w8a8_matmul", "fp8_matmul",
           "w4a16_matmul", "MATMUL_OPS"]

