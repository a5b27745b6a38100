"""Drift-free probes: the forward sees theta + eps z (or - eps z) while the stored weights never change.

Two mechanisms, both built on `zokernels.perturbed_copy` scratch tensors swapped in with
`param.data = scratch` and swapped back afterwards (so no rounding drift in 16-bit weights):

- whole-forward swap: a set of parameters is swapped for the entire closure (extra memory: their size);
- hooks: a forward pre-hook on each module that directly owns trainable parameters swaps them in, its
  forward post-hook swaps them back (extra memory: the scratch of modules in flight). Reference
  counts by parameter make tied parameters (owned by two modules), re-entrant and repeated module
  calls safe; a `finally` restores everything and removes the hooks if the forward raises.

MaZO's masked parameters are not swapped: each probe writes R(theta + eps z) into their masked elements in
place for the whole closure, after copying those elements' values out, and writes the copies back after
(bitwise). A probe's traffic and extra memory then scale with the mask, and it always reads the weights as
they are now (a persistent dense scratch that is kept equal to theta off the mask goes stale when the user
edits `p.data`, which changes neither the storage nor the version counter).

`StorageReads` is the safety net for hooks: a TorchDispatchMode that records which parameter
storages the ops of a forward touch. A parameter whose *original* storage is touched during a probe
was read outside its owner's forward (nn.MultiheadAttention reads out_proj.weight inside its own
forward) and must be swapped for the whole forward instead.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from . import contract as C
from . import ops
from .step import ParamTable, StepConfig


class ProbeError(RuntimeError):
    """A probe could not be made drift-free and correct; the message says what to do."""


class StorageReads(TorchDispatchMode):
    """Records the indices of watched parameters whose storage an op receives while not paused.

    watched: {untyped storage data_ptr: [parameter indices]} of the parameters' original data."""

    def __init__(self, watched: dict[int, list[int]]):
        super().__init__()
        self.watched = watched
        self.hits: set[int] = set()
        self._paused = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            for a in tree_leaves((args, kwargs)):
                if isinstance(a, torch.Tensor):
                    try:
                        ptr = a.untyped_storage().data_ptr()
                    except (RuntimeError, NotImplementedError):
                        continue
                    hit = self.watched.get(ptr)
                    if hit:
                        self.hits.update(hit)
        return func(*args, **kwargs)


def watch_original_storages(params: ParamTable) -> dict[int, list[int]]:
    watched: dict[int, list[int]] = {}
    masks = params.masks or [None] * len(params.tensors)
    for i, t in enumerate(params.tensors):
        # shards (FSDP all-gathers them) and masked parameters are perturbed in their own storage: read on purpose
        if t.numel() and i not in params.sharded and masks[i] is None:
            watched.setdefault(t.untyped_storage().data_ptr(), []).append(i)
    return watched


def owned_params(model: torch.nn.Module, params: ParamTable) -> tuple[list[tuple[torch.nn.Module, list[int]]], set[int]]:
    """[(module, indices of trainable params it directly owns)], and the indices no module owns."""
    index = {id(t): i for i, t in enumerate(params.tensors)}
    owners, seen = [], set()
    for module in model.modules():
        idx = []
        for _, p in module.named_parameters(recurse=False, remove_duplicate=False):
            i = index.get(id(p))
            if i is not None and i not in idx:
                idx.append(i)
        if idx:
            owners.append((module, idx))
            seen.update(idx)
    return owners, set(range(len(params.tensors))) - seen


