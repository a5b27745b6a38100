"""Adapters under ZO: small trainable modules inserted into a frozen model (bottleneck adapters: bottleneck.py)."""
from .bottleneck import (ACTIVATIONS, ARCHITECTURES, PLACEMENTS, AdapterConfig, AdapterError, BottleneckAdapter,
                         adapter_names, adapter_state, add_adapters, block_count, first_adapted_block, load_adapters,
                         save_adapters)

__all__ = ["ACTIVATIONS", "ARCHITECTURES", "PLACEMENTS", "AdapterConfig", "AdapterError", "BottleneckAdapter",
           "adapter_names", "adapter_state", "add_adapters", "block_count",
           "first_adapted_block", "load_adapters", "save_adapters"]
