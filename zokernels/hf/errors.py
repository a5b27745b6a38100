"""The one error type the fine-tuning front end raises for bad user input (the CLI prints it as one line)."""
from __future__ import annotations


class ZOError(ValueError):
    """A user-facing configuration or input error: bad model path, missing column, empty dataset, ..."""
