"""The types every ZO optimizer and the fine-tune log share, and ZO-SGD's pure step functions.

`StepRecord` (one logged step), `StepConfig` (ZO-SGD's fixed settings) and `ParamTable` (the tensors a
step changes, with their contract keys) sit below zokernels.optim so that the log (zokernels.log) and the
probes (zokernels.probe) need nothing from the optimizers.

The functions change weights for one ZO-SGD step, given the step's record. ZOSGD.step (after its
forwards produced the projected gradients) and zokernels.replay (with no forward at all) both call
them, so replay is bitwise-equal to training by construction (same backend). Nothing here runs a model
or reads a loss.

Step t, seed s_t, queries q = 0..Q-1, per-tensor lr and wd from the tensor's param group:

    coeff_q = g_q / Q
    theta  <- R(theta - lr * (sum_q coeff_q * z_q + wd * theta))          (zokernels.zo_update_)

In-place probes (MeZO) also move the weights during the forwards; `inplace_events` lists those
passes, `inplace_undo` the pass that abandons a step after a given forward, and `inplace_finish` the
last restore, fused with the update unless the step was skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import ops

PROBE_MODES = ("hooks", "swap", "inplace")
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class StepConfig:
    """What stays fixed across a run (the log header holds it)."""

    eps: float
    n_queries: int
    dist: str = "gaussian"
    one_sided: bool = False
    probe: str = "hooks"
    probe_rounding: str = "stochastic"
    update_rounding: str = "stochastic"


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step, as the fine-tune log stores it. grads: projected gradients g_q (float64; NaN
    on skipped steps); lr, wd: per param group. stop: in-place probes only — index of the forward after
    which the step was abandoned (-1: it ran to the end). An optimizer that logs more per step (QuZO's
    saturation counts) subclasses this with extra int fields; the log stores them as extra columns."""

    seed: int
    grads: tuple[float, ...]
    lr: tuple[float, ...]
    wd: tuple[float, ...]
    skipped: bool = False
    stop: int = -1


@dataclass
class ParamTable:
    """The tensors a step changes, with their contract keys and param-group index."""

    tensors: list[torch.Tensor]
    keys: list[int]
    group_of: list[int]
    # Sharded parameters (zokernels.distributed): tensors[i] is a local shard whose element 0 is
    # global element offsets[i]; `sharded` are the DTensor parameters' indices (None/empty: unsharded).
    offsets: list[int] | None = None
    sharded: frozenset[int] = frozenset()
    # MaZO (zokernels.mazo): masks[i] is tensors[i]'s ParamMask (only masked elements are perturbed
    # and updated) or None (dense); masks None: no masks at all.
    masks: list | None = None

    def offsets_of(self, idx) -> list[int] | None:
        return None if self.offsets is None else [self.offsets[i] for i in idx]


@dataclass(frozen=True)
class PerturbPass:
    query: int
    scale: float


@dataclass(frozen=True)
class Forward:
    index: int           # 0..n_forwards-1 within the step
    query: int           # -1: the unperturbed forward of one-sided SPSA
    sign: int            # +1, -1, or 0 (unperturbed)


def update_coeffs(grads: tuple[float, ...], n_queries: int) -> tuple[float, ...]:
    return tuple(g / n_queries for g in grads)


def coeffs_representable(grads: tuple[float, ...], n_queries: int) -> bool:
    """True if every g_q / Q is finite in float32 (the ops round coefficients to float32)."""
    return all(math.isfinite(c) and abs(c) <= FLOAT32_MAX for c in update_coeffs(grads, n_queries))


def projected_grads(losses_plus, losses_minus, loss0, config: StepConfig) -> tuple[float, ...]:
    """Two-sided: g_q = (L+_q - L-_q) / (2 eps); one-sided: g_q = (L+_q - L0) / eps (float64)."""
    if config.one_sided:
        return tuple((lp - loss0) / config.eps for lp in losses_plus)
    return tuple((lp - lm) / (2.0 * config.eps) for lp, lm in zip(losses_plus, losses_minus))


def apply_update(params: ParamTable, record: StepRecord, config: StepConfig, backend: str = "auto", *,
                 restore_scale: float | None = None, restore_query: int = 0) -> None:
    """theta <- R(theta' - lr (sum_q g_q/Q z_q + wd theta')), theta' = theta [+ restore_scale z_rq].

    Without a fused restore, tensors whose lr is 0 are left alone: the update is then the identity
    (theta - 0 = theta; only a -0.0 weight could flip to +0.0), and lr = 0 probing runs stay cheap."""
    lrs = [record.lr[g] for g in params.group_of]
    wds = [record.wd[g] for g in params.group_of]
    idx = [i for i, lr in enumerate(lrs) if restore_scale is not None or lr != 0.0]
    idx, masked = split_masked(params, idx)
    if masked:
        ops.masked_zo_update_([params.tensors[i] for i in masked], [params.masks[i] for i in masked], record.seed,
                              [params.keys[i] for i in masked], update_coeffs(record.grads, config.n_queries),
                              [lrs[i] for i in masked], [wds[i] for i in masked], dist=config.dist,
                              rounding=config.update_rounding, restore_scale=restore_scale,
                              restore_query=restore_query, offsets=params.offsets_of(masked), backend=backend)
    if not idx:
        return
    ops.zo_update_([params.tensors[i] for i in idx], record.seed, [params.keys[i] for i in idx],
                   update_coeffs(record.grads, config.n_queries), [lrs[i] for i in idx],
                   [wds[i] for i in idx], dist=config.dist, rounding=config.update_rounding,
                   restore_scale=restore_scale, restore_query=restore_query,
                   offsets=params.offsets_of(idx), backend=backend)


