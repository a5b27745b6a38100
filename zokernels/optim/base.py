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
  state_dict / load_state_dict (seed, step count, config, log and a record of the trained tensors, under the
  optimizer's NAME): load_state_dict refuses a state whose tensors differ from the model's in name, shape,
  dtype or checksum (the weights at save time), so a resumed log never describes weights nobody trained;
- skipped steps (a non-finite loss: logged as skipped, warned about or raised as NonFiniteLoss);
- eval mode during the probes, and warnings that point at the user's code.
"""
from __future__ import annotations

import os
import warnings
import zlib
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
    """A probe's loss was NaN or infinite (nonfinite='raise'); the step was dropped: drift-free probes left the
    weights bitwise as before the step, ZOSGD's probe='inplace' restored them up to rounding (see ZOSGD)."""


_CHECKSUM_CHUNK = 1 << 26  # bytes copied to the host at a time for a GPU tensor


def weight_checksum(t: torch.Tensor) -> str:
    """CRC-32 of a tensor's bytes in C order, as 8 hex digits: the same on every device. Reads every element
    once; CPU tensors in place, GPU tensors copied to the host 64 MiB at a time. Measured on the 2-core dev
    CPU for 100M float32 weights: 0.10 s (bf16 0.05 s), against 0.33 s for torch.save of those weights and
    3.0 s for zokernels.log.tensor_fingerprint (int64 arithmetic per element), hence not the latter."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    crc = 0
    for start in range(0, flat.numel(), _CHECKSUM_CHUNK):
        crc = zlib.crc32(flat[start:start + _CHECKSUM_CHUNK].cpu().numpy(), crc)
    return f"{crc:08x}"


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
                         "log": self.log.state(), "weights": self._weight_record(), **self._extra_state()}
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
        self._check_weights(extra.get("weights"))
        super().load_state_dict(state_dict)
        self.base_seed = int(extra["base_seed"])
        self._step = int(extra["step"])
        self.log = log
        self._after_load(extra)

    # ------------------------------------------------------------------ the trained tensors in the state
    def _weight_record(self) -> dict:
        """Names, shapes, dtypes and checksums (weight_checksum; None where skipped) of the trained tensors now."""
        rec = {"names": [], "shapes": [], "dtypes": [], "checksums": []}
        for name, t, check in self._state_tensors():
            rec["names"].append(name)
            rec["shapes"].append(list(t.shape))
            rec["dtypes"].append(str(t.dtype).replace("torch.", ""))
            rec["checksums"].append(weight_checksum(t) if check else None)
        return rec

    def _check_weights(self, saved: dict | None) -> None:
        """Refuse (ValueError naming the tensors) a state saved with tensors other than the model's now."""
        if saved is None:
            warnings.warn(f"{self.TITLE}.load_state_dict: the saved state has no record of the weights it was saved "
                          "with (written by an older zokernels), so it cannot check that the model holds them; load "
                          "the model's trained weights before the optimizer state", stacklevel=user_stacklevel())
            return
        now = {name: (t, check) for name, t, check in self._state_tensors()}
        if list(now) != list(saved["names"]):
            gone = [n for n in saved["names"] if n not in now]
            new = [n for n in now if n not in saved["names"]]
            raise ValueError(f"{self.TITLE}.load_state_dict: the saved state trained other tensors (saved only: "
                             f"{gone[:5]}, here only: {new[:5]})")
        bad = []
        for name, shape, dtype in zip(saved["names"], saved["shapes"], saved["dtypes"]):
            t = now[name][0]
            here = str(t.dtype).replace("torch.", "")
            if list(t.shape) != list(shape):
                bad.append(f"{name!r} was trained with shape {tuple(shape)}, the model's has shape {tuple(t.shape)}")
            elif here != dtype:
                bad.append(f"{name!r} was trained as {dtype}, the model's is {here}")
        if bad:
            raise ValueError(f"{self.TITLE}.load_state_dict: the model's tensors differ from the saved state's: "
                             + "; ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""))
        differ = [name for name, want in zip(saved["names"], saved["checksums"])
                  if want is not None and now[name][1] and weight_checksum(now[name][0]) != want]
        if differ:
            raise ValueError(f"{self.TITLE}.load_state_dict: these are not the weights the optimizer state was saved "
                             f"with: {len(differ)} of {len(now)} tensors differ (checksum), e.g. {differ[:5]}. Load "
                             "the model's trained weights before the optimizer state (a log continued from other "
                             "weights describes weights nobody trained)")

    # ------------------------------------------------------------------ hooks for subclasses
    def _state_tensors(self) -> list[tuple[str, torch.Tensor, bool]]:
        """(name, tensor, whether to checksum it) of every tensor the optimizer trains, in a fixed order."""
        raise NotImplementedError

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

    def _skip_outcome(self) -> str:
        """What a skipped step left the weights as (the warning and NonFiniteLoss say it)."""
        return "weights unchanged"

    def _warn_or_raise(self, message: str, loss: float) -> float:
        """After a skipped step was committed: raise NonFiniteLoss (nonfinite='raise') or warn."""
        message = f"{self.TITLE} step {self._step - 1}: {message}; the step was skipped ({self._skip_outcome()})"
        if self.nonfinite == "raise":
            raise NonFiniteLoss(message)
        warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())
        return loss
