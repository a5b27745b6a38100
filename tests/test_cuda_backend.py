"""The CUDA backend (zokernels._cuda, csrc/).

CPU part: the extension's host twins run the very element code the kernels run (csrc/zo_block.cuh), and
are checked bitwise against the reference backend (integers, uniforms, rounding) or within float32
round-off (Gaussian z, whose log/sin/cos come from different math libraries).
GPU part (@pytest.mark.gpu): the multi-tensor kernels against the reference backend on the same GPU.

If zokernels._cuda is not built these tests skip, except with ZOKERNELS_REQUIRE_CUDA=1 (CI), where they
fail. Build it in place with: python setup.py build_ext --inplace
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

from zokernels import contract as C
from zokernels import ops
# the reference package's philox() function shadows its philox submodule as an attribute
P = importlib.import_module("zokernels.backends.reference.philox")

ODD = 278011
BIG_OFFSET = (1 << 32) + 4 * 12345 + 3  # >= 2^32, offset % 4 == 3
TAG = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DIST = {"gaussian": 0, "rademacher": 1}
Z_ATOL = 1e-5


def _require() -> bool:
    return os.environ.get("ZOKERNELS_REQUIRE_CUDA", "0") not in ("", "0")


@pytest.fixture(scope="module")
def ext(cuda_host_backend):
    return cuda_host_backend._ext   # zokernels._cuda (the fixture skips / fails when it is not built)


def test_backend_import_never_fails_and_explains():
    from zokernels.backends import cuda as backend

    assert backend.NAME == "cuda"
    reason = backend.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "CUDA tensors" in reason
    if not torch.cuda.is_available():
        assert backend.unavailable_reason(torch.device("cuda", 0)) is not None


def test_module_built_when_required():
    if not _require():
        pytest.skip("ZOKERNELS_REQUIRE_CUDA is not set")
    import zokernels._cuda  # noqa: F401 — must import in CI


# ----------------------------------------------------------------------------- Philox
KATS = [  # Random123 known answers for Philox4x32-10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _host_philox(ext, counters: torch.Tensor, key) -> torch.Tensor:
    c = counters.to(torch.int64).to(torch.int32).contiguous()
    out = torch.empty_like(c)
    ext.host_philox(c.data_ptr(), c.shape[0], key[0], key[1], out.data_ptr())
    return out.to(torch.int64) & C.MASK32


@pytest.mark.parametrize("ctr,key,expected", KATS)
def test_philox_known_answers(ext, ctr, key, expected):
    got = _host_philox(ext, torch.tensor([ctr], dtype=torch.int64), key)
    assert tuple(got[0].tolist()) == expected


def test_philox_integers_match_reference(ext):
    g = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 1 << 32, (4099, 4), generator=g, dtype=torch.int64)
    key = (0x9E3779B9, 0x01234567)
    assert torch.equal(_host_philox(ext, counters, key), ops.philox4x32(counters, key, backend="reference"))
    from zokernels.backends import cuda as backend
    assert torch.equal(backend.philox(counters, key), ops.philox4x32(counters, key, backend="reference"))


# ----------------------------------------------------------------------------- uniforms and z


@pytest.mark.parametrize("offset,query,stream", [(1, 0, C.STREAM_UPDATE_SR), (BIG_OFFSET, 4095, 15)])
def test_uniforms_bitwise(ext, offset, query, stream):
    seed, key = 0xDEADBEEF12345678, C.param_key("model.layers.0.mlp.up_proj.weight")
    out = torch.empty(ODD, dtype=torch.float32)
    ext.host_uniform(out.data_ptr(), ODD, seed, key, query, stream, offset)
    ref = P.uniform_range(offset, ODD, seed, key, query, stream, torch.device("cpu"))
    assert torch.equal(out, ref)
    assert float(out.min()) >= 0.0 and float(out.max()) < 1.0


@pytest.mark.parametrize("offset,dist", [(2, "gaussian"), (BIG_OFFSET, "gaussian"), (BIG_OFFSET, "rademacher")])
def test_perturbation_matches_reference(ext, offset, dist):
    seed, key, query, stream = 0x0123456789ABCDEF, C.param_key("lm_head.weight"), 17, C.STREAM_Z
    out = torch.empty(ODD, dtype=torch.float32)
    ext.host_perturbation(out.data_ptr(), ODD, seed, key, query, stream, DIST[dist], offset)
    ref = P.z_range(offset, ODD, seed, key, query, stream, dist, torch.device("cpu"))
    if dist == "rademacher":
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=0, atol=Z_ATOL)
        assert (out == ref).double().mean() > 0.5  # same lanes, same formula: mostly bitwise
        assert abs(float(out.double().mean())) < 0.01 and abs(float(out.double().std()) - 1) < 0.01


def test_perturbation_offset_shift_is_consistent(ext):
    """Element j is the same whatever range contains it (offset not a multiple of 4)."""
    seed, key = 5, 6
    whole = torch.empty(1037, dtype=torch.float32)
    part = torch.empty(1000, dtype=torch.float32)
    ext.host_perturbation(whole.data_ptr(), 1037, seed, key, 0, 0, 0, BIG_OFFSET)
    ext.host_perturbation(part.data_ptr(), 1000, seed, key, 0, 0, 0, BIG_OFFSET + 37)
    assert torch.equal(whole[37:], part)


# ----------------------------------------------------------------------------- rounding
def _random_floats(n: int, seed: int) -> torch.Tensor:
    """Random float32 bit patterns over all exponents (no NaN), plus hand-picked edge values."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(1 << 31), 1 << 31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = torch.where(torch.isnan(x), torch.ones_like(x), x)
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.99, 65520.0, -65536.0,
                          6.0e-8, 2.9802322e-08, 2.98e-8, 1e-40, 3.3895314e38, 3.4e38, -1.0, 1.0 + 2**-9],
                         dtype=torch.float32)
    scaled = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 6)
    return torch.cat([x, edges, scaled])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_nearest_bitwise_vs_torch(ext, dtype):
    x = _random_floats(50001, 2)
    out = torch.empty(x.shape, dtype=dtype)
    ext.host_round_nearest(x.data_ptr(), out.data_ptr(), x.numel(), TAG[dtype])
    assert torch.equal(out.view(torch.int16), x.to(dtype).view(torch.int16))


