"""ZOSGD: a drop-in torch.optim.Optimizer for zeroth-order (MeZO-style SPSA) fine-tuning."""
from __future__ import annotations

import math
import warnings

import torch

from .. import contract as C
from .. import distributed
from .. import ops
from ..log import LogMismatch, base_fingerprint, check_contract, fingerprint_diff, named_tensors, register_optimizer
from ..masks import masks_fingerprint, resolve_masks
from ..probe import Prober, ProbeError, StorageReads, watch_original_storages
from ..step import (PROBE_MODES, ParamTable, PerturbPass, StepConfig, StepRecord, abandon_inplace, apply_step,
                    apply_update, coeffs_representable, finish_inplace, inplace_events, perturb_all,
                    projected_grads)
from .base import NonFiniteLoss, ZOOptimizer, check_choice, check_eps, check_lr, check_n_queries
from .common import scalar_loss, user_stacklevel

SUPPORTED_DTYPES = ops.FLOAT_DTYPES  # one list of trainable dtypes: the ops contract


class ZOSGD(ZOOptimizer):
    """Zeroth-order SGD with SPSA gradient estimates (MeZO, Malladi et al. 2023), forward only.

    Step t (seed s_t = contract.step_seed(seed, t)), queries q < Q = n_queries, z_q = contract z:

        two-sided: g_q = (L(theta + eps z_q) - L(theta - eps z_q)) / (2 eps)
        one-sided: g_q = (L(theta + eps z_q) - L(theta)) / eps
        theta <- R(theta - lr * (sum_q (g_q / Q) z_q + weight_decay * theta))

    lr and weight_decay come from each tensor's param group (LR schedulers work as usual). R rounds
    16-bit weights (`update_rounding`, stochastic by default: to nearest, an update smaller than half
    an ulp is lost, and lr * g * z usually is); float32 weights are exact float32 arithmetic.
    `step(closure)` calls closure() (a forward returning a scalar loss) under torch.no_grad() and the
    model in eval mode (restored after), and returns the mean probe loss ((L+ + L-)/2, or L0).

    Frozen parameters (an nn.Parameter with requires_grad=False) are left alone whichever way they are
    passed (a module, model.parameters(), named_parameters(), groups), as a first-order optimizer leaves
    them (they get no grad) and as MeZO does: ZOSGD(peft_model.parameters()) trains the adapters only.
    Plain tensors (not nn.Parameter) are always trained.

    masks={name or tensor: zokernels.mazo.ParamMask} (MaZO, docs/mazo.md): those parameters are
    perturbed and updated on their masked elements only (z there is the dense contract's z); the
    others stay dense. The masks' fingerprint goes into the log, and replay needs the same masks.
    Drift-free probes write R(W + eps z) into the masked elements in place for the whole closure and
    write the saved values back after it (bitwise): no dense copy, and the probe always sees W as it is
    now (also after a `p.data` edit, which no version counter records). Memory: 4 bytes of index per
    masked element, plus the masked values while a probe runs.

    Probes (`probe=`):
      - "hooks" (default with a model): drift-free; forward pre/post hooks on every module that
        directly owns trainable parameters swap in R(W +- eps z) scratch copies for that module's
        forward only (extra memory: the modules in flight). 16-bit probes round stochastically by
        default (`probe_rounding`): at |w| ~ 1 a bfloat16 ulp is 7.8e-3 > eps = 1e-3, so W + eps z
        rounded to nearest would mostly round back to W; stochastic rounding makes the realized
        perturbation unbiased.
      - "swap" (default without a model): drift-free; every trainable parameter is swapped to its
        scratch copy for the whole closure (extra memory: the trainable parameters).
      - "inplace": MeZO's passes theta += eps z, forward, theta -= 2 eps z, forward, theta += eps z
        (fused with the update after the last query), rounded to nearest. No extra memory, but
        16-bit weights drift: each pass rounds, so they do not return exactly to theta.

    Hooks are only correct if a parameter is read inside its owner's forward. nn.MultiheadAttention,
    for one, reads out_proj.weight in its own forward, never calling out_proj. So on the first step
    (`verify_probes="first"`; "always": every step; "never": trust the model) the first probe
    runs under a TorchDispatchMode that records the storage of every tensor every op touches; any
    parameter whose original (unperturbed) storage is touched during the probe — read outside its
    owner's forward, or by a module whose hooks never fired — is moved to the whole-forward swap
    set, named in a warning, and the probe is recomputed. If a parameter's original storage is still
    read while it is swapped (a cached alias such as a stored transpose), ProbeError is raised rather
    than a wrong g returned; use probe="inplace" for such models.

    Non-finite losses: the step is dropped (no update), logged as skipped and warned about
    (nonfinite="skip") or raises NonFiniteLoss ("raise"); so is a step whose closure raises. Drift-free
    probes leave the weights bitwise as they were. In-place probes "restore" them by running the
    remaining passes that undo the perturbation in force, each rounded to nearest like every in-place
    pass: a step dropped after its forward k ends at RN(RN(w + eps z) - eps z) (k = 0, the L+ forward)
    or RN(RN(RN(w + eps z) - 2 eps z) + eps z) (k = 1, L-), per query as inplace_undo lists. That is w
    only up to rounding: |w' - w| <= 1.5 ulp(|w| + 2 eps |z|) (three roundings of half an ulp; measured
    max 1.0), e.g. bf16 ~N(0, 0.02^2) weights, eps 1e-3: 4.7% (k = 0) / 46% (k = 1) of the elements
    move, float32 likewise at its own ulp. The log records k (StepRecord.stop) and replay runs the same
    passes, so replay stays bitwise. A bitwise restore would need a copy of the weights (the memory this
    mode exists to save: "hooks" gives bitwise probes for the modules in flight) or kernels that keep
    what each rounding lost.

    Multi-process (docs/distributed.md): `process_group` (default: the world group when
    torch.distributed is initialised with > 1 rank; otherwise no collective at all). Data parallel:
    every rank probes its own micro-batch with the same seed (rank 0's, broadcast at construction);
    one float64 all-reduce of the probe losses per step gives every rank the same g_q, so replicas
    stay bitwise identical; a non-finite loss on any rank skips the step on all. `spread_queries`:
    rank r evaluates queries r, r + W, ... only. DTensor (FSDP2) parameters: probes and the update
    work on the local shards with their global element offsets (z and rounding are the unsharded
    run's); probes write R(theta +- eps z) into the shard storage FSDP all-gathers from.

    `opt.log` (FineTuneLog) records every step; `opt.log.save(path)` + `zokernels.replay(model, path)`
    rebuild the fine-tuned weights from the base weights. `state_dict()` carries seed, step count,
    config, log and each trained tensor's shape, dtype and CRC-32 at save time: resuming gives the same
    trajectory bitwise, and load_state_dict refuses (naming the parameter) a model whose weights are
    not the ones saved with the state — load the model's weights first. A state saved without that
    record (an older zokernels) loads with a warning.
    """

    NAME, TITLE = "zosgd", "ZOSGD"
    HYPERS = ("lr", "weight_decay")
    MULTI_PROCESS = True

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, n_queries: int = 1,
                 dist: str = "gaussian", seed: int | None = None, backend: str = "auto", *,
                 model: torch.nn.Module | None = None, probe: str = "auto", one_sided: bool = False,
                 probe_rounding: str = "stochastic", update_rounding: str = "stochastic",
                 nonfinite: str = "skip", verify_probes: str = "first", process_group=None,
                 spread_queries: bool = False, masks=None):
        check_lr(lr)
        check_lr(weight_decay, "weight_decay")
        check_eps(eps)
        check_n_queries(n_queries)
        C.check_dist(dist)
        C.check_rounding(probe_rounding)
        C.check_rounding(update_rounding)
        check_choice(nonfinite, "nonfinite", ("skip", "raise"))
        check_choice(verify_probes, "verify_probes", ("first", "always", "never"))
        if probe not in ("auto",) + PROBE_MODES:
            raise ValueError(f"probe must be 'auto' or one of {PROBE_MODES}, got {probe!r}")
        self._init_seed(seed, process_group)
        self.spread_queries = bool(spread_queries)

        if isinstance(params, torch.nn.Module):
            model = params if model is None else model
        distributed.reshard(model)  # FSDP2: collect the DTensor shards, not a root left unsharded by a forward
        groups, names = _collect_groups(params, model)
        if probe == "auto":
            probe = "hooks" if model is not None else "swap"
        if probe == "hooks" and model is None:
            raise ValueError("probe='hooks' needs the model: pass model=... or the nn.Module itself as params")
        for device in {t.device for g in groups for t in g["params"]}:
            ops.backend_name("zo_update_", device, backend)  # raises BackendUnavailable with every reason

        self._init_groups(groups, dict(lr=lr, weight_decay=weight_decay))
        self.model = model
        self.backend = backend
        self.nonfinite = nonfinite
        self.verify_probes = verify_probes
        self.config = StepConfig(eps=float(eps), n_queries=n_queries, dist=dist, one_sided=bool(one_sided),
                                 probe=probe, probe_rounding=probe_rounding, update_rounding=update_rounding)
        tensors = [t for g in self.param_groups for t in g["params"]]
        flat_names = [n for g_names in names for n in g_names]
        self.keys: dict[str, int] = {n: C.param_key(n) for n in flat_names}
        self._names = flat_names
        local_tensors, offsets, sharded = distributed.local_shards(flat_names, tensors)
        _check_no_shared_memory(flat_names, local_tensors)
        self._table = ParamTable(local_tensors, [self.keys[n] for n in flat_names],
                                 [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]],
                                 offsets=offsets if sharded else None, sharded=sharded)
        self._fsdp = distributed.fsdp_modules(model)
        self._check_spread()
        if masks:  # MaZO: {name or tensor: zokernels.mazo.ParamMask}; unlisted parameters stay dense
            self._table.masks = resolve_masks(masks, flat_names, self._table.tensors)
            if any(self._table.masks[i] is not None for i in self._table.sharded):
                raise ValueError("masks on sharded (DTensor) parameters are not supported")
        self._prober = Prober(self._table, self.config, backend, model, probe) if probe != "inplace" else None
        # what each device's ops run with: replay warns when it resolves to another backend (not bitwise then)
        self._backends = resolved_backends(self._table, backend)
        self._verified = False
        mask_fp = {} if self._table.masks is None else masks_fingerprint(
            (n, m) for n, m in zip(flat_names, self._table.masks) if m is not None)  # replay refuses other masks
        self._new_log(names, self.keys, base_fingerprint(zip(flat_names, distributed.full_tensors(tensors))),
                      backends=dict(self._backends), masks=mask_fp)

    # ------------------------------------------------------------------ ZOOptimizer hooks
    def _state_tensors(self):
        """Sharded (DTensor) parameters: their global shape and dtype only (a checksum would need a collective)."""
        tensors = [t for g in self.param_groups for t in g["params"]]
        return [(n, t, i not in self._table.sharded) for i, (n, t) in enumerate(zip(self._names, tensors))]

    def _extra_state(self) -> dict:
        return {"whole_forward_swap": sorted(self._names[i] for i in self._prober.whole)
                if self._prober is not None and self.config.probe == "hooks" else []}

    def _check_saved_log(self, log) -> None:
        if log.header.get("masks", {}) != self.log.header.get("masks", {}):
            raise ValueError("the saved optimizer trained other masks (mask fingerprints differ)")
        super()._check_saved_log(log)

    def _after_load(self, extra: dict) -> None:
        log = self.log
        before = log.header.get("backends")
        if before is not None and before != self._backends:
            warnings.warn(f"ZOSGD: the saved steps ran the ops with backend {before}, the steps from here run with "
                          f"{self._backends}: a replay of this log cannot be bitwise", stacklevel=user_stacklevel())
            log.header["backends"] = {"mixed": f"{before} then {self._backends}"}
        if self._prober is not None and self.config.probe == "hooks":
            index = {n: i for i, n in enumerate(self._names)}
            self._prober.whole |= {index[n] for n in extra["whole_forward_swap"]}
        self._verified = False

    def _skip_outcome(self) -> str:
        if self.config.probe == "inplace":
            return ("probe='inplace': the weights were restored up to rounding, each undo pass rounding to nearest "
                    "(|change| <= 1.5 ulp of |w| + 2 eps |z|; replay reproduces it bitwise)")
        return super()._skip_outcome()

    def _zo_step(self, closure, seed: int, lrs, wds) -> float:
        if self.config.probe == "inplace":
            return self._inplace_step(closure, seed, lrs, wds)
        return self._drift_free_step(closure, seed, lrs, wds)

    # ------------------------------------------------------------------ internals
    def _forward(self, closure) -> float:
        with torch.no_grad(), distributed.fresh_gather(self._fsdp):
            loss = closure()
        return scalar_loss(loss)

    def _check_spread(self) -> None:
        if not self.spread_queries:
            return
        cfg = self.config
        why = ("probe='inplace' (each rank would move and round the weights only for its own queries)"
               if cfg.probe == "inplace" else
               "one_sided=True (L0 and L+_q must come from the same micro-batch)" if cfg.one_sided else
               "sharded parameters (FSDP all-gathers need every rank in every forward)"
               if self._table.sharded else None)
        if why:
            raise ValueError(f"spread_queries=True is not supported with {why}")

    def _probe(self, closure, seed: int, query: int, sign: int, verify: bool) -> float:
        prober = self._prober
        if not verify:
            with prober.perturbed(seed, query, sign):
                return self._forward(closure)
        for _ in range(4):  # each pass can only grow the whole-forward set; 2 suffice unless data-dependent
            reads = StorageReads(watch_original_storages(self._table))
            with reads, prober.perturbed(seed, query, sign, reads):
                with torch.no_grad(), distributed.fresh_gather(self._fsdp):
                    raw = closure()
            loss = scalar_loss(raw)
            if not reads.hits:
                self._verified = True
                return loss
            new = reads.hits - prober.whole
            if not new:
                break
            prober.whole |= new
            names = sorted(self._names[i] for i in new)
            warnings.warn(f"ZOSGD: {len(names)} parameter(s) are read outside their owning module's forward "
                          f"(so forward hooks cannot perturb them): {names}. They are now swapped for the "
                          "whole forward (drift-free, extra memory = their size); probe recomputed.",
                          stacklevel=user_stacklevel())
        names = sorted(self._names[i] for i in reads.hits)
        raise ProbeError(f"ZOSGD: parameters {names} are read through their original storage even while "
                         "swapped for the whole forward (a cached alias, e.g. a stored transpose or view?). "
                         "Drift-free probes cannot perturb them; use probe='inplace'.")

    def _should_verify(self) -> bool:
        if self.config.probe != "hooks" and self.config.probe != "swap":
            return False
        return self.verify_probes == "always" or (self.verify_probes == "first" and not self._verified)

    def _drift_free_step(self, closure, seed: int, lrs, wds) -> float:
        cfg = self.config
        plus, minus, loss0 = [], [], None
        alone = self._group is None  # with a group, every rank runs every forward (collectives inside)
        queries = distributed.assigned_queries(cfg.n_queries, self._group, self.spread_queries)
        try:
            if cfg.one_sided:
                loss0 = self._forward(closure)
                if alone and not math.isfinite(loss0):
                    return self._skip(seed, lrs, wds, -1, loss0, "the unperturbed loss")
            for q in queries:
                lp = self._probe(closure, seed, q, +1, q == queries[0] and self._should_verify())
                plus.append(lp)
                if alone and not math.isfinite(lp):
                    return self._skip(seed, lrs, wds, -1, lp, f"L+ of query {q}")
                if not cfg.one_sided:
                    lm = self._probe(closure, seed, q, -1, False)
                    minus.append(lm)
                    if alone and not math.isfinite(lm):
                        return self._skip(seed, lrs, wds, -1, lm, f"L- of query {q}")
        except NonFiniteLoss:
            raise
        except BaseException:
            self._record_dropped(seed, lrs, wds, -1)
            raise
        if not alone:
            plus, minus, loss0 = distributed.reduce_probe_losses(plus, minus, loss0, queries, cfg.n_queries,
                                                                 self._group, self.spread_queries)
            if not distributed.all_finite(plus + minus + ([] if loss0 is None else [loss0])):
                return self._skip(seed, lrs, wds, -1, math.nan, "a probe loss on some rank (group-reduced)")
        grads = projected_grads(plus, minus, loss0, cfg)
        loss = loss0 if cfg.one_sided else sum(p + m for p, m in zip(plus, minus)) / (2 * cfg.n_queries)
        if not coeffs_representable(grads, cfg.n_queries):
            self._record_dropped(seed, lrs, wds, -1)
            return self._warn_or_raise(f"the projected gradients {grads} overflow float32", loss)
        record = StepRecord(seed, grads, lrs, wds)
        apply_update(self._table, record, cfg, self.backend)
        self._commit(record)
        return loss

    def _inplace_step(self, closure, seed: int, lrs, wds) -> float:
        cfg = self.config
        losses: dict[tuple[int, int], float] = {}
        for event in inplace_events(cfg):
            if isinstance(event, PerturbPass):
                perturb_all(self._table, seed, event.query, event.scale, cfg, self.backend)
                continue
            try:
                value = self._forward(closure)
            except BaseException:
                abandon_inplace(self._table, seed, event.index, cfg, self.backend)
                self._record_dropped(seed, lrs, wds, event.index)
                raise
            if self._group is None and not math.isfinite(value):
                abandon_inplace(self._table, seed, event.index, cfg, self.backend)
                return self._skip(seed, lrs, wds, event.index, value, f"the loss of forward {event.index}")
            losses[(event.query, event.sign)] = value
        n = cfg.n_queries
        if self._group is not None:
            order = sorted(losses)
            losses = dict(zip(order, distributed.mean_losses([losses[k] for k in order], self._group)))
            if not distributed.all_finite(losses.values()):
                record = StepRecord(seed, (math.nan,) * n, lrs, wds, skipped=True)
                finish_inplace(self._table, record, cfg, self.backend)  # the plain restore
                self._commit(record)
                return self._warn_or_raise("a probe loss on some rank (group-reduced) is not finite", math.nan)
        plus = [losses[(q, +1)] for q in range(n)]
        minus = [] if cfg.one_sided else [losses[(q, -1)] for q in range(n)]
        loss0 = losses.get((-1, 0))
        grads = projected_grads(plus, minus, loss0, cfg)
        loss = loss0 if cfg.one_sided else sum(p + m for p, m in zip(plus, minus)) / (2 * n)
        record = StepRecord(seed, grads, lrs, wds)
        if not coeffs_representable(grads, n):
            record = StepRecord(seed, (math.nan,) * n, lrs, wds, skipped=True)
            finish_inplace(self._table, record, cfg, self.backend)
            self._commit(record)
            return self._warn_or_raise(f"the projected gradients {grads} overflow float32", loss)
        finish_inplace(self._table, record, cfg, self.backend)
        self._commit(record)
        return loss

    def _record_dropped(self, seed: int, lrs, wds, stop: int) -> None:
        self._commit(StepRecord(seed, (math.nan,) * self.config.n_queries, lrs, wds, skipped=True, stop=stop))

    def _skip(self, seed: int, lrs, wds, stop: int, value: float, what: str) -> float:
        self._record_dropped(seed, lrs, wds, stop)
        return self._warn_or_raise(f"{what} is {value}", value)


