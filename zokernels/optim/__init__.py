"""Drop-in zeroth-order optimizers on one base (ZOOptimizer): `ZOSGD` is MeZO's SPSA-SGD (its pure step
functions: zokernels.step). Method packages build theirs on the same base: QuZO in zokernels.quant.quzo."""
from .base import NonFiniteLoss, ZOOptimizer
from .zosgd import ZOSGD

__all__ = ["ZOSGD", "ZOOptimizer", "NonFiniteLoss"]