@pytest.mark.parametrize("dtype,offset", [(torch.bfloat16, BIG_OFFSET), (torch.float16, 0)])
def test_stochastic_round_bitwise(ext, dtype, offset):
    x = _random_floats(100003, 3)
    n = x.numel()
    seed, key, query, stream = 77, C.param_key("w"), 9, C.STREAM_QUANT_SR
    out = torch.empty(x.shape, dtype=dtype)
    ext.host_stochastic_round(x.data_ptr(), out.data_ptr(), n, TAG[dtype], seed, key, query, stream, offset)
    ref = ops.stochastic_round(x, dtype, seed, key, query, offset, stream=stream, backend="reference")
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_keeps_nan_and_is_unbiased(ext, dtype):
    n, target = 200000, 1.0 + 2**-12
    x = torch.tensor([float("nan"), -float("nan")] + [target] * n, dtype=torch.float32)
    out = torch.empty(x.shape, dtype=dtype)
    ext.host_stochastic_round(x.data_ptr(), out.data_ptr(), x.numel(), TAG[dtype], 1, 2, 0, 3, 0)
    assert torch.isnan(out[:2].float()).all()
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    p = (target - 1.0) / ulp  # P(round up)
    mean = out[2:].double().mean().item()
    assert abs(mean - target) < 6 * ulp * (p * (1 - p) / n) ** 0.5, mean  # E[SR(x)] = x


# ----------------------------------------------------------------------------- perturb / update on one tensor
def _theta(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.05).to(dtype)


def _assert_16bit_close(got: torch.Tensor, ref: torch.Tensor):
    """Nearly all elements bitwise; the rest one unit in the last place away (Box-Muller round-off)."""
    a, b = got.view(torch.int16).to(torch.int32), ref.view(torch.int16).to(torch.int32)
    diff = (a - b).abs()
    assert int(diff.max()) <= 1, f"max bit distance {int(diff.max())}"
    assert float((diff == 0).double().mean()) > 0.999


def _check(got: torch.Tensor, ref: torch.Tensor):
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
        assert float((got == ref).double().mean()) > 0.5
    else:
        _assert_16bit_close(got, ref)