# ---------------------------------------------------------------------- parameter collection
def _collect_groups(params, model: torch.nn.Module | None) -> tuple[list[dict], list[list[str]]]:
    """Param groups of tensors for torch.optim.Optimizer, and each group's parameter names."""
    if isinstance(params, torch.nn.Module):
        raw_groups = [{"params": [(n, p) for n, p in params.named_parameters() if p.requires_grad]}]
    else:
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors, (name, tensor) pairs, param-group dicts "
                            "or an nn.Module, not a single tensor")
        items = list(params)
        if not items:
            raise ValueError("ZOSGD got an empty parameter list")
        if all(isinstance(x, dict) for x in items):
            raw_groups = [dict(g) for g in items]
        elif any(isinstance(x, dict) for x in items):
            raise TypeError("mix of param-group dicts and parameters")
        else:
            raw_groups = [{"params": items}]
    model_names: dict[int, str] = {}
    if model is not None:
        for n, p in model.named_parameters():  # remove_duplicate: a tied parameter keeps its first name
            model_names.setdefault(id(p), n)

    groups, names, seen, unnamed = [], [], set(), 0
    index = 0
    for g in raw_groups:
        if "params" not in g:
            raise ValueError("a param-group dict needs a 'params' entry")
        entries = g["params"]
        if isinstance(entries, torch.nn.Module):
            entries = [(n, p) for n, p in entries.named_parameters() if p.requires_grad]
        elif isinstance(entries, torch.Tensor):
            entries = [entries]
        tensors, g_names = [], []
        for e in list(entries):
            if isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str):
                name, t = e
            else:
                name, t = None, e
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"parameter {index} is a {type(t).__name__}, not a tensor")
            if isinstance(t, torch.nn.Parameter) and not t.requires_grad:
                continue  # frozen
            _check_param(t, name or f"#{index}")
            if id(t) in seen:
                raise ValueError(f"parameter {name or index} is listed twice")
            seen.add(id(t))
            if model is not None:
                if id(t) not in model_names:
                    if name is None:
                        raise ValueError(f"parameter #{index} (shape {tuple(t.shape)}) is not a parameter of "
                                         "the model; pass (name, tensor) pairs for extra tensors")
                else:
                    name = model_names[id(t)]
            if name is None:
                name = f"param.{index}"
                unnamed += 1
            tensors.append(t)
            g_names.append(name)
            index += 1
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": tensors})
        names.append(g_names)
    if index == 0:
        raise ValueError("ZOSGD got no trainable parameters (the list is empty, or every nn.Parameter in it has "
                         "requires_grad=False)")
    flat = [n for g in names for n in g]
    keys = [C.param_key(n) for n in flat]
    if len(set(keys)) != len(keys):
        dup = sorted({n for n in flat if flat.count(n) > 1})
        raise ValueError(f"two parameters share a name (and so a contract key): {dup}")
    if unnamed:
        warnings.warn(f"ZOSGD: {unnamed} parameters have no names; their contract keys are 'param.<i>' by "
                      "position, so the perturbations (and a saved log) depend on parameter order. Pass "
                      "the model, model=..., or (name, tensor) pairs for stable keys.", stacklevel=user_stacklevel())
    return groups, names


