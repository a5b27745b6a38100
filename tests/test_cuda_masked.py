"""Masked ops (MaZO) of the CUDA backend (csrc/zo_masked.cuh, zokernels/backends/cuda/masked.py).

CPU part: the backend called with CPU tensors runs the kernels' grid on the host (host_masked_launch: same
table, same chunk -> work item mapping, same element code as the device). Checked on random masks of every
format (rows with int16 and int32 indices, blocks with aligned and unaligned runs, bits) at odd sizes and
offsets, several tensors and formats in one launch:
  * unmasked elements never change, bitwise;
  * masked elements equal the CUDA backend's dense op bitwise (z of (key, j) is the dense z);
  * the whole result equals the reference backend's masked op bitwise once the reference draws the same z
    (its z_at patched to the host twin's dense z), Gaussian included; unpatched, bitwise for Rademacher z and
    within the dense tests' tolerance for Gaussian z (log/sin/cos of two math libraries: <= 1 ulp).
GPU part (@pytest.mark.gpu): the device kernels against the reference backend, and zokernels.ops picking
the CUDA backend for masked ops.
"""
from __future__ import annotations

import pytest
import torch

from zokernels import contract as C
from zokernels import mazo, ops
from zokernels.backends._common import Group, UpdateSpec
from zokernels.mazo.masks import ParamMask, index_dtype, pack_bits


@pytest.fixture(scope="module")
def backend(cuda_host_backend):
    return cuda_host_backend


@pytest.fixture
def cuda_z(backend):
    """A context in which the reference backend's masked ops draw the CUDA host twin's z (the dense z over
    the span of the requested indices): then every result must be bitwise equal, Gaussian included."""
    from zokernels.backends.reference import masked as ref_masked

    def z_at(j, seed, key, query, stream, dist):
        lo, hi = int(j.min()), int(j.max())
        span = torch.empty(hi - lo + 1, dtype=torch.float32)
        backend._ext.host_perturbation(span.data_ptr(), span.numel(), seed, key, query, stream,
                                       {"gaussian": 0, "rademacher": 1}[dist], lo)
        return span[j - lo]

    return pytest.MonkeyPatch.context, ref_masked, z_at


