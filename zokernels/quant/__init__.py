"""Low-bit weights for zeroth-order fine-tuning (QuZO): formats, stochastic rounding on the
format grids, integer-domain perturbations, quantized linear layers, quantized matmuls and
quantize_model."""
from .formats import FORMATS, QuantizedWeight, dequantize, quantize_weight
from .linear import MATMULS, ProbeSpec, QuantLinear, QuantReport, quant_layers, quantize_model, weight_key
from .matmul import fp8_matmul, quantize_activations, quantize_activations_fp8, w4a16_matmul, w8a8_matmul
from .ops import (Saturation, apply_update_, perturb_int_, probe_delta, probe_values, probe_weights,
                  quant_backend, restore_int_, update_, update_target)
from .quzo import QuZO

__all__ = ["FORMATS", "QuantizedWeight", "dequantize", "quantize_weight", "MATMULS", "ProbeSpec", "QuantLinear",
           "QuantReport", "quant_layers", "quantize_model", "weight_key", "fp8_matmul", "quantize_activations",
           "quantize_activations_fp8", "w4a16_matmul", "w8a8_matmul", "Saturation", "apply_update_",
           "perturb_int_", "probe_delta", "probe_values", "probe_weights", "quant_backend", "restore_int_",
           "update_", "update_target", "QuZO"]