def _check_no_shared_memory(names: list[str], tensors: list[torch.Tensor]) -> None:
    """Each trained element belongs to one parameter. Two parameters over the same or overlapping memory (views
    of one storage, or two nn.Parameters made from one tensor) would be perturbed and updated twice per step;
    a parameter tied by module sharing is one tensor and is listed (and trained) once."""
    pair = ops.overlapping_pair(tensors)
    if pair is None:
        return
    (s0, e0), (s1, e1) = (ops.memory_span(tensors[k]) for k in pair)
    a, b = (names[k] for k in pair)
    if (s0, e0) == (s1, e1):
        raise ValueError(f"ZOSGD: parameters {a!r} and {b!r} share memory (two tensors over the same "
                         "elements, e.g. nn.Parameter(p.data)); tie them as one nn.Parameter, which is "
                         "trained once, or give each its own storage")
    raise ValueError(f"ZOSGD: parameters {a!r} and {b!r} overlap in memory (views of one storage: bytes "
                     f"[0, {e0 - s0}) of {a!r} and [{s1 - s0}, {e1 - s0}) from {a!r}'s start); each element "
                     "must belong to one parameter: pass disjoint views, or the whole tensor once")


def _check_param(t: torch.Tensor, name: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        kind = "integer/bool" if not t.is_floating_point() and not t.is_complex() else str(t.dtype)
        raise TypeError(f"parameter {name} has dtype {t.dtype} ({kind}); ZOSGD trains float32, bfloat16 "
                        "or float16 parameters (quantized weights go through zokernels.quant)")
    if not t.is_contiguous():
        raise ValueError(f"parameter {name} (shape {tuple(t.shape)}) is not contiguous; call "
                         "param.data = param.data.contiguous() once before building the optimizer")
    if t.device.type == "meta":
        raise ValueError(f"parameter {name} is on the meta device (e.g. offloaded by accelerate's device_map "
                         "'cpu'/'disk'); ZO perturbs weights where they live: place every trainable weight on "
                         "a real device, or shard the model with FSDP2")


# ---------------------------------------------------------------------- replay
def resolved_backends(params: ParamTable, backend: str) -> dict[str, str]:
    """{device type: the backend `backend` resolves to there} for the devices of the dense tensors, and
    {"<device type> masked": ...} for the masked ones."""
    masks = params.masks or [None] * len(params.tensors)
    out = {}
    for t, m in zip(params.tensors, masks):
        kind = t.device.type if m is None else f"{t.device.type} masked"
        if kind not in out:
            out[kind] = ops.backend_name("zo_update_" if m is None else "masked_zo_update_", t.device, backend)
    return dict(sorted(out.items()))


def check_log(log, named: list[tuple[str, torch.Tensor]]) -> ParamTable:
    """The ParamTable of `named` for this ZOSGD log; raises LogMismatch if the log is not for these weights."""
    check_contract(log)
    keys = log.keys
    bad = [n for n, k in keys.items() if C.param_key(n) != k]
    if bad:
        raise LogMismatch(f"the log's key table does not match param_key() for {bad[:5]} "
                          f"({len(bad)} names): written by an incompatible zokernels")
    by_key: dict[int, torch.Tensor] = {}
    for name, t in named:
        by_key.setdefault(C.param_key(name), t)
    missing = [n for n, k in keys.items() if k not in by_key]
    if missing:
        raise LogMismatch(f"{len(missing)} logged parameters are not in the given model, e.g. {missing[:5]}")
    diff = fingerprint_diff(base_fingerprint((n, by_key[k]) for n, k in keys.items()), log.base_fingerprint)
    if diff:
        raise LogMismatch(f"these are not the base weights the log started from: {len(diff)} parameters "
                          f"differ (shape, dtype or values), e.g. {diff[:5]}")
    tensors, tkeys, group_of = [], [], []
    for gi, names in enumerate(log.group_names):
        for n in names:
            tensors.append(by_key[keys[n]])
            tkeys.append(keys[n])
            group_of.append(gi)
    return ParamTable(tensors, tkeys, group_of)


def _attach_masks(log, params: ParamTable, masks) -> None:
    """params.masks from `masks`, checked against the log's mask fingerprint (MaZO)."""
    names = log.names
    table = resolve_masks(masks, names, params.tensors) if masks else None
    got = masks_fingerprint((n, m) for n, m in zip(names, table or []) if m is not None)
    want = log.header.get("masks", {})
    if got != want:
        raise LogMismatch("the masks given to replay are not the ones training used (mask fingerprints differ"
                          + ("; training used masks: pass masks=..." if want and not got else "") + ")")
    params.masks = table


def bind_replay(model_or_named_params, log, backend: str = "auto", *, masks=None) -> ParamTable:
    """What zokernels.replay changes for a ZOSGD log: the ParamTable of the base weights (checked against the
    log's key table, base and mask fingerprints), with the masks training used. Warns when `backend`
    resolves to another backend than training's (the rebuild is then not bitwise)."""
    params = check_log(log, named_tensors(model_or_named_params))
    _attach_masks(log, params, masks)
    trained = log.header.get("backends")
    now = resolved_backends(params, backend)
    if trained is not None and trained != now:
        warnings.warn(f"replay: training ran the ops with backend {trained}, this replay with {now}: the weights "
                      "will match to float32 rounding (~1e-7 relative), not bitwise; replay on the training "
                      "device with backend=... for a bitwise rebuild", stacklevel=user_stacklevel())
    return params


register_optimizer(ZOSGD.NAME, config_type=StepConfig, bind=bind_replay, apply_step=apply_step,
                   record_type=StepRecord)