class Prober:
    """Makes probe (seed, query, sign) visible to forwards run inside `perturbed(...)`.

    whole: indices swapped for the whole forward (all of them in "swap" mode); the others are
    swapped by their owners' hooks (model required), except `sharded` (DTensor local shards) and `masked`
    (MaZO) indices, which are written in their own storage for the whole closure and restored after it."""

    def __init__(self, params: ParamTable, config: StepConfig, backend: str, model: torch.nn.Module | None,
                 mode: str):
        if mode not in ("hooks", "swap"):
            raise ValueError(f"drift-free probe mode must be 'hooks' or 'swap', got {mode!r}")
        self.params, self.config, self.backend, self.mode = params, config, backend, mode
        self.owners: list[tuple[torch.nn.Module, list[int]]] = []
        if mode == "swap":
            self.whole = set(range(len(params.tensors)))
        else:
            if model is None:
                raise ValueError("probe='hooks' needs the model (pass model= or an nn.Module as params)")
            self.owners, self.whole = owned_params(model, params)
        # Local shards of DTensor parameters: written in place for the whole closure, see in_storage().
        self.sharded = set(params.sharded)
        # MaZO's masked parameters: their masked elements written in place for the whole closure, see
        # masked_in_storage().
        self.masked = {i for i, m in enumerate(params.masks or []) if m is not None}
        self.whole -= self.sharded | self.masked
        self.owners = [(module, kept) for module, idx in self.owners
                       if (kept := [i for i in idx if i not in self.masked])]
        self._mask_index: dict[int, torch.Tensor] = {}

    def scratch(self, idx: list[int], seed: int, query: int, sign: int) -> list[torch.Tensor]:
        """R(theta_i + sign * eps * z_query) for i in idx; R's uniforms: stream 1 (+) or 2 (-)."""
        return self._perturbed_copy([self.params.tensors[i] for i in idx], idx, seed, query, sign)

    def masked_backups(self, idx: list[int]) -> list[torch.Tensor]:
        """The values of the masked elements of tensors[i], i in idx (a copy: what masked_in_storage overwrites)."""
        out = []
        for i in idx:
            if i not in self._mask_index:  # flat indices of the mask, kept: 4 bytes per masked element (int32)
                ix = self.params.masks[i].local_indices()
                self._mask_index[i] = ix.to(torch.int32) if self.params.tensors[i].numel() < 2 ** 31 else ix
            out.append(self.params.tensors[i].detach().view(-1)[self._mask_index[i]])
        return out

    def masked_in_storage(self, idx: list[int], seed: int, query: int, sign: int) -> None:
        """Masked elements of tensors[i] <- R(theta + sign eps z_query), in place: the values masked_perturbed_copy
        writes (same rounding, same uniforms), read by every forward whoever reads the parameter."""
        ops.masked_perturb_([self.params.tensors[i] for i in idx], [self.params.masks[i] for i in idx], seed,
                            sign * self.config.eps, [self.params.keys[i] for i in idx], query=query,
                            dist=self.config.dist, rounding=self.config.probe_rounding,
                            sr_stream=C.STREAM_PROBE_SR_POS if sign > 0 else C.STREAM_PROBE_SR_NEG,
                            offsets=self.params.offsets_of(idx), backend=self.backend)

    def restore_masked(self, idx: list[int], backups: list[torch.Tensor]) -> None:
        """Write masked_backups' values back: tensors[i] bitwise as before masked_in_storage."""
        with torch.no_grad():
            for i, b in zip(idx, backups):
                self.params.tensors[i].view(-1)[self._mask_index[i]] = b

    def _perturbed_copy(self, sources, idx, seed, query, sign, outs=None) -> list[torch.Tensor]:
        return ops.perturbed_copy(sources, seed, sign * self.config.eps,
                                  [self.params.keys[i] for i in idx], query=query, dist=self.config.dist,
                                  rounding=self.config.probe_rounding,
                                  sr_stream=C.STREAM_PROBE_SR_POS if sign > 0 else C.STREAM_PROBE_SR_NEG,
                                  offsets=self.params.offsets_of(idx), outs=outs, backend=self.backend)

    def in_storage(self, idx: list[int], seed: int, query: int, sign: int) -> list[torch.Tensor]:
        """Write R(theta_i + sign eps z_query) into tensors[i]'s own storage; return the backups that
        restore it exactly. For DTensor local shards: FSDP2 all-gathers from that storage (a `.data`
        swap would not be seen), so the forward reads the perturbed full tensor — bitwise the unsharded
        run's scratch, since z and the rounding uniforms are keyed by global index."""
        backups = [self.params.tensors[i].clone() for i in idx]
        self._perturbed_copy(backups, idx, seed, query, sign, outs=[self.params.tensors[i] for i in idx])
        return backups

    @contextlib.contextmanager
    def perturbed(self, seed: int, query: int, sign: int, reads: StorageReads | None = None) -> Iterator[None]:
        tensors = self.params.tensors
        quiet = reads.paused if reads is not None else contextlib.nullcontext
        whole_saved: dict[int, torch.Tensor] = {}
        hook_saved: dict[int, torch.Tensor] = {}
        depth: dict[int, int] = {}
        handles = []
        sharded = sorted(self.sharded)
        shard_backups: list[torch.Tensor] = []
        masked = sorted(self.masked)
        mask_backups: list[torch.Tensor] = []

        def swap_in(idx: list[int], saved: dict[int, torch.Tensor]) -> None:
            for i, s in zip(idx, self.scratch(idx, seed, query, sign)):
                saved[i] = tensors[i].data
                tensors[i].data = s

        def pre_hook(idx):
            def hook(module, args):
                with quiet():
                    todo = [i for i in idx if depth.get(i, 0) == 0]
                    if todo:
                        swap_in(todo, hook_saved)
                    for i in idx:
                        depth[i] = depth.get(i, 0) + 1
            return hook

        def post_hook(idx):
            def hook(module, args, output):
                for i in idx:
                    depth[i] -= 1
                    if depth[i] == 0:
                        tensors[i].data = hook_saved.pop(i)
            return hook

        try:
            with quiet():
                if sharded:
                    shard_backups = self.in_storage(sharded, seed, query, sign)
                if masked:
                    mask_backups = self.masked_backups(masked)
                    self.masked_in_storage(masked, seed, query, sign)
                whole = sorted(self.whole)
                if whole:
                    swap_in(whole, whole_saved)
            for module, idx in self.owners:
                idx = [i for i in idx if i not in self.whole]
                if idx:
                    handles.append(module.register_forward_pre_hook(pre_hook(idx)))
                    handles.append(module.register_forward_hook(post_hook(idx)))
            yield
        finally:
            for h in handles:
                h.remove()
            for saved in (hook_saved, whole_saved):
                for i, original in saved.items():
                    tensors[i].data = original
                saved.clear()
            with quiet():
                for i, backup in zip(sharded, shard_backups):
                    tensors[i].copy_(backup)
                self.restore_masked(masked[:len(mask_backups)], mask_backups)