def perturb_all(params: ParamTable, seed: int, query: int, scale: float, config: StepConfig,
                backend: str = "auto") -> None:
    """In-place probe pass: theta <- RN(theta + scale z_query) (MeZO rounds to nearest)."""
    if params.masks is not None:
        dense, masked = split_masked(params, range(len(params.tensors)))
        if masked:
            ops.masked_perturb_([params.tensors[i] for i in masked], [params.masks[i] for i in masked], seed, scale,
                                [params.keys[i] for i in masked], query=query, dist=config.dist,
                                rounding="nearest", offsets=params.offsets_of(masked), backend=backend)
        if dense:
            ops.perturb_([params.tensors[i] for i in dense], seed, scale, [params.keys[i] for i in dense],
                         query=query, dist=config.dist, rounding="nearest", offsets=params.offsets_of(dense),
                         backend=backend)
        return
    ops.perturb_(params.tensors, seed, scale, params.keys, query=query, dist=config.dist,
                 rounding="nearest", offsets=params.offsets, backend=backend)


def split_masked(params: ParamTable, idx) -> tuple[list[int], list[int]]:
    """(dense, masked) positions among idx."""
    idx = list(idx)
    if params.masks is None:
        return idx, []
    return [i for i in idx if params.masks[i] is None], [i for i in idx if params.masks[i] is not None]


def inplace_events(config: StepConfig) -> list:
    """The in-place probe sequence of one step, up to (not including) the final restore.

    two-sided: for q: +eps z_q, F(2q: L+), -2eps z_q, F(2q+1: L-), and +eps z_q if q < Q-1.
    one-sided: F(0: L0), then for q: +eps z_q, F(1+q: L+), and -eps z_q if q < Q-1.
    """
    eps, n = config.eps, config.n_queries
    events: list = []
    if config.one_sided:
        events.append(Forward(0, -1, 0))
        for q in range(n):
            events += [PerturbPass(q, eps), Forward(1 + q, q, +1)]
            if q < n - 1:
                events.append(PerturbPass(q, -eps))
        return events
    for q in range(n):
        events += [PerturbPass(q, eps), Forward(2 * q, q, +1), PerturbPass(q, -2.0 * eps),
                   Forward(2 * q + 1, q, -1)]
        if q < n - 1:
            events.append(PerturbPass(q, eps))
    return events


def inplace_undo(config: StepConfig, stop: int) -> PerturbPass | None:
    """The pass that brings the weights back after forward `stop` when the step is abandoned there."""
    if config.one_sided:
        return None if stop == 0 else PerturbPass(stop - 1, -config.eps)
    q, minus = divmod(stop, 2)
    return PerturbPass(q, config.eps if minus else -config.eps)


def inplace_finish(config: StepConfig) -> PerturbPass:
    """The restore still owed after the last forward: of query Q-1, +eps (two-sided) or -eps."""
    return PerturbPass(config.n_queries - 1, -config.eps if config.one_sided else config.eps)


def finish_inplace(params: ParamTable, record: StepRecord, config: StepConfig, backend: str = "auto") -> None:
    """After all in-place forwards: the fused restore + update, or a plain restore if skipped."""
    last = inplace_finish(config)
    if record.skipped:
        perturb_all(params, record.seed, last.query, last.scale, config, backend)
    else:
        apply_update(params, record, config, backend, restore_scale=last.scale, restore_query=last.query)


def apply_step(params: ParamTable, record: StepRecord, config: StepConfig, backend: str = "auto") -> None:
    """Everything step `record` did to the weights, without forwards (what replay runs)."""
    if config.probe != "inplace":
        if not record.skipped:
            apply_update(params, record, config, backend)
        return
    for event in inplace_events(config):
        if isinstance(event, PerturbPass):
            perturb_all(params, record.seed, event.query, event.scale, config, backend)
        elif event.index == record.stop:
            abandon_inplace(params, record.seed, record.stop, config, backend)
            return
    finish_inplace(params, record, config, backend)


def abandon_inplace(params: ParamTable, seed: int, stop: int, config: StepConfig, backend: str = "auto") -> None:
    """Undo the in-place perturbation in force after forward `stop` (the step is dropped there)."""
    undo = inplace_undo(config, stop)
    if undo is not None:
        perturb_all(params, seed, undo.query, undo.scale, config, backend)
