"""Low-bit weights for zeroth-order fine-tuning (QuZO): formats, stochastic rounding on the
format grids, integer-domain perturbations, quantized linear layers and quantize_model."""
from .formats import FORMATS, QuantizedWeight, dequantize, quantize_weight
from .linear import ProbeSpec, QuantLinear, QuantReport, quant_layers, quantize_model, weight_key
from .ops import (Saturation, apply_update_, perturb_int_, probe_delta, probe_values, restore_int_,
                  update_target, w8a8_matmul)

__all__ = ["FORMATS", "QuantizedWeight", "dequantize", "quantize_weight", "ProbeSpec", "QuantLinear",
           "QuantReport", "quant_layers", "quantize_model", "weight_key", "Saturation", "apply_update_",
           "perturb_int_", "probe_delta", "probe_values", "restore_int_", "update_target", "w8a8_matmul"]
