"""QuZO quantized-weight ops of the CUDA backend (csrc/zo_quant.cuh, zokernels/backends/cuda/quant.py).

CPU part: the backend called with CPU tensors runs the kernel's element code on the host (host_quant), and
is checked against the reference backend (zokernels/backends/reference/quant.py):
  * e4m3 round-to-nearest equals torch's float8_e4m3fn cast, and e4m3 SR equals numerics.sr_to_e4m3,
    bitwise, over random floats of every magnitude;
  * quantize (int8, int4 with K not a multiple of the group and odd K, fp8; nearest and SR; three input
    dtypes) is bitwise equal (no z involved);
  * probe and update are bitwise equal (storage, probe outputs of every kind, saturation counts) with
    Rademacher z, and with Gaussian z once the reference draws the same z as the CUDA code (its z_range
    patched to the host twin's: Gaussian z of two math libraries differ by <= 1 ulp, which can flip a
    rounding); unpatched, Gaussian results are nearly all bitwise and at most one grid step apart.
GPU part (@pytest.mark.gpu): the device kernel against the reference backend, and 'auto' picking it.
"""
from __future__ import annotations

import os
import types

import pytest
import torch

from zokernels import contract as C
from zokernels import numerics as QR
from zokernels.backends import registry
from zokernels.backends.reference import quant as ref_backend
from zokernels.quant import formats as F
from zokernels.quant import ops as QO

RQ = ref_backend


@pytest.fixture(scope="module")
def backend(cuda_host_backend):
    """The CUDA backend's quant kernels (zokernels/backends/cuda/quant.py)."""
    from zokernels.backends.cuda import quant
    return quant


@pytest.fixture
def same_z(backend, monkeypatch):
    """The reference's quant math drawing the CUDA host twin's z (fill_perturbation on the CPU)."""
    def z_range(offset, n, seed, key, query, stream, dist, device):
        out = torch.empty(n, dtype=torch.float32)
        backend._ext.host_perturbation(out.data_ptr(), n, seed, key, query, stream, {"gaussian": 0, "rademacher": 1}[dist],
                                       offset)
        return out.to(device)
    monkeypatch.setattr(RQ, "z_range", z_range)


