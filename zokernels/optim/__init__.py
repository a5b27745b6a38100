"""Drop-in zeroth-order optimizers on one base (ZOOptimizer): `ZOSGD` is MeZO's SPSA-SGD, `QuZO` trains
quantized weights. Their pure step functions: zokernels.step (ZO-SGD) and quzo.quzo_update."""
from .base import NonFiniteLoss, ZOOptimizer
from .zosgd import ZOSGD

__all__ = ["ZOSGD", "ZOOptimizer", "NonFiniteLoss"]