CASES = [(torch.float32, "nearest", "gaussian"), (torch.bfloat16, "nearest", "gaussian"),
         (torch.bfloat16, "stochastic", "gaussian"), (torch.float16, "nearest", "rademacher"),
         (torch.float16, "stochastic", "gaussian"), (torch.bfloat16, "stochastic", "rademacher")]


# Offsets alternate between offset % 4 == 3 (scalar element path) and 4-aligned (vector loads/stores).
HOST_CASES = [(*case, BIG_OFFSET if i % 2 else BIG_OFFSET - 3) for i, case in enumerate(CASES)]


@pytest.mark.parametrize("dtype,rounding,dist,offset", HOST_CASES)
def test_host_perturb_matches_reference(ext, dtype, rounding, dist, offset):
    theta = _theta(ODD, dtype, 4)
    seed, key, scale, query = C.step_seed(42, 3), C.param_key("layers.3.w"), 1e-3, 5
    out = torch.empty_like(theta)
    ext.host_perturb(theta.data_ptr(), out.data_ptr(), ODD, TAG[dtype], seed, key, offset, scale, query,
                     DIST[dist], rounding == "stochastic", C.STREAM_PROBE_SR_NEG)
    ref = theta.clone()
    ops.perturb_(ref, seed, scale, key, query=query, dist=dist, offsets=[offset], rounding=rounding,
                 sr_stream=C.STREAM_PROBE_SR_NEG, backend="reference")
    _check(out, ref)
    if dtype != torch.float32:
        assert not torch.equal(out, theta)  # the probe moved the weights


@pytest.mark.parametrize("restore", [None, -2e-3])
@pytest.mark.parametrize("dtype,rounding,dist,offset", HOST_CASES)
def test_host_zo_update_matches_reference(ext, dtype, rounding, dist, offset, restore):
    n = 40013  # three queries: kept smaller than ODD for the CPU reference's sake
    theta = _theta(n, dtype, 5)
    seed, key = C.step_seed(7, 11), C.param_key("layers.5.attn.q_proj.weight")
    coeffs, lr, wd = (0.7, -1.3, 0.25), 1e-2, 0.1
    got = theta.clone()
    ext.host_zo_update(got.data_ptr(), n, TAG[dtype], seed, key, offset, list(coeffs), lr, wd, DIST[dist],
                       rounding == "stochastic", C.STREAM_UPDATE_SR, restore, 2)
    ref = theta.clone()
    ops.zo_update_(ref, seed, key, coeffs, lr, wd, dist=dist, offsets=[offset], rounding=rounding,
                   restore_scale=restore, restore_query=2, backend="reference")
    _check(got, ref)


def test_host_zo_update_without_queries_is_weight_decay_only(ext):
    theta = _theta(1037, torch.float32, 6)
    got = theta.clone()
    ext.host_zo_update(got.data_ptr(), 1037, 0, 1, 2, 3, [], 0.5, 0.1, 0, False, 3, None, 0)
    assert torch.equal(got, theta - (theta * 0.1) * 0.5)


# ----------------------------------------------------------------------------- the kernels' grid on the host
# zokernels.backends.cuda called with CPU tensors runs launch()'s chunk -> (tensor, Philox blocks) mapping on
# the host (host_launch): the multi-tensor tables, chunking, offsets and tails, without a GPU.
GRID_SIZES = [20011, 1037, 1, 4099, 3]  # 20011 spans three 8192-element chunks
GRID_OFFSETS = [BIG_OFFSET, 5, (1 << 40) + 1, 0, (1 << 49) + 2]


def _grid_group(dtype, seed, lrs=None, wds=None):
    from zokernels.backends._common import Group

    tensors = [_theta(n, dtype, seed + i) for i, n in enumerate(GRID_SIZES)]
    keys = [C.param_key(f"g{i}") for i in range(len(tensors))]
    return Group(tensors, keys, list(GRID_OFFSETS), lrs or [], wds or [])


