"""Compact weight masks: which elements of a parameter the masked ops perturb and update (MaZO's masks, and
any method that trains a subset of a weight). The rules that choose masks live in the method packages
(zokernels.mazo.masks: top-k of importance scores).

A parameter of shape S is viewed as a matrix [rows, ncols]: rows = S[0] and ncols = numel / S[0]
for ndim >= 2 (a Linear weight's output rows), rows = 1 for ndim <= 1. Element (r, c) has local
flat index r * ncols + c, so its contract index is j = offset + r * ncols + c — the dense j.

Formats (`ParamMask.kind`), never a dense float/bool tensor:

- "rows":   top-k columns of every row: `index` [rows, k] column ids, ascending per row;
            int16 when ncols < 32768, else int32.
- "blocks": top-k blocks of `block` contiguous columns per row (block >= 16): `index` [rows, kb]
            block ids (columns [b*block, min((b+1)*block, ncols))), ascending; int16/int32 likewise.
            The kernels touch contiguous runs, so memory traffic falls with the ratio.
- "bits":   any set of elements: `index` uint8 [ceil(numel / 8)], bit (e & 7) of byte e >> 3 is
            element e's (little-endian bit order, as numpy.packbits(bitorder="little")).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from . import contract as C
from .contract import matrix_shape

KINDS = ("rows", "blocks", "bits")
MIN_BLOCK = 16
FORMAT = "zokernels.masks"


def index_dtype(ncols: int) -> torch.dtype:
    return torch.int16 if ncols < 32768 else torch.int32


def _check_ascending_ids(idx: torch.Tensor, limit: int, kind: str) -> None:
    """Every row of ids strictly ascending within [0, limit): the kernels index with them unchecked, so an id
    out of range would write outside the row (or the tensor) and a repeated one would move an element twice."""
    if idx.numel() == 0:
        return
    lo, hi = int(idx[:, 0].min()), int(idx[:, -1].max())
    ascending = idx.shape[1] < 2 or bool((idx[:, 1:].to(torch.int32) > idx[:, :-1].to(torch.int32)).all())
    if lo < 0 or hi >= limit or not ascending:
        what = "column" if kind == "rows" else "block"
        raise ValueError(f"a {kind} mask's {what} ids must ascend strictly within each row and lie in [0, {limit}); "
                         f"got ids in [{lo}, {hi}]" + ("" if ascending else " with a repeated or descending id"))


@dataclass(frozen=True, eq=False)
class ParamMask:
    """The mask of one parameter (see the module docstring for the formats)."""

    kind: str
    shape: tuple[int, ...]
    index: torch.Tensor
    block: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"mask kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        rows, ncols = self.matrix
        idx = self.index
        if self.kind == "bits":
            if idx.dtype != torch.uint8 or idx.ndim != 1 or idx.numel() != -(-self.numel // 8):
                raise ValueError(f"a bits mask of {self.numel} elements needs uint8 [{-(-self.numel // 8)}], "
                                 f"got {idx.dtype} {tuple(idx.shape)}")
        else:
            if idx.dtype not in (torch.int16, torch.int32) or idx.ndim != 2 or idx.shape[0] != rows:
                raise ValueError(f"a {self.kind} mask needs an int16/int32 index [rows={rows}, k], got "
                                 f"{idx.dtype} {tuple(idx.shape)}")
            if isinstance(self.block, bool) or not isinstance(self.block, int):
                raise ValueError(f"block must be an int, got {self.block!r}")
            if self.kind == "blocks" and self.block < MIN_BLOCK:
                raise ValueError(f"block masks need block >= {MIN_BLOCK} columns, got {self.block}")
            if self.kind == "rows" and self.block != 1:
                raise ValueError("a rows mask has block 1")
            _check_ascending_ids(idx, ncols if self.kind == "rows" else -(-ncols // self.block), self.kind)
        if not idx.is_contiguous():
            object.__setattr__(self, "index", idx.contiguous())

    # -- geometry
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix(self) -> tuple[int, int]:
        return matrix_shape(self.shape)

    @property
    def ncols(self) -> int:
        return self.matrix[1]

    @property
    def k(self) -> int:
        """Entries per row (columns or blocks); 0 for bits masks."""
        return 0 if self.kind == "bits" else int(self.index.shape[1])

    @property
    def count(self) -> int:
        """Number of masked elements."""
        if self.kind == "rows":
            return self.index.numel()
        if self.kind == "blocks":
            starts = self.index.to(torch.int64) * self.block
            return int((self.ncols - starts).clamp(max=self.block).sum())
        return int(_popcount(self.index).sum())

    @property
    def ratio(self) -> float:
        return self.count / self.numel if self.numel else 0.0

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size()

    @property
    def device(self) -> torch.device:
        return self.index.device

    def to(self, device) -> "ParamMask":
        return ParamMask(self.kind, self.shape, self.index.to(device), self.block)

    # -- expansions (tests, debugging, importance code; never in the hot path)
    def local_indices(self) -> torch.Tensor:
        """int64 flat indices r * ncols + c of the masked elements, ascending."""
        rows, ncols = self.matrix
        dev = self.index.device
        if self.kind == "rows":
            r = torch.arange(rows, dtype=torch.int64, device=dev)[:, None]
            return (r * ncols + self.index.to(torch.int64)).reshape(-1)
        if self.kind == "blocks":
            r = torch.arange(rows, dtype=torch.int64, device=dev)[:, None, None]
            cols = self.index.to(torch.int64)[:, :, None] * self.block + torch.arange(self.block, device=dev)
            j = (r * ncols + cols).reshape(-1)
            return j[(cols < ncols).expand(rows, -1, -1).reshape(-1)]
        return unpack_bits(self.index, self.numel).nonzero().reshape(-1)

    def dense(self) -> torch.Tensor:
        """bool tensor of the parameter's shape (for tests and inspection only)."""
        out = torch.zeros(self.numel, dtype=torch.bool, device=self.index.device)
        out[self.local_indices()] = True
        return out.view(self.shape)

    def fingerprint(self) -> str:
        """'kind|shape|block|count|blake2b-64 of the index bytes' (device independent)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(self.index.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        shape = "x".join(str(s) for s in self.shape)
        return f"{self.kind}|{shape}|{self.block}|{self.count}|{h.hexdigest()}"


# ----------------------------------------------------------------------------- bits
_POP = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _popcount(bytes_: torch.Tensor) -> torch.Tensor:
    return _POP.to(bytes_.device)[bytes_.to(torch.int64)]


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """bool [n] -> uint8 [ceil(n / 8)], element e in bit (e & 7) of byte e >> 3."""
    flat = flags.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32, device=flat.device)).to(torch.uint8)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [ceil(n / 8)] -> bool [n]."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32)[:, None] >> shifts) & 1
    return bits.reshape(-1)[:n].bool()


# ----------------------------------------------------------------------------- constructors
def from_dense(flags: torch.Tensor) -> ParamMask:
    """A bits mask from a bool tensor (arbitrary masks)."""
    return ParamMask("bits", tuple(flags.shape), pack_bits(flags.bool()))


def rows_from_columns(shape, cols: torch.Tensor) -> ParamMask:
    """A rows mask from per-row column ids [rows, k] (any integer dtype; sorted here)."""
    rows, ncols = matrix_shape(shape)
    cols = torch.as_tensor(cols).reshape(rows, -1).to(torch.int64)
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= ncols):
        raise ValueError(f"column ids must lie in [0, {ncols})")
    cols = torch.sort(cols, dim=1).values
    if cols.shape[1] > 1 and bool((cols[:, 1:] == cols[:, :-1]).any()):
        raise ValueError("a row lists a column twice")
    return ParamMask("rows", tuple(shape), cols.to(index_dtype(ncols)).contiguous())


# ----------------------------------------------------------------------------- files (no pickle)
def save_masks(masks: Mapping[str, ParamMask], path: str | os.PathLike) -> None:
    """safetensors file: one tensor per parameter (its index), formats in the metadata."""
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise ImportError("saving masks needs safetensors: pip install safetensors") from e

    meta = {name: {"kind": m.kind, "shape": list(m.shape), "block": m.block} for name, m in masks.items()}
    tensors = {name: m.index.detach().cpu().contiguous() for name, m in masks.items()}
    save_file(tensors, os.fspath(path), metadata={"format": FORMAT, "masks": json.dumps(meta, sort_keys=True)})


def load_masks(path: str | os.PathLike, device="cpu") -> dict[str, ParamMask]:
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError("loading masks needs safetensors: pip install safetensors") from e

    out = {}
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a zokernels masks file")
        info = json.loads(meta["masks"])
        for name, m in info.items():
            out[name] = ParamMask(m["kind"], tuple(m["shape"]), f.get_tensor(name).to(device), int(m["block"]))
    return out


# ----------------------------------------------------------------------------- optimizer glue
def masks_fingerprint(named_masks: Iterable[tuple[str, ParamMask]]) -> dict:
    """{"digest": blake2b of all entries, "params": {canonical name: mask fingerprint}} ({} if none)."""
    entries = {C.canonical_name(n): m.fingerprint() for n, m in named_masks}
    if not entries:
        return {}
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(entries):
        h.update(f"{name}={entries[name]};".encode("utf-8"))
    return {"digest": h.hexdigest(), "params": entries}


def resolve_masks(masks, names: list[str], tensors: list[torch.Tensor]) -> list[ParamMask | None]:
    """One mask (or None: trained densely) per tensor, from {name or tensor: ParamMask}. Names match
    exactly or after canonical_name(); every mask must match a tensor, and its shape and device."""
    out: list[ParamMask | None] = [None] * len(tensors)
    if not masks:
        return out
    by_name = {}
    for i, n in enumerate(names):
        by_name.setdefault(n, i)
        by_name.setdefault(C.canonical_name(n), i)
    by_id = {id(t): i for i, t in enumerate(tensors)}
    for k, m in dict(masks).items():
        if not isinstance(m, ParamMask):
            raise TypeError(f"mask for {k!r} is a {type(m).__name__}, not a zokernels.mazo.ParamMask")
        if isinstance(k, torch.Tensor):
            i = by_id.get(id(k))
        else:
            i = by_name.get(k, by_name.get(C.canonical_name(str(k))))
        if i is None:
            raise ValueError(f"mask {k if isinstance(k, str) else tuple(k.shape)} matches no trained parameter "
                             "(frozen parameters, requires_grad=False, are not trained)")
        t = tensors[i]
        if tuple(t.shape) != m.shape:
            raise ValueError(f"mask for {names[i]} has shape {m.shape}, the parameter {tuple(t.shape)}")
        if m.device != t.device:
            m = m.to(t.device)
        out[i] = m
    return out
