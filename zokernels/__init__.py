"""zokernels: fused kernels and drop-in optimizers for zeroth-order (forward-only) fine-tuning."""
from .contract import CONTRACT_VERSION, param_key
from .ops import (perturbation, uniform, stochastic_round, perturb_, perturbed_copy, zo_update_,
                  masked_perturb_, masked_perturbed_copy, masked_zo_update_, philox4x32, OpError)
from .backends.registry import BackendUnavailable
from .optim import ZOSGD, NonFiniteLoss
from .log import CorruptLog, FineTuneLog, LogMismatch, replay
from .probe import ProbeError
from . import adapters, quant
from .quant.quzo import QuZO

__version__ = "0.1.0"

__all__ = ["CONTRACT_VERSION", "param_key", "perturbation", "uniform", "stochastic_round", "perturb_",
           "perturbed_copy", "zo_update_", "masked_perturb_", "masked_perturbed_copy", "masked_zo_update_",
           "philox4x32", "OpError", "BackendUnavailable", "ZOSGD", "NonFiniteLoss", "FineTuneLog",
           "LogMismatch", "CorruptLog", "replay", "ProbeError", "quant", "adapters", "QuZO"]