@pytest.mark.parametrize("dtype,rounding,dist", CASES)
def test_host_grid_perturb_copy_update(ext, dtype, rounding, dist):
    from zokernels.backends import cuda as backend
    from zokernels.backends._common import UpdateSpec

    g = _grid_group(dtype, 40)
    kw = dict(query=3, dist=dist, offsets=GRID_OFFSETS, rounding=rounding, sr_stream=C.STREAM_PROBE_SR_POS)
    ref = [t.clone() for t in g.tensors]
    ops.perturb_(ref, 11, 1e-3, g.keys, backend="reference", **kw)
    outs = [torch.empty_like(t) for t in g.tensors]
    backend.perturbed_copy(g, outs, 11, 1e-3, 3, dist, rounding, C.STREAM_PROBE_SR_POS)
    before = backend.LAUNCHES["perturb_"]
    backend.perturb_(g, 11, 1e-3, 3, dist, rounding, C.STREAM_PROBE_SR_POS)
    assert backend.LAUNCHES["perturb_"] == before + 1
    for got, copy, r in zip(g.tensors, outs, ref):
        _check(got, r)
        assert torch.equal(got, copy)

    lrs, wds = [1e-2, 2e-2, 1e-3, 5e-3, 1.0], [0.0, 0.1, 0.0, 0.01, 0.5]
    g = _grid_group(dtype, 50, lrs, wds)
    ref = [t.clone() for t in g.tensors]
    coeffs = (0.5, -0.25, 2.0)
    ops.zo_update_(ref, 5, g.keys, coeffs, lrs, wds, dist=dist, offsets=GRID_OFFSETS, rounding=rounding,
                   restore_scale=1e-3, restore_query=1, backend="reference")
    backend.zo_update_(g, UpdateSpec(5, coeffs, dist, rounding, C.STREAM_UPDATE_SR, 1e-3, 1))
    for got, r in zip(g.tensors, ref):
        _check(got, r)


def test_host_grid_fills_and_rounding(ext):
    from zokernels.backends import cuda as backend

    n, seed, key = 20011, 3, C.param_key("fill")
    for dist in ("gaussian", "rademacher"):
        z = torch.empty(n)
        backend.fill_perturbation(z, seed, key, 2, C.STREAM_Z, dist, BIG_OFFSET)
        ref = P.z_range(BIG_OFFSET, n, seed, key, 2, C.STREAM_Z, dist, torch.device("cpu"))
        torch.testing.assert_close(z, ref, rtol=0, atol=Z_ATOL)
    v = torch.empty(n)
    backend.fill_uniform(v, seed, key, 2, C.STREAM_ACT_SR, 1)
    assert torch.equal(v, P.uniform_range(1, n, seed, key, 2, C.STREAM_ACT_SR, torch.device("cpu")))
    x = _random_floats(n, 9)
    for dtype in (torch.bfloat16, torch.float16):
        out = torch.empty(x.shape, dtype=dtype)
        backend.stochastic_round(x, out, seed, key, 4, C.STREAM_QUANT_SR, BIG_OFFSET)
        ref = ops.stochastic_round(x, dtype, seed, key, 4, BIG_OFFSET, stream=C.STREAM_QUANT_SR,
                                   backend="reference")
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


# ----------------------------------------------------------------------------- GPU
GPU_SIZES = [ODD, 1037, 1, 4099, 3]
GPU_OFFSETS = [BIG_OFFSET, 5, (1 << 40) + 1, 0, (1 << 49) + 2]


def _gpu_backend():
    from zokernels.backends import cuda as backend

    reason = backend.unavailable_reason(torch.device("cuda"))
    if reason:
        if _require():
            pytest.fail(reason)
        pytest.skip(reason)
    return backend


