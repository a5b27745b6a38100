"""ZOOptimizer: what every zeroth-order optimizer of the package shares (ZOSGD, QuZO).

A subclass holds the state (parameters, config, seed, step count, log) and calls its optimizer's pure step
function (zokernels.step.apply_update / apply_step for ZOSGD, quzo.quzo_update for QuZO), which takes
tensors and scalars only; replay (zokernels.log.replay) calls the same function with no forward. What
lives here:

- argument checks (lr, weight_decay, eps, n_queries, dist, nonfinite), at construction and, for the
  param-group numbers a scheduler may change, at every step;
- seeds: the base seed (given, or os.urandom: torch's global RNG is never used), agreed across the ranks
  of a process group (rank 0's; optimizers without multi-process support refuse to start in one), and
  step t's seed contract.step_seed(base seed, t);
- the fine-tune log (zokernels.log.FineTuneLog: the header names the optimizer and its config) and
  state_dict / load_state_dict (seed, step count, config and log, under the optimizer's NAME);
- skipped steps (a non-finite loss: logged as skipped, warned about or raised as NonFiniteLoss);
- eval mode during the probes, and warnings that point at the user's code.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict
from typing import Callable

import torch

from .. import contract as C
from .. import distributed
from ..log import FineTuneLog, new_header
from ..step import StepRecord
from .common import as_float, check_number, eval_mode, user_stacklevel

NONFINITE = ("skip", "raise")


class NonFiniteLoss(FloatingPointError):
    """A probe's loss was NaN or infinite (nonfinite='raise'); the weights were left as before the step."""


def check_lr(lr, what: str = "lr") -> None:
    check_number(lr, what, lambda v: v >= 0, ">= 0")


def check_eps(eps) -> None:
    check_number(eps, "eps", lambda v: v > 0, "> 0")


def check_n_queries(n_queries) -> None:
    if isinstance(n_queries, bool) or not isinstance(n_queries, int) or not 1 <= n_queries <= C.MAX_QUERIES:
        raise ValueError(f"n_queries must be an int in [1, {C.MAX_QUERIES}], got {n_queries!r}")


def check_choice(value, what: str, choices) -> None:
    if value not in choices:
        names = [repr(c) for c in choices]
        rule = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(f"{what} must be {rule}, got {value!r}")


