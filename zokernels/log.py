"""The fine-tune log: everything needed to rebuild ZO fine-tuned weights from the base weights.

A ZO step is fully described by its seed, its Q projected gradients and its learning rates, so a
run of T steps is ~ T * (8 + 8Q + 16G) bytes (G param groups) instead of a checkpoint. `replay`
re-applies the logged steps to the base weights, with no forward: bitwise with the backend training
used (recorded in the header; replay warns when it resolves to another: Gaussian z then go through
another float32 libm, ~1e-7 relative, and a 16-bit rounding may fall the other way in rare elements).

File format (`FineTuneLog.save`): a numpy .npz, no pickle — `header` (UTF-8 JSON as uint8),
`seeds` uint64 [T], `grads` float64 [T, Q], `lrs` / `wds` float64 [T, G], `skipped` bool [T],
`stop` int32 [T] (in-place probes: the forward a dropped step stopped after, else -1).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from typing import Iterable

import numpy as np
import torch

from . import contract as C
from . import ops
from .step import ParamTable, StepConfig, StepRecord, apply_step

FORMAT = "zokernels.finetune_log"
FORMAT_VERSION = 1
_FINGERPRINT_CHUNK = 1 << 22


class LogMismatch(ValueError):
    """The log does not belong to these weights (or to this version of the contract)."""


# ----------------------------------------------------------------------------- base fingerprint
def tensor_fingerprint(t: torch.Tensor) -> int:
    """Exact, device-independent integer fingerprint of a tensor's bits:
    sum_j bits_j * m_j mod 2^64, m_j an odd multiplier < 2^31 derived from the flat index j.

    bits_j < 2^32 and m_j < 2^31, so every product fits int64; products are split into 32-bit halves
    before summing so no sum wraps either (integer sums are exact in any order, on any device)."""
    flat = t.detach().reshape(-1)
    if flat.element_size() == 4:
        bits, mask = flat.view(torch.int32), 0xFFFFFFFF
    elif flat.element_size() == 2:
        bits, mask = flat.view(torch.int16), 0xFFFF
    else:
        bits, mask = flat.view(torch.int64), None
    total = 0
    for start in range(0, flat.numel(), _FINGERPRINT_CHUNK):
        n = min(_FINGERPRINT_CHUNK, flat.numel() - start)
        j = torch.arange(start, start + n, dtype=torch.int64, device=flat.device)
        m = (((j & 0xFFFF) * 0x9E37 + ((j >> 16) & 0xFFFF) * 0x79B9 + (j >> 32) * 0x7F4A) & 0x7FFFFFFF) | 1
        x = bits[start:start + n].to(torch.int64)
        parts = [x & mask] if mask is not None else [x & 0xFFFFFFFF, (x >> 32) & 0xFFFFFFFF]
        for shift, part in enumerate(parts):
            p = part * m
            total += (int((p >> 32).sum()) << 32) + int((p & 0xFFFFFFFF).sum()) << (13 * shift)
    return total & C.MASK64


def base_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> dict:
    """{"digest": blake2b of all entries, "params": {canonical name: "shape|dtype|hex sum"}}."""
    entries = {}
    for name, t in named:
        shape = "x".join(str(s) for s in t.shape)
        entries[C.canonical_name(name)] = f"{shape}|{str(t.dtype).replace('torch.', '')}|{tensor_fingerprint(t):016x}"
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(entries):
        h.update(f"{name}={entries[name]};".encode("utf-8"))
    return {"digest": h.hexdigest(), "params": entries}


def fingerprint_diff(got: dict, want: dict) -> list[str]:
    """The entries of base fingerprint `got` that differ from `want` ([] when the digests agree)."""
    if got["digest"] == want["digest"]:
        return []
    names = sorted(set(got["params"]) | set(want["params"]))
    return [n for n in names if got["params"].get(n) != want["params"].get(n)]


# ----------------------------------------------------------------------------- the log
class FineTuneLog:
    """header (dict, JSON-able) + steps (list of StepRecord: .seed, .grads, .lr, .wd, .skipped)."""

    def __init__(self, header: dict, steps: list[StepRecord] | None = None):
        self.header = header
        self.steps: list[StepRecord] = list(steps or [])

    # -- views of the header
    @property
    def config(self) -> StepConfig:
        h = self.header
        return StepConfig(eps=float(h["eps"]), n_queries=int(h["n_queries"]), dist=h["dist"],
                          one_sided=bool(h["one_sided"]), probe=h["probe"], probe_rounding=h["probe_rounding"],
                          update_rounding=h["update_rounding"])

    @property
    def keys(self) -> dict[str, int]:
        return {name: int(k) for name, k in self.header["keys"].items()}

    @property
    def group_names(self) -> list[list[str]]:
        return [list(g["names"]) for g in self.header["groups"]]

    def append(self, record: StepRecord) -> None:
        self.steps.append(record)

    def __len__(self) -> int:
        return len(self.steps)

    # -- arrays
    def _arrays(self) -> dict[str, np.ndarray]:
        n, q, g = len(self.steps), int(self.header["n_queries"]), len(self.header["groups"])
        return {
            "seeds": np.array([r.seed for r in self.steps], dtype=np.uint64).reshape(n),
            "grads": np.array([r.grads for r in self.steps], dtype=np.float64).reshape(n, q),
            "lrs": np.array([r.lr for r in self.steps], dtype=np.float64).reshape(n, g),
            "wds": np.array([r.wd for r in self.steps], dtype=np.float64).reshape(n, g),
            "skipped": np.array([r.skipped for r in self.steps], dtype=np.bool_).reshape(n),
            "stop": np.array([r.stop for r in self.steps], dtype=np.int32).reshape(n),
        }

    @classmethod
    def _from_arrays(cls, header: dict, a: dict[str, np.ndarray]) -> "FineTuneLog":
        steps = [StepRecord(seed=int(s), grads=tuple(float(x) for x in gr), lr=tuple(float(x) for x in lr),
                            wd=tuple(float(x) for x in wd), skipped=bool(sk), stop=int(st))
                 for s, gr, lr, wd, sk, st in zip(a["seeds"], a["grads"], a["lrs"], a["wds"], a["skipped"],
                                                  a["stop"])]
        return cls(header, steps)

    # -- files (no pickle)
    def save(self, path: str | os.PathLike) -> None:
        header = np.frombuffer(json.dumps(self.header, sort_keys=True).encode("utf-8"), dtype=np.uint8)
        with open(path, "wb") as f:  # a file object: numpy would append ".npz" to a path
            np.savez_compressed(f, header=header, **self._arrays())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FineTuneLog":
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode("utf-8"))
            if header.get("format") != FORMAT:
                raise LogMismatch(f"{path} is not a zokernels fine-tune log")
            return cls._from_arrays(header, {k: z[k] for k in z.files if k != "header"})

    # -- optimizer state (torch.save(..., weights_only=True) friendly)
    def state(self) -> dict:
        a = self._arrays()
        out = {"header": json.dumps(self.header, sort_keys=True),
               "seeds": torch.from_numpy(a.pop("seeds").view(np.int64).copy())}
        out.update({k: torch.from_numpy(v.copy()) for k, v in a.items()})
        return out

    @classmethod
    def from_state(cls, state: dict) -> "FineTuneLog":
        a = {k: v.cpu().numpy() for k, v in state.items() if k != "header"}
        a["seeds"] = a["seeds"].view(np.uint64)
        return cls._from_arrays(json.loads(state["header"]), a)

    def nbytes(self) -> int:
        buf = io.BytesIO()
        header = np.frombuffer(json.dumps(self.header).encode("utf-8"), dtype=np.uint8)
        np.savez_compressed(buf, header=header, **self._arrays())
        return buf.getbuffer().nbytes


def new_header(*, config: StepConfig, groups: list[dict], keys: dict[str, int], base_seed: int,
               fingerprint: dict) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "contract_version": C.CONTRACT_VERSION,
        "eps": config.eps, "n_queries": config.n_queries, "dist": config.dist, "one_sided": config.one_sided,
        "probe": config.probe, "probe_rounding": config.probe_rounding,
        "update_rounding": config.update_rounding,
        "weight_decay": [g["weight_decay"] for g in groups], "groups": groups,
        "keys": {name: str(k) for name, k in keys.items()}, "base_seed": str(base_seed),
        "masks": {}, "base_fingerprint": fingerprint,
    }


def resolved_backends(params: ParamTable, backend: str) -> dict[str, str]:
    """{device type: the backend `backend` resolves to there} for the devices of the dense tensors, and
    {"<device type> masked": ...} for the masked ones (the masked ops may fall back to another backend)."""
    masks = params.masks or [None] * len(params.tensors)
    out = {}
    for t, m in zip(params.tensors, masks):
        kind = t.device.type if m is None else f"{t.device.type} masked"
        if kind not in out:
            mod = ops.select_backend(t.device, backend) if m is None else ops._masked_backend(t.device, backend)
            out[kind] = mod.NAME
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- replay
def _named(model_or_named_params) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_named_params, torch.nn.Module):
        return list(model_or_named_params.named_parameters())
    if isinstance(model_or_named_params, dict):
        return list(model_or_named_params.items())
    named = list(model_or_named_params)
    if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in named):
        raise TypeError("replay needs an nn.Module, a {name: tensor} dict or (name, tensor) pairs")
    return named


def check_log(log: FineTuneLog, named: list[tuple[str, torch.Tensor]]) -> ParamTable:
    """The ParamTable of `named` for this log; raises LogMismatch if the log is not for these weights."""
    h = log.header
    if h.get("format") != FORMAT:
        raise LogMismatch("not a zokernels fine-tune log")
    if int(h["contract_version"]) != C.CONTRACT_VERSION:
        raise LogMismatch(f"the log was written under perturbation contract v{h['contract_version']}; this "
                          f"zokernels implements v{C.CONTRACT_VERSION}: its z differ, replay would be wrong")
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
    diff = fingerprint_diff(base_fingerprint((n, by_key[k]) for n, k in keys.items()), h["base_fingerprint"])
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


def replay(model_or_named_params, log_or_path: FineTuneLog | str | os.PathLike, backend: str = "auto", *,
           masks=None) -> FineTuneLog:
    """Rebuild fine-tuned weights in place from the base weights: re-apply every logged step
    (in-place probes' +-eps passes and skipped steps included) with no forward. Bitwise equal to
    training with the same backend. Refuses a log whose contract version, key table or base
    fingerprint does not match, or whose mask fingerprint (MaZO) differs from `masks`'
    ({name or tensor: zokernels.mazo.ParamMask}, the masks training used). Returns the log."""
    log = log_or_path if isinstance(log_or_path, FineTuneLog) else FineTuneLog.load(log_or_path)
    params = check_log(log, _named(model_or_named_params))
    _attach_masks(log, params, masks)
    trained = log.header.get("backends")
    now = resolved_backends(params, backend)
    if trained is not None and trained != now:
        warnings.warn(f"replay: training ran the ops with backend {trained}, this replay with {now}: the weights "
                      "will match to float32 rounding (~1e-7 relative), not bitwise; replay on the training "
                      "device with backend=... for a bitwise rebuild", stacklevel=2)
    config = log.config
    with torch.no_grad():
        for record in log.steps:
            apply_step(params, record, config, backend)
    return log


def _attach_masks(log: FineTuneLog, params: ParamTable, masks) -> None:
    """params.masks from `masks`, checked against the log's mask fingerprint (MaZO)."""
    from .mazo.masks import masks_fingerprint, resolve_masks

    names = [n for g in log.group_names for n in g]
    table = resolve_masks(masks, names, params.tensors) if masks else None
    got = masks_fingerprint((n, m) for n, m in zip(names, table or []) if m is not None)
    want = log.header.get("masks", {})
    if got != want:
        raise LogMismatch("the masks given to replay are not the ones training used (mask fingerprints differ"
                          + ("; training used masks: pass masks=..." if want and not got else "") + ")")
    params.masks = table
