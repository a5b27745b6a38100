"""The result document being built during a run (written out as JSON + Markdown + PNG)."""
from __future__ import annotations

import traceback
from typing import Callable

SCHEMA = 1


class Results:
    def __init__(self, meta: dict, config: dict):
        self.data: dict = {"schema": SCHEMA, "meta": meta, "config": config, "copy_bandwidth": None,
                           "rng": [], "micro": [], "e2e": [], "memory": [], "targets": [], "skipped": [],
                           "errors": []}
        self.on_checkpoint: Callable[[], None] | None = None

    def add(self, section: str, record: dict) -> dict:
        self.data[section].append(record)
        return record

    def skip(self, what: str, reason: str) -> None:
        self.data["skipped"].append({"what": what, "reason": reason})

    def error(self, what: str, exc: BaseException) -> None:
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        self.data["errors"].append({"what": what, "error": f"{type(exc).__name__}: {exc}",
                                    "traceback": "".join(tb[-6:])})

    def checkpoint(self) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint()