def _reference(cuda_z, fn, *args, **kw):
    """(reference result with the CUDA z, reference result with its own z) of an in-place masked op on
    clones of args[0]."""
    context, ref_masked, z_at = cuda_z
    same, own = [t.clone() for t in args[0]], [t.clone() for t in args[0]]
    with context() as mp:
        mp.setattr(ref_masked, "z_at", z_at)
        fn(same, *args[1:], backend="reference", **kw)
    fn(own, *args[1:], backend="reference", **kw)
    return same, own


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _random_rows(shape, ratio, g, dtype=None) -> ParamMask:
    rows, ncols = mazo.masks.matrix_shape(shape)
    k = max(1, round(ratio * ncols))
    cols = torch.rand(rows, ncols, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values
    return ParamMask("rows", tuple(shape), cols.to(dtype or index_dtype(ncols)).contiguous())


def _random_blocks(shape, ratio, block, g) -> ParamMask:
    rows, ncols = mazo.masks.matrix_shape(shape)
    nb = -(-ncols // block)
    kb = max(1, round(ratio * nb))
    ids = torch.rand(rows, nb, generator=g).argsort(dim=1)[:, :kb].sort(dim=1).values
    return ParamMask("blocks", tuple(shape), ids.to(index_dtype(nb)).contiguous(), block)


def _random_bits(shape, ratio, g) -> ParamMask:
    flags = torch.rand(shape, generator=g) < ratio
    return ParamMask("bits", tuple(shape), pack_bits(flags))


def _theta(shape, dtype, g) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


# (shape, mask factory, offset): odd sizes, every format, int16 and int32 indices, aligned and unaligned runs.
def _cases(g):
    return [
        ((61, 1317), lambda s: _random_rows(s, 0.1, g), (1 << 32) + 3),                  # int16, 4 chunks
        ((5, 403), lambda s: _random_rows(s, 0.5, g, torch.int32), 6),                   # int32 index
        ((9, 333), lambda s: _random_blocks(s, 0.3, 16, g), 1),                          # unaligned runs
        ((12, 512), lambda s: _random_blocks(s, 0.25, 32, g), 4 * 1001),                 # aligned: npb = B / 4
        ((7, 130), lambda s: _random_blocks(s, 0.5, 20, g), (1 << 40) + 2),              # B % 4 != 0, partial last
        ((2053,), lambda s: _random_bits(s, 0.3, g), 3),                                 # 1-d, bits
        ((33, 97), lambda s: _random_bits(s, 0.05, g), (1 << 49) + 1),
        ((3, 5), lambda s: _random_rows(s, 0.4, g), 0),                                  # tiny
    ]


def _group(dtype, seed, lrs=None, wds=None):
    g = torch.Generator().manual_seed(seed)
    cases = _cases(g)
    tensors = [_theta(shape, dtype, g) for shape, _, _ in cases]
    masks = [make(shape) for shape, make, _ in cases]
    keys = [C.param_key(f"layers.{i}.w") for i in range(len(cases))]
    offsets = [off for _, _, off in cases]
    return Group(tensors, keys, offsets, lrs or [], wds or []), masks


def _close_to_reference(got: torch.Tensor, ref: torch.Tensor, dist: str, d: torch.Tensor):
    """Rademacher: bitwise. Gaussian: the dense tests' rule, on the masked elements d (fp32 within
    round-off, most bitwise; 16-bit at most 1 unit in the last place, nearly all bitwise)."""
    if dist == "rademacher":
        assert torch.equal(_bits(got), _bits(ref))
        return
    same = float((_bits(got)[d] == _bits(ref)[d]).double().mean())
    if got.dtype == torch.float32:
        # a 1-ulp z (<= 5e-7 for |z| < 8) times lr * sum |c| <= 2 (the update cases)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        assert same > 0.5
    else:
        diff = (_bits(got).to(torch.int32) - _bits(ref).to(torch.int32)).abs()
        assert int(diff.max()) <= 1, f"max bit distance {int(diff.max())}"
        assert same > 0.99


CASES = [(torch.float32, "nearest", "gaussian"), (torch.float32, "nearest", "rademacher"),
         (torch.bfloat16, "stochastic", "gaussian"), (torch.bfloat16, "nearest", "rademacher"),
         (torch.float16, "stochastic", "rademacher"), (torch.float16, "nearest", "gaussian")]


@pytest.mark.parametrize("dtype,rounding,dist", CASES)
def test_host_masked_perturb_and_copy(backend, cuda_z, one_thread, dtype, rounding, dist):
    group, masks = _group(dtype, 1)
    theta = [t.clone() for t in group.tensors]
    seed, scale, query, sr = C.step_seed(3, 4), 0.05, 5, C.STREAM_PROBE_SR_NEG

    dense = [torch.empty_like(t) for t in theta]
    backend.perturbed_copy(Group(theta, group.keys, group.offsets), dense, seed, scale, query, dist, rounding, sr)
    same, ref = _reference(cuda_z, ops.masked_perturb_, theta, masks, seed, scale, group.keys, query=query, dist=dist,
                           offsets=group.offsets, rounding=rounding, sr_stream=sr)
    scratch = [torch.full_like(t, 3.0) for t in theta]
    backend.masked.masked_perturb_(group, masks, scratch, seed, scale, query, dist, rounding, sr)  # persistent scratch
    before = backend.LAUNCHES["masked_perturb_"]
    backend.masked.masked_perturb_(group, masks, None, seed, scale, query, dist, rounding, sr)
    assert backend.LAUNCHES["masked_perturb_"] == before + 1  # three formats, two index dtypes: one launch

    for got, out, w, dn, sm, r, m in zip(group.tensors, scratch, theta, dense, same, ref, masks):
        d = m.dense()
        assert torch.equal(_bits(got), _bits(sm))              # the reference, drawing the same z: bitwise
        assert torch.equal(_bits(got)[~d], _bits(w)[~d])       # unmasked: never written
        assert bool((out[~d] == 3.0).all())                    # copy: only masked elements of outs written
        assert torch.equal(_bits(got)[d], _bits(dn)[d])        # masked: the dense CUDA value, bitwise
        assert torch.equal(_bits(out)[d], _bits(dn)[d])
        assert (_bits(got)[d] != _bits(w)[d]).double().mean() > 0.5
        _close_to_reference(got, r, dist, d)


@pytest.mark.parametrize("restore", [None, -0.02])
@pytest.mark.parametrize("dtype,rounding,dist", CASES)
def test_host_masked_zo_update(backend, cuda_z, one_thread, dtype, rounding, dist, restore):
    lrs = [0.05, 0.01, 0.1, 1.0, 0.02, 0.05, 0.3, 0.07]
    wds = [0.01, 0.0, 0.1, 0.0, 0.5, 0.01, 0.0, 0.2]
    group, masks = _group(dtype, 2, lrs, wds)
    theta = [t.clone() for t in group.tensors]
    spec = UpdateSpec(C.step_seed(9, 1), (0.3, -1.1, 0.6), dist, rounding, C.STREAM_UPDATE_SR, restore, 1)

    dense = [t.clone() for t in theta]
    backend.zo_update_(Group(dense, group.keys, group.offsets, lrs, wds), spec)
    same, ref = _reference(cuda_z, ops.masked_zo_update_, theta, masks, spec.seed, group.keys, spec.coeffs, lrs, wds,
                           dist=dist, offsets=group.offsets, rounding=rounding, restore_scale=restore, restore_query=1)
    before = backend.LAUNCHES["masked_zo_update_"]
    backend.masked.masked_zo_update_(group, masks, spec)
    assert backend.LAUNCHES["masked_zo_update_"] == before + 1

    for got, w, dn, sm, r, m in zip(group.tensors, theta, dense, same, ref, masks):
        d = m.dense()
        assert torch.equal(_bits(got), _bits(sm))
        assert torch.equal(_bits(got)[~d], _bits(w)[~d])
        assert torch.equal(_bits(got)[d], _bits(dn)[d])
        _close_to_reference(got, r, dist, d)


def test_host_masked_without_queries_is_masked_weight_decay(backend):
    g = torch.Generator().manual_seed(4)
    w = _theta((17, 1037), torch.float32, g)
    m = _random_blocks(w.shape, 0.3, 16, g)
    got = w.clone()
    backend.masked.masked_zo_update_(Group([got], [1], [5], [0.5], [0.1]), [m], UpdateSpec(2, (), "gaussian", "nearest", 3))
    d = m.dense()
    assert torch.equal(got[d], (w - (w * 0.1) * 0.5)[d]) and torch.equal(got[~d], w[~d])


def test_host_masked_empty_and_full_masks(backend):
    """An empty rows mask (k = 0) launches nothing for its tensor; a full mask equals the dense op."""
    g = torch.Generator().manual_seed(5)
    a, b = _theta((4, 9), torch.bfloat16, g), _theta((6, 37), torch.bfloat16, g)
    empty = ParamMask("rows", (4, 9), torch.empty(4, 0, dtype=torch.int16))
    full = ParamMask("rows", (6, 37), torch.arange(37, dtype=torch.int16).repeat(6, 1).contiguous())
    ga, gb = a.clone(), b.clone()
    backend.masked.masked_perturb_(Group([ga, gb], [1, 2], [0, 7]), [empty, full], None, 3, 0.1, 0, "gaussian",
                            "stochastic", C.STREAM_PROBE_SR_POS)
    dense = b.clone()
    backend.perturb_(Group([dense], [2], [7]), 3, 0.1, 0, "gaussian", "stochastic", C.STREAM_PROBE_SR_POS)
    assert torch.equal(_bits(ga), _bits(a)) and torch.equal(_bits(gb), _bits(dense))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_ops_choose_cuda_for_masked_ops(cuda_gpu_backend):
    for op in ops.MASKED_OPS:
        assert ops.backend_name(op, torch.device("cuda")) == "cuda"
        assert ops.backend_name(op, torch.device("cuda"), "cuda") == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,rounding,dist", CASES)
def test_gpu_masked_ops_match_reference(dtype, rounding, dist, cuda_gpu_backend):
    cuda = cuda_gpu_backend
    lrs = [0.05, 0.01, 0.1, 1.0, 0.02, 0.05, 0.3, 0.07]
    group, masks = _group(dtype, 3)
    ws = [t.cuda() for t in group.tensors]
    ms = [m.to("cuda") for m in masks]
    kw = dict(query=2, dist=dist, offsets=group.offsets, rounding=rounding)
    ref = [w.clone() for w in ws]
    ops.masked_perturb_(ref, ms, 77, 0.05, group.keys, backend="reference", **kw)
    got = [w.clone() for w in ws]
    before = cuda.LAUNCHES["masked_perturb_"]
    ops.masked_perturb_(got, ms, 77, 0.05, group.keys, backend="auto", **kw)
    assert cuda.LAUNCHES["masked_perturb_"] == before + 1
    copies = ops.masked_perturbed_copy(ws, ms, 77, 0.05, group.keys, backend="cuda", **kw)
    dense = ops.perturbed_copy(ws, 77, 0.05, group.keys, backend="cuda", **kw)
    torch.cuda.synchronize()
    for w, gt, c, dn, r, m in zip(ws, got, copies, dense, ref, ms):
        d = m.dense()
        assert torch.equal(_bits(gt)[~d], _bits(w)[~d]) and torch.equal(_bits(gt), _bits(c))
        assert torch.equal(_bits(gt)[d], _bits(dn)[d])
        _close_to_reference(gt.cpu(), r.cpu(), dist, d.cpu())

    kw = dict(dist=dist, offsets=group.offsets, rounding=rounding, restore_scale=0.02, restore_query=2)
    ref = [w.clone() for w in ws]
    ops.masked_zo_update_(ref, ms, 78, group.keys, (0.5, -0.25, 2.0), lrs, 0.01, backend="reference", **kw)
    got = [w.clone() for w in ws]
    ops.masked_zo_update_(got, ms, 78, group.keys, (0.5, -0.25, 2.0), lrs, 0.01, backend="cuda", **kw)
    dense = [w.clone() for w in ws]
    ops.zo_update_(dense, 78, group.keys, (0.5, -0.25, 2.0), lrs, 0.01, backend="cuda", **kw)
    for w, gt, dn, r, m in zip(ws, got, dense, ref, ms):
        d = m.dense()
        assert torch.equal(_bits(gt)[~d], _bits(w)[~d]) and torch.equal(_bits(gt)[d], _bits(dn)[d])
        _close_to_reference(gt.cpu(), r.cpu(), dist, d.cpu())


@pytest.mark.gpu
def test_gpu_masked_large_row_topk_int32(cuda_gpu_backend):
    """A row longer than 32767 columns (int32 index) and > 2^32 offsets on the device."""
    g = torch.Generator().manual_seed(6)
    w = _theta((3, 40001), torch.bfloat16, g).cuda()
    m = mazo.row_topk(torch.rand(w.shape, generator=g), 0.1).to("cuda")
    assert m.index.dtype == torch.int32
    got, ref = w.clone(), w.clone()
    ops.masked_perturb_(got, m, 5, 1e-2, 9, query=1, offsets=[(1 << 33) + 1], rounding="stochastic", backend="cuda")
    ops.masked_perturb_(ref, m, 5, 1e-2, 9, query=1, offsets=[(1 << 33) + 1], rounding="stochastic",
                        backend="reference")
    _close_to_reference(got.cpu(), ref.cpu(), "gaussian", m.dense().cpu())