class ZOOptimizer(torch.optim.Optimizer):
    """Base of the ZO optimizers; see the module docstring. A subclass sets NAME (log header "optimizer",
    state_dict entry, replay registry name), TITLE (in messages), HYPERS (param-group numbers >= 0 checked
    at every step; those absent are logged as 0), RECORD (its StepRecord type), MULTI_PROCESS and the
    attributes config, model, nonfinite, and implements _zo_step."""

    NAME = ""
    TITLE = ""
    HYPERS: tuple[str, ...] = ("lr",)
    MULTI_PROCESS = False
    RECORD = StepRecord
    MULTI_PROCESS_REFUSAL = "no multi-process support"

    # ------------------------------------------------------------------ construction helpers
    def _init_seed(self, seed: int | None, process_group=None) -> None:
        """self._group (None: no collective at all), self.base_seed (the same on every rank), step count 0."""
        group = distributed.resolve_group(process_group)
        if group is not None and not self.MULTI_PROCESS:
            raise NotImplementedError(f"{self.TITLE} has {self.MULTI_PROCESS_REFUSAL}")
        given = seed is not None
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")  # never torch's global RNG
        seed = C.check_u64(seed, "seed")
        self._group = group
        if group is not None:
            agreed = distributed.broadcast_seed(seed, group)
            if given and agreed != seed:
                warnings.warn(f"{self.TITLE}: this rank's seed {seed} differs from rank 0's; using rank 0's "
                              f"{agreed} so that all replicas draw the same perturbations",
                              stacklevel=user_stacklevel())
            seed = agreed
        self.base_seed = seed
        self._step = 0

    def _init_groups(self, groups, defaults: dict) -> None:
        """torch.optim.Optimizer.__init__ (the only time param groups may be added), then the group checks."""
        self._building = True
        try:
            super().__init__(groups, defaults)
        finally:
            self._building = False
        self._group_hypers()

    def _new_log(self, names: list[list[str]], keys: dict[str, int], fingerprint: dict | None, **extra) -> None:
        groups = [{"names": list(n), "lr": as_float(g["lr"]), "weight_decay": as_float(g.get("weight_decay", 0.0))}
                  for n, g in zip(names, self.param_groups)]
        self.log = FineTuneLog(new_header(optimizer=self.NAME, config=asdict(self.config), groups=groups, keys=keys,
                                          base_seed=self.base_seed, fingerprint=fingerprint,
                                          record_type=self.RECORD, **extra))

    # ------------------------------------------------------------------ torch.optim.Optimizer API
    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_building", False):
            raise NotImplementedError(f"{self.TITLE} fixes its parameters at construction (they define the log's "
                                      "key table); build a new optimizer instead")
        super().add_param_group(param_group)

    @property
    def steps_taken(self) -> int:
        return self._step

    def step(self, closure: Callable[[], torch.Tensor | float] | None = None) -> torch.Tensor:
        """One ZO step; closure() runs a forward and returns a scalar loss. Returns the mean probe loss."""
        if closure is None:
            raise ValueError(f"{self.TITLE}.step needs a closure: a function that runs a forward and returns the "
                             "loss (it is called 2 * n_queries times per step, under torch.no_grad())")
        seed = C.step_seed(self.base_seed, self._step)
        lrs, wds = self._group_hypers()  # a scheduler or the user may have changed them since the last step
        with torch.no_grad(), self._eval_mode():
            loss = self._zo_step(closure, seed, lrs, wds)
        return torch.tensor(loss, dtype=torch.float32)

    def _zo_step(self, closure, seed: int, lrs: tuple[float, ...], wds: tuple[float, ...]) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd[self.NAME] = {"base_seed": self.base_seed, "step": self._step, "config": asdict(self.config),
                         "log": self.log.state(), **self._extra_state()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(self.NAME, None)
        if extra is None:
            raise ValueError(f"not a {self.TITLE} state dict (no '{self.NAME}' entry)")
        now = asdict(self.config)
        if extra["config"] != now:
            diff = {k: (v, now.get(k)) for k, v in extra["config"].items() if now.get(k) != v}
            raise ValueError(f"{self.TITLE} config differs from the saved one (saved, now): {diff}")
        log = self._saved_log(extra)
        self._check_saved_log(log)
        super().load_state_dict(state_dict)
        self.base_seed = int(extra["base_seed"])
        self._step = int(extra["step"])
        self.log = log
        self._after_load(extra)

    # ------------------------------------------------------------------ hooks for subclasses
    def _extra_state(self) -> dict:
        return {}

    def _saved_log(self, extra: dict) -> FineTuneLog:
        return FineTuneLog.from_state(extra["log"])

    def _check_saved_log(self, log: FineTuneLog) -> None:
        if log.optimizer != self.NAME:
            raise ValueError(f"the saved log was written by {log.optimizer!r}, not {self.NAME!r}")
        if log.keys != self.log.keys:
            raise ValueError("the saved optimizer has other parameters (key tables differ)")

    def _after_load(self, extra: dict) -> None:
        pass

    # ------------------------------------------------------------------ shared internals
    def _group_hypers(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(lr per group, weight_decay per group: 0 where the optimizer has none), each checked >= 0."""
        for g in self.param_groups:
            for h in self.HYPERS:
                check_lr(g[h], h)
        lrs = tuple(as_float(g["lr"]) for g in self.param_groups)
        wds = tuple(as_float(g["weight_decay"]) if "weight_decay" in self.HYPERS else 0.0 for g in self.param_groups)
        return lrs, wds

    def _eval_mode(self):
        return eval_mode(self.model)

    def _commit(self, record: StepRecord) -> None:
        self.log.append(record)
        self._step += 1

    def _warn_or_raise(self, message: str, loss: float) -> float:
        """After a skipped step was committed: raise NonFiniteLoss (nonfinite='raise') or warn."""
        message = f"{self.TITLE} step {self._step - 1}: {message}; the step was skipped (weights unchanged)"
        if self.nonfinite == "raise":
            raise NonFiniteLoss(message)
        warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())
        return loss
