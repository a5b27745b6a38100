"""The perturbation contract (docs/perturbation.md), as constants and host-side helpers.

Every backend implements the same mapping; this module holds what they share and is the
single place where the contract's numbers live.

    z(s, stream, q, k, j):
        b      = j >> 2, lane = j & 3
        key    = (lo32(s), hi32(s))
        ctr    = (lo32(b), hi32(b) | q << 16 | stream << 28, lo32(k), hi32(k))
        R      = Philox4x32-10(ctr, key)
        u(r)   = ((r >> 9) * 2 + 1) * 2^-24            # exact float32 in (0, 1)
        gauss  : (R0, R1) -> r = sqrt(-2 ln u(R0)), t = 2pi * u(R1); z0 = r cos t, z1 = r sin t
                 (R2, R3) -> z2, z3 likewise;  z = z_lane
        radem  : z = 1 - 2 * (R_lane >> 31)
        sr-unif: v = (R_lane >> 8) * 2^-24               # exact float32 in [0, 1)
"""
from __future__ import annotations

import hashlib
import math
import struct

CONTRACT_VERSION = 1

# Philox4x32-10 constants (Salmon et al., SC'11; Random123).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF

# Field widths inside counter word C1 (see module docstring).
MAX_ELEMENT_INDEX = 1 << 50  # j < 2^50: hi32(j >> 2) < 2^16
MAX_QUERIES = 1 << 12        # q < 4096
MAX_STREAMS = 1 << 4         # stream < 16

# Streams. Two draws never share a Philox block unless stream, q, s, k and j >> 2 all match.
STREAM_Z = 0                 # probe direction z of query q
STREAM_PROBE_SR_POS = 1      # stochastic rounding of W + eps z (query q)
STREAM_PROBE_SR_NEG = 2      # stochastic rounding of W - eps z (query q)
STREAM_UPDATE_SR = 3         # stochastic rounding of the update (q = 0)
STREAM_QUANT_SR = 4          # stochastic rounding when quantizing weights (QuZO)
STREAM_QUZO_PROBE = 5        # QuZO Q1(u): rounding of the probe direction
STREAM_QUZO_UPDATE = 6       # QuZO Q2(u): independent rounding for the update
STREAM_ACT_SR = 7            # activation stochastic rounding (shared by both probes of a query)

DISTS = ("gaussian", "rademacher")
ROUNDINGS = ("nearest", "stochastic")

# Float32 constants used bit-exactly by every backend.
TWO_POW_M24 = 5.9604644775390625e-08     # 2^-24, exact in float32
TWO_PI_F32 = 6.2831854820251465          # float32(2*pi)
FLOAT32_MAX = 3.4028234663852886e38      # largest finite float32: scalars the kernels take must stay below

# Quantized weights (docs/perturbation.md section 4; zokernels.quant): symmetric grids.
QUANT_FORMATS = ("int8", "int4", "fp8")
E4M3_MAX = 448.0                         # largest finite float8_e4m3fn
QMAX = {"int8": 127, "int4": 7, "fp8": E4M3_MAX}
SR_CLAMP = 2.0 ** 30                     # |x| bound before stochastic rounding to int32

_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module",
                               "_forward_module"})
_LEADING_SEGMENTS = frozenset({"module"})


def canonical_name(name: str) -> str:
    """Strip wrapper path segments (torch.compile, DDP, FSDP1, checkpoint wrappers) from a name."""
    parts = name.split(".")
    while parts and parts[0] in _LEADING_SEGMENTS and len(parts) > 1:
        parts = parts[1:]
    parts = [p for p in parts if p not in _WRAPPER_SEGMENTS]
    return ".".join(parts)


def param_key(name: str) -> int:
    """Stable 64-bit key of a parameter: BLAKE2b-64 (little-endian) of its canonical name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"param_key needs a non-empty parameter name, got {name!r}")
    digest = hashlib.blake2b(canonical_name(name).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def check_u64(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np  # numpy integers are fine
            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except (ImportError, TypeError):
            raise TypeError(f"{what} must be an int in [0, 2^64), got {type(value).__name__}") from None
    if not 0 <= value <= MASK64:
        raise ValueError(f"{what} must be in [0, 2^64), got {value}")
    return value


def check_query(query: int) -> int:
    if isinstance(query, bool) or not isinstance(query, int) or not 0 <= query < MAX_QUERIES:
        raise ValueError(f"query must be an int in [0, {MAX_QUERIES}), got {query!r}")
    return query


def check_stream(stream: int) -> int:
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < MAX_STREAMS:
        raise ValueError(f"stream must be an int in [0, {MAX_STREAMS}), got {stream!r}")
    return stream


def check_range(offset: int, numel: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if offset + numel > MAX_ELEMENT_INDEX:
        raise ValueError(f"element indices must stay below 2^50; offset {offset} + numel {numel} does not")
    return offset


def check_dist(dist: str) -> str:
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")
    return dist


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def matrix_shape(shape) -> tuple[int, int]:
    """(rows, ncols) of the matrix view of a tensor of this shape (masks address element j = row * ncols + col):
    rows = shape[0], ncols = numel / shape[0]; a 0-d or 1-d tensor is one row."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if len(shape) <= 1 or shape[0] == 0:
        return 1, numel
    return shape[0], numel // shape[0]


def round_f32(x: float) -> float:
    """x rounded to the nearest float32 (how every kernel sees a scalar argument)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def philox_key(seed: int) -> tuple[int, int]:
    return seed & MASK32, (seed >> 32) & MASK32


def philox_counter(block: int, query: int, stream: int, key: int) -> tuple[int, int, int, int]:
    return (block & MASK32, ((block >> 32) & 0xFFFF) | (query << 16) | (stream << 28),
            key & MASK32, (key >> 32) & MASK32)


def philox4x32_py(counter: tuple[int, int, int, int], key: tuple[int, int],
                  rounds: int = PHILOX_ROUNDS) -> tuple[int, int, int, int]:
    """Scalar Philox4x32 in plain Python integers: the executable statement of the contract."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        p0 = PHILOX_M0 * c0
        p1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32)
    return c0, c1, c2, c3


def splitmix64(x: int) -> int:
    """SplitMix64 finalizer (Steele et al. 2014): a bijection on 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def step_seed(base_seed: int, step: int) -> int:
    """Seed of optimizer step t: splitmix64(base_seed + t * golden) — distinct for distinct t."""
    return splitmix64((base_seed + step * 0x9E3779B97F4A7C15) & MASK64)

