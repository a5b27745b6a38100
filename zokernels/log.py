"""The fine-tune log: everything needed to rebuild ZO fine-tuned weights from the base weights, for every
ZO optimizer of the package (ZOSGD, QuZO, and any optimizer that registers itself here).

A ZO step is fully described by its seed, its Q projected gradients and its learning rates, so a
run of T steps is ~ T * (8 + 8Q + 16G) bytes (G param groups) instead of a checkpoint. `replay`
re-applies the logged steps to the base weights, with no forward, through the pure step function of the
optimizer the header names (`register_optimizer`): bitwise with the backend training used (ZOSGD records
it in the header; replay warns when it resolves to another: Gaussian z then go through another float32
libm, ~1e-7 relative, and a 16-bit rounding may fall the other way in rare elements).

File format v2 (`FineTuneLog.save`): a numpy .npz, no pickle —
  `header`  UTF-8 JSON as uint8: format, format_version (2), contract_version, optimizer (registered
            name: "zosgd", "quzo"), config (the optimizer's fixed settings), groups ([{names, lr,
            weight_decay}], lr / weight_decay as at construction), keys ({name: contract key}), base_seed,
            base_fingerprint, columns (extra per-step columns), and optimizer-specific entries (ZOSGD:
            backends, masks);
  `seeds` uint64 [T], `grads` float64 [T, Q], `lrs` / `wds` float64 [T, G], `skipped` bool [T],
  `stop` int32 [T] (in-place probes: the forward a dropped step stopped after, else -1), and
  `col_<name>` int64 [T] per extra column (QuZO: probe_saturated, update_saturated).
Big integers (seeds, keys) are strings in the JSON. `FineTuneLog.load` also reads format v1 (ZOSGD's
npz up to commit e04bf6d: the config at the top level of the header) and the JSON logs that optimizers
register a reader for (QuZO's quzo_log.json of the same commits); `save` always writes v2.

`load` validates the whole file before returning: every zip member is read in full and CRC-checked, every
array's npy header must match its data's size (no object arrays), the header must be a JSON object with
the entries above, and every array must be present with its dtype and one row per step. Any fault raises
`CorruptLog` (a LogMismatch) naming the file and what is wrong; a missing file stays FileNotFoundError.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
import zipfile
import zlib
from typing import Any, Callable, Iterable

import numpy as np
import torch

from . import contract as C
from .step import StepConfig, StepRecord

FORMAT = "zokernels.finetune_log"
FORMAT_VERSION = 2
_FINGERPRINT_CHUNK = 1 << 22
_ZIP_MAGIC = b"PK\x03\x04"


class LogMismatch(ValueError):
    """The log does not belong to these weights (or to this version of the contract)."""


class CorruptLog(LogMismatch):
    """A log file (or the log inside an optimizer state) is damaged, truncated, inconsistent or not a zokernels
    fine-tune log at all; the message names the file and what is wrong."""


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


# ----------------------------------------------------------------------------- optimizers
@dataclasses.dataclass(frozen=True)
class LoggedOptimizer:
    """How replay rebuilds the weights of one optimizer's log.

    bind(target, log, backend, **options): checks that `target` (a model or named tensors) holds the base
    the log started from and returns what apply_step changes; apply_step(state, record, config, backend):
    the optimizer's pure step function (the one its step() calls after the forwards); config_type(**header
    config): its fixed settings; record_type: StepRecord or a subclass whose extra int fields are logged as
    extra columns."""

    name: str
    config_type: type
    bind: Callable[..., Any]
    apply_step: Callable[..., None]
    record_type: type = StepRecord


_OPTIMIZERS: dict[str, LoggedOptimizer] = {}
_JSON_READERS: dict[str, Callable[[dict], "FineTuneLog"]] = {}


def register_optimizer(name: str, *, config_type: type, bind: Callable, apply_step: Callable,
                       record_type: type = StepRecord) -> LoggedOptimizer:
    """Make logs whose header names optimizer `name` loadable and replayable (see LoggedOptimizer)."""
    if not (isinstance(record_type, type) and issubclass(record_type, StepRecord)):
        raise TypeError(f"record_type must be StepRecord or a subclass, got {record_type!r}")
    entry = LoggedOptimizer(name, config_type, bind, apply_step, record_type)
    _OPTIMIZERS[name] = entry
    return entry


def register_json_reader(format_name: str, reader: Callable[[dict], "FineTuneLog"]) -> None:
    """A reader for an older JSON log whose top-level "format" is `format_name` (FineTuneLog.load uses it)."""
    _JSON_READERS[format_name] = reader


def logged_optimizer(name: str) -> LoggedOptimizer:
    try:
        return _OPTIMIZERS[name]
    except KeyError:
        raise LogMismatch(f"the log was written by optimizer {name!r}, which is not registered here (known: "
                          f"{sorted(_OPTIMIZERS)}); import the module that defines it") from None


def _extra_columns(record_type: type) -> list[str]:
    base = {f.name for f in dataclasses.fields(StepRecord)}
    return [f.name for f in dataclasses.fields(record_type) if f.name not in base]


# ----------------------------------------------------------------------------- the log
class FineTuneLog:
    """header (dict, JSON-able; see the module docstring) + steps (list of StepRecord: .seed, .grads, .lr,
    .wd, .skipped, .stop, and the optimizer's extra columns)."""

    def __init__(self, header: dict, steps: list[StepRecord] | None = None):
        self.header = header
        self.steps: list[StepRecord] = list(steps or [])

    # -- views of the header
    @property
    def optimizer(self) -> str:
        return self.header["optimizer"]

    @property
    def config(self):
        """The optimizer's config (StepConfig for ZOSGD, QuZOConfig for QuZO)."""
        return logged_optimizer(self.optimizer).config_type(**self.header["config"])

    @property
    def keys(self) -> dict[str, int]:
        return {name: int(k) for name, k in self.header["keys"].items()}

    @property
    def group_names(self) -> list[list[str]]:
        return [list(g["names"]) for g in self.header["groups"]]

    @property
    def names(self) -> list[str]:
        """Every logged parameter (QuZO: QuantLinear layer) name, group by group."""
        return [n for g in self.header["groups"] for n in g["names"]]

    @property
    def base_seed(self) -> int:
        return int(self.header["base_seed"])

    @property
    def contract_version(self) -> int:
        return int(self.header["contract_version"])

    @property
    def base_fingerprint(self) -> dict | None:
        return self.header.get("base_fingerprint")

    @property
    def columns(self) -> list[str]:
        return list(self.header.get("columns", []))

    def append(self, record: StepRecord) -> None:
        self.steps.append(record)

    def __len__(self) -> int:
        return len(self.steps)

    # -- arrays
    def _arrays(self) -> dict[str, np.ndarray]:
        n, q, g = len(self.steps), int(self.header["config"]["n_queries"]), len(self.header["groups"])
        out = {
            "seeds": np.array([r.seed for r in self.steps], dtype=np.uint64).reshape(n),
            "grads": np.array([r.grads for r in self.steps], dtype=np.float64).reshape(n, q),
            "lrs": np.array([r.lr for r in self.steps], dtype=np.float64).reshape(n, g),
            "wds": np.array([r.wd for r in self.steps], dtype=np.float64).reshape(n, g),
            "skipped": np.array([r.skipped for r in self.steps], dtype=np.bool_).reshape(n),
            "stop": np.array([r.stop for r in self.steps], dtype=np.int32).reshape(n),
        }
        for c in self.columns:
            out[f"col_{c}"] = np.array([getattr(r, c) for r in self.steps], dtype=np.int64).reshape(n)
        return out

    @classmethod
    def _from_arrays(cls, header, a: dict[str, np.ndarray], where: str) -> "FineTuneLog":
        """The log of a raw header (any supported version) and its arrays, both validated first."""
        header = _check_header(header, where)
        _check_arrays(header, a, where)
        entry = _OPTIMIZERS.get(header["optimizer"])
        record_type = entry.record_type if entry is not None else StepRecord
        extra = [c for c in header.get("columns", []) if c in _extra_columns(record_type)]
        cols = [a[f"col_{c}"] for c in extra]
        steps = []
        for i, (s, gr, lr, wd, sk, st) in enumerate(zip(a["seeds"], a["grads"], a["lrs"], a["wds"], a["skipped"],
                                                        a["stop"])):
            steps.append(record_type(seed=int(s), grads=tuple(float(x) for x in gr), lr=tuple(float(x) for x in lr),
                                     wd=tuple(float(x) for x in wd), skipped=bool(sk), stop=int(st),
                                     **{c: int(col[i]) for c, col in zip(extra, cols)}))
        return cls(header, steps)

    # -- files (no pickle)
    def save(self, path: str | os.PathLike) -> None:
        """Write format v2 (whatever the log was loaded from)."""
        header = np.frombuffer(json.dumps(self.header, sort_keys=True).encode("utf-8"), dtype=np.uint8)
        with open(path, "wb") as f:  # a file object: numpy would append ".npz" to a path
            np.savez_compressed(f, header=header, **self._arrays())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FineTuneLog":
        """A log file of format v2 or v1 (npz), or an older JSON log with a registered reader (QuZO's), validated
        in full (module docstring); CorruptLog names the file and the fault."""
        where = os.fspath(path)
        with open(path, "rb") as fh:
            magic = fh.read(4)
            if not magic:
                raise CorruptLog(f"{where}: empty file (0 bytes), not a zokernels fine-tune log")
            fh.seek(0)
            if magic != _ZIP_MAGIC:
                return cls._load_json(fh, where)
            header, arrays = _read_npz(fh, where)
        return cls._from_arrays(header, arrays, where)

    @classmethod
    def _load_json(cls, fh, where: str) -> "FineTuneLog":
        head = fh.read(64).lstrip()
        if not head.startswith(b"{"):
            raise CorruptLog(f"{where}: not a zokernels fine-tune log (neither an npz archive nor a JSON object)")
        fh.seek(0)
        try:
            data = json.loads(fh.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptLog(f"{where}: not a zokernels fine-tune log (neither npz nor valid JSON: {e})") from None
        reader = _JSON_READERS.get(data.get("format")) if isinstance(data, dict) else None
        if reader is None:
            raise CorruptLog(f"{where}: not a zokernels fine-tune log (JSON of format "
                             f"{data.get('format') if isinstance(data, dict) else None!r}; readable JSON logs: "
                             f"{sorted(_JSON_READERS)})")
        try:
            log = reader(data)
        except LogMismatch as e:
            raise type(e)(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise CorruptLog(f"{where}: a damaged {data.get('format')} JSON log "
                             f"({type(e).__name__}: {e})") from None
        _check_header(log.header, where)
        return log

    # -- optimizer state (torch.save(..., weights_only=True) friendly)
    def state(self) -> dict:
        a = self._arrays()
        out = {"header": json.dumps(self.header, sort_keys=True),
               "seeds": torch.from_numpy(a.pop("seeds").view(np.int64).copy())}
        out.update({k: torch.from_numpy(v.copy()) for k, v in a.items()})
        return out

    @classmethod
    def from_state(cls, state: dict, where: str = "the optimizer state's log") -> "FineTuneLog":
        """From state() — of this version or of a v1 log (a ZOSGD state_dict saved by older code); validated as a
        log file is (CorruptLog)."""
        if not isinstance(state, dict) or not isinstance(state.get("header"), str):
            raise CorruptLog(f"{where}: no JSON header string")
        a = {}
        for k, v in state.items():
            if k == "header":
                continue
            if not isinstance(v, torch.Tensor):
                raise CorruptLog(f"{where}: entry {k!r} is a {type(v).__name__}, not a tensor")
            a[k] = v.detach().cpu().numpy()
        if "seeds" in a and a["seeds"].dtype == np.int64:
            a["seeds"] = a["seeds"].view(np.uint64)
        try:
            header = json.loads(state["header"])
        except json.JSONDecodeError as e:
            raise CorruptLog(f"{where}: the header is not valid JSON ({e})") from None
        return cls._from_arrays(header, a, where)

    def nbytes(self) -> int:
        buf = io.BytesIO()
        header = np.frombuffer(json.dumps(self.header).encode("utf-8"), dtype=np.uint8)
        np.savez_compressed(buf, header=header, **self._arrays())
        return buf.getbuffer().nbytes


def new_header(*, optimizer: str, config: dict, groups: list[dict], keys: dict[str, int], base_seed: int,
               fingerprint: dict | None, record_type: type = StepRecord, **extra) -> dict:
    """A v2 header. groups: [{"names": [...], "lr": float, "weight_decay": float}]; extra: optimizer-specific
    entries (JSON-able)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "contract_version": C.CONTRACT_VERSION,
        "optimizer": optimizer, "config": dict(config), "groups": groups,
        "keys": {name: str(k) for name, k in keys.items()}, "base_seed": str(base_seed),
        "base_fingerprint": fingerprint, "columns": _extra_columns(record_type), **extra,
    }


_V1_CONFIG = tuple(f.name for f in dataclasses.fields(StepConfig))


def upgrade_header(header: dict) -> dict:
    """A header of any supported format version as a v2 header (v1: ZOSGD's, config at the top level)."""
    version = header.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CorruptLog(f"format_version is {version!r}, not an integer")
    if version == FORMAT_VERSION:
        return header
    if version != 1:
        raise LogMismatch(f"fine-tune log format v{version} is not supported (this zokernels reads v1 and "
                          f"v{FORMAT_VERSION}; written by a newer zokernels?)")
    missing = [k for k in _V1_CONFIG if k not in header]
    if missing:
        raise CorruptLog(f"the v1 header has no {missing}")
    out = {k: v for k, v in header.items() if k not in _V1_CONFIG and k != "weight_decay"}
    out.update(format_version=FORMAT_VERSION, optimizer="zosgd", config={k: header[k] for k in _V1_CONFIG},
               columns=[])
    return out


# ----------------------------------------------------------------------------- validation (load)
_NPZ_MEMBER_LIMIT = 1 << 31  # bytes per uncompressed member: a 20k-step log is a few hundred KB


def _read_npz(fh, where: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(raw header, arrays) of an npz log, every member read in full and CRC-checked; CorruptLog otherwise."""
    try:
        try:
            zf = zipfile.ZipFile(fh)
        except zipfile.BadZipFile as e:
            raise CorruptLog(f"{where}: truncated or damaged npz (a zip archive without its end-of-archive "
                             f"record: the file ends early; {e})") from None
        with zf:
            infos = {i.filename: i for i in zf.infolist()}
            if "header.npy" not in infos:
                raise CorruptLog(f"{where}: not a zokernels fine-tune log (a zip archive without 'header.npy'; "
                                 f"it holds {sorted(infos)[:5]})")
            arrays = {}
            for name, info in infos.items():
                if not name.endswith(".npy"):
                    raise CorruptLog(f"{where}: not a zokernels fine-tune log (zip member {name!r} is not an array)")
                if info.file_size > _NPZ_MEMBER_LIMIT:
                    raise CorruptLog(f"{where}: array {name[:-4]!r} claims {info.file_size} bytes (corrupt)")
                arrays[name[:-4]] = _read_npy(zf.read(name), name[:-4], where)  # read(): checks the CRC
    except LogMismatch:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError, ValueError,
            KeyError, IndexError, struct.error, OverflowError, UnicodeDecodeError) as e:
        raise CorruptLog(f"{where}: corrupt npz ({type(e).__name__}: {e})") from None
    header_bytes = arrays.pop("header")
    if header_bytes.dtype != np.uint8 or header_bytes.ndim != 1:
        raise CorruptLog(f"{where}: the header is {header_bytes.dtype} {header_bytes.shape}, not uint8 bytes")
    try:
        header = json.loads(header_bytes.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptLog(f"{where}: the header is not valid UTF-8 JSON ({e})") from None
    return header, arrays


def _read_npy(data: bytes, name: str, where: str) -> np.ndarray:
    """One .npy member, its header checked against its data size (no pickle, no object arrays)."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise CorruptLog(f"{where}: array {name!r} has npy format version {version} (corrupt)")
        shape, fortran, dtype = read(f)
    except LogMismatch:
        raise
    except (ValueError, TypeError, SyntaxError, struct.error, OverflowError) as e:
        raise CorruptLog(f"{where}: array {name!r} has a damaged npy header ({e})") from None
    if dtype.hasobject:
        raise CorruptLog(f"{where}: array {name!r} holds Python objects (pickle), which a log never does")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    size = count * dtype.itemsize
    if size != len(data) - f.tell():
        raise CorruptLog(f"{where}: array {name!r} is truncated or damaged (its header says {shape} {dtype}: "
                         f"{size} bytes; the member holds {len(data) - f.tell()})")
    out = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell()).copy()
    return out.reshape(shape, order="F" if fortran else "C")


def _check_header(header, where: str) -> dict:
    """The v2 form of a raw header, every entry the loader and replay use present and of its type."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CorruptLog(f"{where}: not a zokernels fine-tune log (the header's format is "
                         f"{header.get('format') if isinstance(header, dict) else type(header).__name__!r})")
    try:
        header = upgrade_header(header)
    except LogMismatch as e:
        raise type(e)(f"{where}: {e}") from None

    def bad(what: str):
        return CorruptLog(f"{where}: header entry {what}")

    for key in ("optimizer", "config", "groups", "keys", "base_seed", "contract_version"):
        if key not in header:
            raise bad(f"{key!r} is missing")
    if not isinstance(header["optimizer"], str):
        raise bad(f"'optimizer' is {header['optimizer']!r}, not a name")
    config = header["config"]
    n = config.get("n_queries") if isinstance(config, dict) else None
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= C.MAX_QUERIES:
        raise bad(f"'config' has no valid n_queries ({config!r})")
    entry = _OPTIMIZERS.get(header["optimizer"])
    if entry is not None:
        try:
            entry.config_type(**config)
        except TypeError as e:
            raise bad(f"'config' does not fit optimizer {header['optimizer']!r} ({e})") from None
    groups = header["groups"]
    if not isinstance(groups, list) or not groups or not all(
            isinstance(g, dict) and isinstance(g.get("names"), list) and all(isinstance(n, str) for n in g["names"])
            for g in groups):
        raise bad("'groups' is not a non-empty list of {'names': [...], ...}")
    keys = header["keys"]
    try:
        if not isinstance(keys, dict):
            raise TypeError
        for k in keys.values():
            C.check_u64(int(k), "key")
        int(header["base_seed"])
        int(header["contract_version"])
    except (TypeError, ValueError, OverflowError):
        raise bad("'keys', 'base_seed' or 'contract_version' is not an integer (table)") from None
    columns = header.get("columns", [])
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise bad(f"'columns' is {columns!r}, not a list of names")
    return header


def _check_arrays(header: dict, a: dict[str, np.ndarray], where: str) -> None:
    """Every per-step array present, of its dtype, one row per step, with Q (grads) or G (lrs, wds) columns."""
    q, g = int(header["config"]["n_queries"]), len(header["groups"])
    want = {"seeds": (np.uint64, ()), "grads": (np.float64, (q,)), "lrs": (np.float64, (g,)),
            "wds": (np.float64, (g,)), "skipped": (np.bool_, ()), "stop": (np.int32, ())}
    want.update({f"col_{c}": (np.int64, ()) for c in header.get("columns", [])})
    steps = None
    for name, (dtype, cols) in want.items():
        if name not in a:
            raise CorruptLog(f"{where}: missing array {name!r}")
        x = a[name]
        if x.dtype != dtype:
            raise CorruptLog(f"{where}: array {name!r} has dtype {x.dtype}, a log stores {np.dtype(dtype)}")
        if x.ndim != 1 + len(cols) or tuple(x.shape[1:]) != cols:
            raise CorruptLog(f"{where}: array {name!r} has shape {tuple(x.shape)}, expected (steps,"
                             + "".join(f" {c}" for c in cols) + ")"
                             + (f" (n_queries={q})" if name == "grads" else f" ({g} groups)" if cols else ""))
        if steps is None:
            steps = (name, x.shape[0])
        elif x.shape[0] != steps[1]:
            raise CorruptLog(f"{where}: array {name!r} has {x.shape[0]} rows, {steps[0]!r} has {steps[1]} (every "
                             "array has one row per step)")


# ----------------------------------------------------------------------------- replay
def check_contract(log: FineTuneLog) -> None:
    if log.header.get("format") != FORMAT:
        raise LogMismatch("not a zokernels fine-tune log")
    if log.contract_version != C.CONTRACT_VERSION:
        raise LogMismatch(f"the log was written under perturbation contract v{log.contract_version}; this "
                          f"zokernels implements v{C.CONTRACT_VERSION}: its z differ, replay would be wrong")


def replay(model_or_named_params, log_or_path: FineTuneLog | str | os.PathLike, backend: str = "auto",
           **options) -> FineTuneLog:
    """Rebuild fine-tuned weights in place from the base weights: re-apply every logged step with no
    forward, through the pure step function of the optimizer that wrote the log (ZOSGD: in-place probes'
    +-eps passes and skipped steps included; QuZO: on the QuantLinear layers of a model quantized like
    the base). Bitwise equal to training with the same backend. Refuses a log whose contract version,
    key table or base fingerprint does not match. options go to the optimizer's check (ZOSGD: masks=
    {name or tensor: zokernels.mazo.ParamMask}, the masks training used). Returns the log."""
    log = log_or_path if isinstance(log_or_path, FineTuneLog) else FineTuneLog.load(log_or_path)
    check_contract(log)
    entry = logged_optimizer(log.optimizer)
    state = entry.bind(model_or_named_params, log, backend, **options)
    config = log.config
    with torch.no_grad():
        for record in log.steps:
            entry.apply_step(state, record, config, backend)
    return log


def named_tensors(model_or_named_params) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of an nn.Module's parameters, a {name: tensor} dict or (name, tensor) pairs."""
    if isinstance(model_or_named_params, torch.nn.Module):
        return list(model_or_named_params.named_parameters())
    if isinstance(model_or_named_params, dict):
        return list(model_or_named_params.items())
    named = list(model_or_named_params)
    if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in named):
        raise TypeError("replay needs an nn.Module, a {name: tensor} dict or (name, tensor) pairs")
    return named