# ----------------------------------------------------------------------------- e4m3 grid
def _random_floats(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mags = torch.exp2(torch.rand(n, generator=g) * 40 - 30)  # 2^-30 .. 2^10
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    edges = torch.tensor([0.0, -0.0, 448.0, -448.0, 464.0, 479.99, 480.0, 1e9, float("inf"), -float("inf"),
                          2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -6, 2.0 ** -6 - 2.0 ** -12, 1.0625, 1.1875])
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    grid = grid[~torch.isnan(grid)]
    return torch.cat([mags * signs, edges, grid, grid + 2.0 ** -12])


def test_e4m3_round_nearest_is_torch_cast(backend):
    x = _random_floats(100003, 1)
    x = torch.clamp(x, -448.0, 448.0)  # the reference always clamps before the cast
    x = torch.cat([x, torch.tensor([float("nan"), -float("nan")])])
    out = torch.empty(x.shape, dtype=torch.uint8)
    backend._ext.host_e4m3(x.data_ptr(), x.data_ptr(), out.data_ptr(), x.numel(), False)
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(out[:-2], want[:-2])
    assert bool(torch.isnan(out[-2:].view(torch.float8_e4m3fn).float()).all())


def test_e4m3_stochastic_rounding_is_reference(backend):
    x = _random_floats(100003, 2)
    x = torch.cat([x, torch.tensor([float("nan"), -float("nan")])])
    v = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    v[:1000] = 0.0
    out = torch.empty(x.shape, dtype=torch.uint8)
    backend._ext.host_e4m3(x.data_ptr(), v.data_ptr(), out.data_ptr(), x.numel(), True)
    want = QR.sr_to_e4m3(x, v).view(torch.uint8)
    assert torch.equal(out, want)


# ----------------------------------------------------------------------------- weights
SHAPES = {"int8": (37, 203), "int4": (19, 203), "fp8": (23, 131)}  # odd K; int4: K = 203, group 32 -> Kp 224
GROUP = 32


def _weight(fmt: str, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n, k = SHAPES[fmt]
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    w[0, :5] = 0.0
    if fmt == "int4":
        w[1, :GROUP] = 0.0  # an all-zero group: scale 1
    return w.to(dtype)


def _storage(fmt: str, n: int, k: int) -> torch.Tensor:
    if fmt == "int4":
        kp = -(-k // GROUP) * GROUP
        return torch.full((n, kp // 2), 0x5A, dtype=torch.uint8)  # garbage: every byte must be written
    return torch.full((n, k), 0x5A, dtype=torch.uint8).view(torch.int8 if fmt == "int8" else torch.float8_e4m3fn)


def _qweight(fmt: str, seed: int) -> F.QuantizedWeight:
    w = _weight(fmt, seed)
    group = GROUP if fmt == "int4" else 0
    scale = F.compute_scale(w, fmt, GROUP).contiguous()
    q = _storage(fmt, *w.shape)
    ref_backend.quant_quantize(w, scale, fmt, group, "stochastic", 5, 6, q)
    return F.QuantizedWeight(fmt, q, scale, tuple(w.shape), group)


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("rounding,dtype", [("nearest", torch.float32), ("stochastic", torch.bfloat16),
                                            ("stochastic", torch.float16)])
def test_host_quantize_bitwise(backend, fmt, rounding, dtype):
    w = _weight(fmt, 10, dtype)
    group = GROUP if fmt == "int4" else 0
    scale = F.compute_scale(w, fmt, GROUP).contiguous()
    got, want = _storage(fmt, *w.shape), _storage(fmt, *w.shape)
    seed, key = C.step_seed(1, 2), C.param_key("layers.0.mlp.up_proj.weight")
    backend.quant_quantize(w, scale, fmt, group, rounding, seed, key, got)
    ref_backend.quant_quantize(w, scale, fmt, group, rounding, seed, key, want)
    assert torch.equal(_u8(got), _u8(want))
    if fmt == "int4":
        b = _u8(got)
        assert bool((b[:, 102:] == 0).all()) and bool((b[:, 101] >> 4 == 0).all())  # padding nibbles k >= 203


PROBE_OUTS = [None, torch.float32, torch.bfloat16, torch.float16]


def _probe(impl, qw, out_dtype, seed, key, query, eps, sign, dist):
    if out_dtype == torch.uint8:  # int4 packed like the storage; garbage first: every byte must be written
        out = torch.full(qw.q.shape, 0x5A, dtype=torch.uint8)
    else:
        out = torch.empty(qw.shape, dtype=out_dtype or QO.grid_dtype(qw.fmt))
    sat = torch.zeros(1, dtype=torch.int64)
    impl.quant_probe(qw.q, qw.scale, qw.fmt, qw.shape, qw.group_size, seed, key, query, eps, sign, dist, out, sat)
    return out, int(sat)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_host_probe_bitwise(backend, same_z, fmt, dist):
    qw = _qweight(fmt, 20)
    key = C.param_key("w")
    sats = 0
    for i, out_dtype in enumerate(PROBE_OUTS + ([torch.uint8] if fmt == "int4" else [])):
        for sign in (1, -1):
            eps = 3e-3 if i % 2 else 0.5  # 0.5: tens of grid steps, many clamped elements
            got, gs = _probe(backend, qw, out_dtype, 7, key, 4095 - i, eps, sign, dist)
            want, ws = _probe(ref_backend, qw, out_dtype, 7, key, 4095 - i, eps, sign, dist)
            assert torch.equal(_u8(got), _u8(want)), (out_dtype, sign)
            assert gs == ws
            sats += gs
    assert sats > 0


def _update(impl, qw, seed, key, coeffs, lr, eps, form, dist):
    q = qw.q.clone()
    sat = torch.zeros(1, dtype=torch.int64)
    impl.quant_update_(q, qw.scale, qw.fmt, qw.shape, qw.group_size, seed, key, coeffs, lr, eps, form, dist, sat)
    return q, int(sat)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("form", ["single", "paper"])
def test_host_update_bitwise(backend, same_z, fmt, form):
    qw = _qweight(fmt, 30)
    key = C.param_key("layers.1.w")
    for dist, coeffs, lr in (("gaussian", (0.7, -1.3, 0.25), 1e-3), ("rademacher", (2.5,), 3.0),
                             ("gaussian", (), 1e-2)):
        got, gs = _update(backend, qw, 11, key, coeffs, lr, 1e-3, form, dist)
        want, ws = _update(ref_backend, qw, 11, key, coeffs, lr, 1e-3, form, dist)
        assert torch.equal(_u8(got), _u8(want)), (dist, coeffs)
        assert gs == ws
        if coeffs:
            assert not torch.equal(_u8(got), _u8(qw.q))  # the update moved some weights
    big, sat = _update(backend, qw, 11, key, (50.0,), 1.0, 1e-3, form, "rademacher")
    assert sat > 0 and (sat, big.view(torch.uint8).sum()) == (_update(ref_backend, qw, 11, key, (50.0,), 1.0, 1e-3,
                                                                      form, "rademacher")[1],
                                                              _update(ref_backend, qw, 11, key, (50.0,), 1.0, 1e-3,
                                                                      form, "rademacher")[0].view(torch.uint8).sum())


def test_packed_int4_probe_is_native(backend):
    """probe_weights(out_dtype=uint8) uses the kernel's packed output (no int8 pass and torch pack): this build
    supports the call property out="packed-int4"."""
    impl = registry.implementations("quant_probe")["cuda"]
    assert impl.supports(torch.device("cuda"), {"fmt": "int4", "out": "packed-int4"}) is None
    qw = _qweight("int4", 21)
    packed, _ = _probe(backend, qw, torch.uint8, 3, 4, 5, 0.2, -1, "rademacher")
    grid, _ = _probe(backend, qw, None, 3, 4, 5, 0.2, -1, "rademacher")
    assert packed.shape == qw.q.shape
    assert torch.equal(QR.unpack_int4(packed)[:, :qw.shape[1]], grid)
    assert bool((QR.unpack_int4(packed)[:, qw.shape[1]:] == 0).all())


def test_host_probe_gaussian_unpatched_is_nearly_bitwise(backend):
    """Without the shared z: the libm difference moves a few elements by one grid step at most."""
    qw = _qweight("int8", 40)
    got, gs = _probe(backend, qw, None, 9, 3, 1, 5e-2, 1, "gaussian")
    want, ws = _probe(ref_backend, qw, None, 9, 3, 1, 5e-2, 1, "gaussian")
    diff = (got.to(torch.int32) - want.to(torch.int32)).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).double().mean()) > 0.999
    assert abs(gs - ws) <= int((diff != 0).sum())


def test_quant_ops_through_the_public_api_on_cpu(backend):
    """zokernels.quant.ops with backend='cuda' is refused on CPU tensors (the CUDA backend needs CUDA tensors)."""
    from zokernels.backends.registry import BackendUnavailable
    qw = _qweight("int8", 50)
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):
        QO.probe_weights(qw, 1, 2, 0, 1e-2, 1, backend="cuda")


_STALE = r"""
import json, sys, types
import torch
import zokernels
stale = types.ModuleType('zokernels._cuda')
sys.modules['zokernels._cuda'] = stale
zokernels._cuda = stale
from zokernels import ops
from zokernels.backends import cuda, registry
cuda.unavailable_reason = lambda device: None      # as on a GPU that the stale module supports
dev = torch.device('cuda')
out = {'stale': cuda._ext is stale, 'why': {}, 'errors': {}, 'auto': {}}
for op, call in (('perturb_', {}), ('masked_perturb_', {}), ('quant_quantize', {}), ('quant_probe', {}),
                 ('quant_update_', {})):
    out['why'][op] = registry.why_not(op, 'cuda', dev, call)
    try:
        registry.resolve(op, dev, 'cuda', call)
    except registry.BackendUnavailable as e:
        out['errors'][op] = str(e)
    out['auto'][op] = ops.backend_name(op, dev, 'auto', call)
print(json.dumps(out))
"""


def test_stale_build_names_every_backend_and_the_reason():
    """A zokernels._cuda built before the masked / quant kernels (no launch_masked, launch_quant): the CUDA
    backend says per op why it cannot run them, backend='cuda' raises BackendUnavailable naming every backend
    and that reason (no silent fallback), and 'auto' takes the next backend that can run the op."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _STALE], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["stale"] and out["why"]["perturb_"] is None and "perturb_" not in out["errors"]
    assert out["auto"]["perturb_"] == "cuda"
    for op, what in (("masked_perturb_", "masked (MaZO)"), ("quant_quantize", "QuZO quantized-weight"),
                     ("quant_probe", "QuZO quantized-weight"), ("quant_update_", "QuZO quantized-weight")):
        reason = f"this zokernels._cuda build has no {what} kernels"
        assert out["why"][op].startswith(reason), out["why"][op]
        msg = out["errors"][op]
        assert f"{op} cannot run on backend 'cuda'" in msg and reason in msg, msg
        every = msg.split("Every backend: ")[1]
        where = [every.find(f"{name}: ") for name in registry.ORDER]
        assert where[0] == 0 and where == sorted(where), every       # every backend, in ORDER
        assert "torch: torch does not implement" in every and "reference: ok" in every, every
        assert out["auto"][op] != "cuda"


def test_stale_build_without_packed_probe_output():
    """A build with the quant kernels but without the packed int4 probe output refuses exactly the calls that ask
    for it (call property out="packed-int4"), with the reason."""
    supports = registry.implementations("quant_probe")["cuda"].supports
    ext = types.SimpleNamespace(launch_quant=object())    # no QUANT_OUT_PACKED
    dev = torch.device("cuda")
    import zokernels.backends.cuda as cuda_pkg

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_pkg, "_ext", ext)   # the module the kernels' supports() read
        assert supports(dev, {"fmt": "int4", "out": "grid"}) is None
        reason = supports(dev, {"fmt": "int4", "out": "packed-int4"})
    assert reason is not None and "packed int4 probe output" in reason


# ----------------------------------------------------------------------------- GPU
def _to_cuda(qw: F.QuantizedWeight) -> F.QuantizedWeight:
    return F.QuantizedWeight(qw.fmt, qw.q.cuda(), qw.scale.cuda(), qw.shape, qw.group_size)


def _assert_gpu_close(got: torch.Tensor, want: torch.Tensor, dist: str):
    if dist == "rademacher":
        assert torch.equal(_u8(got).cpu(), _u8(want).cpu())
    else:  # torch's CUDA log/sin/cos vs the kernel's: nearly all bitwise
        assert float((_u8(got) == _u8(want)).double().mean()) > 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_gpu_quant_ops_match_reference(fmt, cuda_gpu_backend):
    cuda = cuda_gpu_backend
    assert QO.quant_backend(torch.device("cuda")) == "cuda"
    w = _weight(fmt, 60).cuda()
    for rounding in ("nearest", "stochastic"):
        a = F.quantize_weight(w, fmt, rounding=rounding, seed=3, key=4, group_size=GROUP, backend="cuda")
        b = F.quantize_weight(w, fmt, rounding=rounding, seed=3, key=4, group_size=GROUP, backend="reference")
        assert torch.equal(_u8(a.q).cpu(), _u8(b.q).cpu())
    qw = _to_cuda(_qweight(fmt, 61))
    for dist in ("rademacher", "gaussian"):
        for out_dtype in PROBE_OUTS + ([torch.uint8] if fmt == "int4" else []):
            sat_c, sat_r = QO.new_counter("cuda"), QO.new_counter("cuda")
            got = QO.probe_weights(qw, 5, 6, 7, 0.3, -1, dist, out_dtype=out_dtype, saturated=sat_c, backend="cuda")
            want = QO.probe_weights(qw, 5, 6, 7, 0.3, -1, dist, out_dtype=out_dtype, saturated=sat_r,
                                    backend="reference")
            _assert_gpu_close(got, want, dist)
            if dist == "rademacher":
                assert int(sat_c) == int(sat_r)
        for form in ("single", "paper"):
            a = F.QuantizedWeight(qw.fmt, qw.q.clone(), qw.scale, qw.shape, qw.group_size)
            b = F.QuantizedWeight(qw.fmt, qw.q.clone(), qw.scale, qw.shape, qw.group_size)
            sa = QO.update_(a, 8, 9, (0.5, -1.5, 2.0), 1e-2, 1e-3, form, dist, backend="cuda")
            sb = QO.update_(b, 8, 9, (0.5, -1.5, 2.0), 1e-2, 1e-3, form, dist, backend="reference")
            _assert_gpu_close(a.q, b.q, dist)
            if dist == "rademacher":
                assert int(sa) == int(sb)


@pytest.mark.gpu
def test_gpu_quant_large_weight_counts_saturation(cuda_gpu_backend):
    """A weight over many CUDA blocks: the per-warp atomic sums equal the reference count."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(1031, 2053, generator=g).cuda()
    qw = F.quantize_weight(w, "int8", group_size=GROUP, backend="cuda")
    sat_c, sat_r = QO.new_counter("cuda"), QO.new_counter("cuda")
    got = QO.probe_weights(qw, 1, 2, 3, 1.0, 1, "rademacher", saturated=sat_c, backend="cuda")
    want = QO.probe_weights(qw, 1, 2, 3, 1.0, 1, "rademacher", saturated=sat_r, backend="reference")
    assert torch.equal(got, want) and int(sat_c) == int(sat_r) > 0