def _gpu_params(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    return [_theta(n, dtype, seed + i).cuda() for i, n in enumerate(GPU_SIZES)]


@pytest.mark.gpu
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_gpu_fills(dist):
    _gpu_backend()
    seed, key = 123, C.param_key("x")
    for offset in (0, BIG_OFFSET):
        z = ops.perturbation((ODD,), seed, key, 3, dist, offset, device="cuda", backend="cuda")
        ref = ops.perturbation((ODD,), seed, key, 3, dist, offset, device="cuda", backend="reference")
        torch.testing.assert_close(z, ref, rtol=0, atol=Z_ATOL)
        v = ops.uniform((ODD,), seed, key, 3, offset, device="cuda", backend="cuda")
        assert torch.equal(v, ops.uniform((ODD,), seed, key, 3, offset, device="cuda", backend="reference"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_stochastic_round(dtype):
    _gpu_backend()
    x = _random_floats(ODD, 8).cuda()
    got = ops.stochastic_round(x, dtype, 9, 10, 1, BIG_OFFSET, backend="cuda")
    ref = ops.stochastic_round(x, dtype, 9, 10, 1, BIG_OFFSET, backend="reference")
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rounding,dist", CASES)
def test_gpu_perturb_and_copy(dtype, rounding, dist):
    backend = _gpu_backend()
    params = _gpu_params(dtype, 20)
    keys = [C.param_key(f"p{i}") for i in range(len(params))]
    kw = dict(query=4, dist=dist, offsets=GPU_OFFSETS, rounding=rounding)
    ref = [p.clone() for p in params]
    ops.perturb_(ref, 99, 1e-3, keys, backend="reference", **kw)
    copies = ops.perturbed_copy(params, 99, 1e-3, keys, backend="cuda", **kw)
    before = backend.LAUNCHES["perturb_"]
    got = [p.clone() for p in params]
    ops.perturb_(got, 99, 1e-3, keys, backend="cuda", **kw)
    assert backend.LAUNCHES["perturb_"] == before + 1  # one launch for the whole group
    torch.cuda.synchronize()
    for g, c, r in zip(got, copies, ref):
        _check(g.cpu(), r.cpu())
        assert torch.equal(g, c)


@pytest.mark.gpu
@pytest.mark.parametrize("restore", [None, 1e-3])
@pytest.mark.parametrize("dtype,rounding,dist", CASES)
def test_gpu_zo_update(dtype, rounding, dist, restore):
    backend = _gpu_backend()
    params = _gpu_params(dtype, 30)
    keys = [C.param_key(f"p{i}") for i in range(len(params))]
    lrs = [1e-2, 2e-2, 1e-3, 5e-3, 1.0]
    kw = dict(dist=dist, offsets=GPU_OFFSETS, rounding=rounding, restore_scale=restore, restore_query=1)
    ref = [p.clone() for p in params]
    ops.zo_update_(ref, 5, keys, (0.5, -0.25, 2.0), lrs, 0.01, backend="reference", **kw)
    before = backend.LAUNCHES["zo_update_"]
    ops.zo_update_(params, 5, keys, (0.5, -0.25, 2.0), lrs, 0.01, backend="cuda", **kw)
    assert backend.LAUNCHES["zo_update_"] == before + 1
    for g, r in zip(params, ref):
        _check(g.cpu(), r.cpu())


@pytest.mark.gpu
def test_gpu_mixed_dtypes_launch_once_per_group():
    backend = _gpu_backend()
    params = [_theta(1037, torch.bfloat16, 1).cuda(), _theta(999, torch.float32, 2).cuda(),
              _theta(4099, torch.bfloat16, 3).cuda()]
    before = sum(backend.LAUNCHES.values())
    ops.perturb_(params, 1, 1e-3, [1, 2, 3], backend="cuda")
    assert sum(backend.LAUNCHES.values()) == before + 2


@pytest.mark.gpu
def test_gpu_under_compute_sanitizer():
    """memcheck over every op (zokernels/selfcheck.py), when compute-sanitizer is installed."""
    _gpu_backend()
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        pytest.skip("compute-sanitizer is not on PATH")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # one cudaMalloc per tensor: overruns are seen
    run = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-m",
                          "zokernels.selfcheck"], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


def test_host_math_reproduces_the_golden_table(ext):
    import json
    from pathlib import Path

    golden = json.loads((Path(__file__).parent / "data" / "golden_z.json").read_text())
    one = torch.empty(1, dtype=torch.float32)
    for row in golden["rows"]:
        args = (int(row["seed"]), int(row["key"]), row["query"], row["stream"])
        j = int(row["j"])
        ext.host_perturbation(one.data_ptr(), 1, *args, DIST["gaussian"], j)
        assert abs(one.item() - row["gaussian"]) <= 1e-5, row
        ext.host_perturbation(one.data_ptr(), 1, *args, DIST["rademacher"], j)
        assert one.item() == row["rademacher"], row
        ext.host_uniform(one.data_ptr(), 1, *args, j)
        assert one.item() == row["uniform"], row
