"""Drop-in zeroth-order optimizers. `ZOSGD` is MeZO's SPSA-SGD; zokernels.step holds the pure step math."""
from .zosgd import NonFiniteLoss, ZOSGD

__all__ = ["ZOSGD", "NonFiniteLoss"]
