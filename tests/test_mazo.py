"""MaZO: compact masks, masked ops (reference + Triton interpreter), importance scores, masked ZOSGD."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import zokernels
from zokernels import contract as C
from zokernels import ops
from zokernels import mazo
from zokernels.mazo import ParamMask

RULES = ("row_topk", "block_topk", "bits")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _masks_for(scores: torch.Tensor, ratio: float = 0.1) -> dict[str, ParamMask]:
    return {rule: mazo.build_masks({"w": scores}, ratio, rule, block=16)["w"] for rule in RULES}


# ----------------------------------------------------------------------------- mask formats
def test_row_topk_is_torch_topk_per_row():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(37, 1037, generator=g, dtype=torch.float64).float()  # distinct values
    for ratio in (0.01, 0.1, 0.5, 1.0):
        m = mazo.row_topk(scores, ratio)
        k = max(1, round(ratio * 1037))
        want = torch.topk(scores, k, dim=1).indices.sort(dim=1).values
        assert m.kind == "rows" and m.index.dtype == torch.int16 and m.index.shape == (37, k)
        assert torch.equal(m.index.to(torch.int64), want)
        assert m.count == 37 * k
        dense = m.dense()
        assert dense.sum() == 37 * k and bool((scores[dense].view(37, k).min(1).values
                                                > scores.masked_fill(dense, -math.inf).max(1).values).all())


def test_index_dtype_widens_for_long_rows_and_1d_params():
    g = torch.Generator().manual_seed(1)
    m = mazo.row_topk(torch.rand(2, 40000, generator=g), 0.001)
    assert m.index.dtype == torch.int32 and m.ncols == 40000
    v = mazo.row_topk(torch.rand(301, generator=g), 0.1)  # a bias: one row
    assert v.matrix == (1, 301) and v.index.shape == (1, 30)
    conv = mazo.row_topk(torch.rand(6, 3, 5, 5, generator=g), 0.2)  # rows = output channels
    assert conv.matrix == (6, 75) and conv.index.shape == (6, 15)


def test_block_topk_against_brute_force():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(9, 1037, generator=g)
    m = mazo.block_topk(scores, 0.25, block=32)
    nblocks = -(-1037 // 32)
    kb = round(0.25 * nblocks)
    means = torch.stack([scores[:, b * 32:(b + 1) * 32].mean(1) for b in range(nblocks)], 1)
    want = torch.topk(means, kb, dim=1).indices.sort(1).values
    assert torch.equal(m.index.to(torch.int64), want)
    dense = m.dense()
    expect = torch.zeros_like(dense)
    for r in range(9):
        for b in want[r].tolist():
            expect[r, b * 32:(b + 1) * 32] = True
    assert torch.equal(dense, expect) and m.count == int(expect.sum())
    with pytest.raises(ValueError, match="block"):
        mazo.block_topk(scores, 0.25, block=8)


def test_bits_pack_roundtrip_and_global_topk():
    g = torch.Generator().manual_seed(3)
    flags = torch.rand(4099, generator=g) < 0.3
    assert torch.equal(mazo.unpack_bits(mazo.pack_bits(flags), 4099), flags)
    m = mazo.from_dense(flags.view(1, 4099))
    assert m.kind == "bits" and m.index.dtype == torch.uint8 and m.index.numel() == 513
    assert m.count == int(flags.sum()) and torch.equal(m.dense().view(-1), flags)
    scores = torch.randn(17, 61, generator=g)
    b = mazo.bits_topk(scores, 0.2)
    k = round(0.2 * scores.numel())
    assert torch.equal(b.dense().view(-1).nonzero().view(-1), torch.topk(scores.view(-1), k).indices.sort().values)


def test_masks_save_load_and_fingerprint(tmp_path):
    g = torch.Generator().manual_seed(4)
    scores = {"a.weight": torch.rand(7, 300, generator=g), "b.weight": torch.rand(5, 40, generator=g)}
    for rule in RULES:
        masks = mazo.build_masks(scores, 0.2, rule)
        mazo.save_masks(masks, tmp_path / f"{rule}.safetensors")
        back = mazo.load_masks(tmp_path / f"{rule}.safetensors")
        assert set(back) == set(masks)
        for n in masks:
            assert back[n].kind == masks[n].kind and back[n].shape == masks[n].shape
            assert torch.equal(back[n].index, masks[n].index) and back[n].index.dtype == masks[n].index.dtype
        assert mazo.masks_fingerprint(back.items()) == mazo.masks_fingerprint(masks.items())
    other = mazo.build_masks({n: s.flip(-1) for n, s in scores.items()}, 0.2)
    assert mazo.masks_fingerprint(other.items()) != mazo.masks_fingerprint(mazo.build_masks(scores, 0.2).items())


def test_mask_ids_are_checked_where_masks_are_made_and_loaded(tmp_path):
    """The kernels index with the ids unchecked: a hand-built or tampered mask with an id out of range, a
    repeated or a descending id is refused at construction (so at load_masks too), never written through."""
    def rows(ids):
        return ParamMask("rows", (4, 8), torch.tensor(ids, dtype=torch.int16))
    good = [[0, 7], [1, 2], [3, 4], [5, 6]]
    assert rows(good).count == 8
    for bad in ([[-1, 1]] + good[1:], good[:3] + [[0, 8]], [[2, 2]] + good[1:], [[3, 1]] + good[1:]):
        with pytest.raises(ValueError, match="ascend strictly within each row and lie in"):
            rows(bad)
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        ParamMask("blocks", (4, 40), torch.tensor([[0, 3]] * 4, dtype=torch.int16), 16)
    with pytest.raises(ValueError, match="block must be an int"):
        ParamMask("blocks", (4, 40), torch.tensor([[0, 2]] * 4, dtype=torch.int16), 16.5)
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    mazo.save_masks({"w": rows(good)}, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tampered = load_file(str(tmp_path / "m.safetensors"))
    tampered["w"][0, 1] = 100
    save_file(tampered, str(tmp_path / "t.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"lie in \[0, 8\); got ids in \[0, 100\]"):
        mazo.load_masks(tmp_path / "t.safetensors")


# ----------------------------------------------------------------------------- masked ops, reference
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_masked_ops_move_only_masked_elements_with_dense_z(rule, dtype, monkeypatch):
    from zokernels.backends.reference import masked as ref_masked
    monkeypatch.setattr(ref_masked, "CHUNK", 4096)  # many chunks, chunk boundaries inside rows
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(61, 1317, generator=g) * 0.1).to(dtype)  # 80,337 elements, odd row length
    m = mazo.build_masks({"w": torch.rand(w.shape, generator=g)}, 0.1, rule)["w"]
    d = m.dense()
    seed, key, off = 0x1234_5678_9ABC, 0xDEAD_BEEF_F00D, 7
    for dist, rounding in (("gaussian", "stochastic"), ("rademacher", "nearest")):
        got = w.clone()
        ops.masked_perturb_(got, m, seed, 1e-2, key, query=3, dist=dist, offsets=[off], rounding=rounding,
                            backend="reference")
        want = w.clone()
        ops.perturb_(want, seed, 1e-2, key, query=3, dist=dist, offsets=[off], rounding=rounding, backend="reference")
        assert torch.equal(_bits(got)[d], _bits(want)[d])
        assert torch.equal(_bits(got)[~d], _bits(w)[~d])
        assert (_bits(got)[d] != _bits(w)[d]).float().mean() > 0.5  # masked elements did move
        got = w.clone()
        ops.masked_zo_update_(got, m, seed, key, [0.7, -1.3], 1e-2, 0.1, dist=dist, offsets=[off], rounding=rounding,
                              restore_scale=-2e-2, restore_query=1, backend="reference")
        want = w.clone()
        ops.zo_update_(want, seed, key, [0.7, -1.3], 1e-2, 0.1, dist=dist, offsets=[off], rounding=rounding,
                       restore_scale=-2e-2, restore_query=1, backend="reference")
        assert torch.equal(_bits(got)[d], _bits(want)[d])
        assert torch.equal(_bits(got)[~d], _bits(w)[~d])


def test_masked_perturbed_copy_fresh_and_persistent():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(33, 517, generator=g).to(torch.bfloat16)
    m = mazo.row_topk(torch.rand(w.shape, generator=g), 0.05)
    d = m.dense()
    fresh = ops.masked_perturbed_copy(w, m, 11, 1e-2, 99, query=2, rounding="stochastic", backend="reference")
    want = ops.perturbed_copy(w, 11, 1e-2, 99, query=2, rounding="stochastic", backend="reference")
    assert torch.equal(_bits(fresh)[d], _bits(want)[d]) and torch.equal(_bits(fresh)[~d], _bits(w)[~d])
    sentinel = torch.full_like(w, 3.0)
    ops.masked_perturbed_copy(w, m, 11, 1e-2, 99, query=2, rounding="stochastic", outs=[sentinel], backend="reference")
    assert torch.equal(_bits(sentinel)[d], _bits(want)[d]) and bool((sentinel[~d] == 3.0).all())  # off-mask untouched


def test_masked_op_errors():
    w = torch.randn(4, 8)
    m = mazo.row_topk(torch.rand(4, 8), 0.5)
    with pytest.raises(ops.OpError, match="shape"):
        ops.masked_perturb_(w.t().contiguous(), m, 1, 1.0, 2)
    with pytest.raises(ops.OpError, match="masks"):
        ops.masked_perturb_([w, w.clone()], [m], 1, 1.0, [2, 3])
    with pytest.raises(ops.OpError, match="ParamMask"):
        ops.masked_perturb_(w, torch.ones(4, 8, dtype=torch.bool), 1, 1.0, 2)


# ----------------------------------------------------------------------------- masked ops, Triton interpreter
def _triton_or_skip():
    reason = zokernels.backends.registry.not_supported("triton", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"triton backend unavailable on CPU: {reason}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_masked_equals_dense_triton_and_reference(dtype):
    _triton_or_skip()
    from zokernels.backends import triton as tb
    g = torch.Generator().manual_seed(7)
    # one call, three tensors of three formats (three launch sets), odd sizes and offsets (unaligned runs)
    ws = [(torch.randn(7, 1037, generator=g) * 0.1).to(dtype), (torch.randn(5, 403, generator=g)).to(dtype),
          (torch.randn(2053, generator=g)).to(dtype)]
    ms = [mazo.row_topk(torch.rand(ws[0].shape, generator=g), 0.1),
          mazo.block_topk(torch.rand(ws[1].shape, generator=g), 0.2, block=16),
          mazo.bits_topk(torch.rand(ws[2].shape, generator=g), 0.3)]
    keys, offs, seed = [5, 2 ** 63 + 9, 77], [0, 6, 3], 0xABCDEF
    for dist, rounding in (("gaussian", "stochastic"), ("rademacher", "nearest")):
        before = tb.LAUNCHES["masked_perturb_kernel"]
        tri = [w.clone() for w in ws]
        ops.masked_perturb_(tri, ms, seed, 0.05, keys, query=4, dist=dist, offsets=offs, rounding=rounding,
                            backend="triton")
        assert tb.LAUNCHES["masked_perturb_kernel"] - before == 3
        ref = [w.clone() for w in ws]
        ops.masked_perturb_(ref, ms, seed, 0.05, keys, query=4, dist=dist, offsets=offs, rounding=rounding,
                            backend="reference")
        dense = [w.clone() for w in ws]
        ops.perturb_(dense, seed, 0.05, keys, query=4, dist=dist, offsets=offs, rounding=rounding, backend="triton")
        upd = [w.clone() for w in ws]
        ops.masked_zo_update_(upd, ms, seed, keys, [0.3, -1.1], 0.05, 0.01, dist=dist, offsets=offs,
                              rounding=rounding, restore_scale=0.02, restore_query=1, backend="triton")
        upd_dense = [w.clone() for w in ws]
        ops.zo_update_(upd_dense, seed, keys, [0.3, -1.1], 0.05, 0.01, dist=dist, offsets=offs, rounding=rounding,
                       restore_scale=0.02, restore_query=1, backend="triton")
        upd_ref = [w.clone() for w in ws]
        ops.masked_zo_update_(upd_ref, ms, seed, keys, [0.3, -1.1], 0.05, 0.01, dist=dist, offsets=offs,
                              rounding=rounding, restore_scale=0.02, restore_query=1, backend="reference")
        for w, m, t, r, dn, u, ud, ur in zip(ws, ms, tri, ref, dense, upd, upd_dense, upd_ref):
            d = m.dense()
            assert torch.equal(_bits(t)[~d], _bits(w)[~d]) and torch.equal(_bits(u)[~d], _bits(w)[~d])
            assert torch.equal(_bits(t)[d], _bits(dn)[d]) and torch.equal(_bits(u)[d], _bits(ud)[d])
            if dist == "rademacher" or dtype != torch.float32:  # gaussian fp32: numpy vs torch libm (<= 1 ulp)
                assert (_bits(t) != _bits(r)).sum() <= 1 and (_bits(u) != _bits(ur)).sum() <= 1
            torch.testing.assert_close(t.float(), r.float(), rtol=0, atol=2e-6 if dtype == torch.float32 else 1e-2)
            torch.testing.assert_close(u.float(), ur.float(), rtol=0, atol=2e-6 if dtype == torch.float32 else 1e-2)


def test_triton_masked_copy_into_persistent_scratch():
    _triton_or_skip()
    g = torch.Generator().manual_seed(8)
    w = torch.randn(9, 333, generator=g).to(torch.bfloat16)
    m = mazo.block_topk(torch.rand(w.shape, generator=g), 0.3, block=32)
    out = torch.full_like(w, 3.0)
    ops.masked_perturbed_copy(w, m, 5, 1e-2, 6, query=1, rounding="stochastic", outs=[out], backend="triton")
    want = ops.perturbed_copy(w, 5, 1e-2, 6, query=1, rounding="stochastic", backend="triton")
    d = m.dense()
    assert torch.equal(_bits(out)[d], _bits(want)[d]) and bool((out[~d] == 3.0).all())


def _block_views(flat: torch.Tensor, shapes, starts) -> list[torch.Tensor]:
    return [flat[s:s + math.prod(shape)].view(shape) for shape, s in zip(shapes, starts)]


def test_triton_masked_aligned_runs_launch_aligned_and_match_dense(aligned_launches):
    """Block masks whose runs start on Philox block boundaries (offset, ncols and block multiples of 4) on
    weights and outs at multiples of 4 elements launch ALIGNED (vector access hints on a GPU); an odd weight
    view, out view, offset or ncols, and the other formats, do not. Either way the masked elements are the
    dense Triton op's, bitwise, and the unmasked ones untouched."""
    _triton_or_skip()
    g = torch.Generator().manual_seed(12)
    shapes = [(6, 64), (5, 36), (3, 40)]          # 36 columns: each row's last block is a 4-column partial run
    flat = (torch.randn(1300, generator=g) * 0.1).to(torch.bfloat16)
    masks = [mazo.block_topk(torch.rand(s, generator=g), 0.4, block=b) for s, b in zip(shapes, (16, 16, 20))]
    keys, seed, quads = [3, 4, 2 ** 63 + 5], 99, [0, 388, 572]
    # (weight view starts, offsets, out view starts, ALIGNED of the copy's / the update's launches); one launch
    # per run geometry: blocks of 16 (tensors 0, 1) and of 20 columns (tensor 2); deltas count from a launch's
    # first tensor (the pointer's own alignment is the JIT's specialization)
    cases = [
        (quads, [0, 8, 4096], quads, [True, True], [True, True]),
        ([0, 389, 572], [0, 8, 4096], quads, [False, True], [False, True]),   # a weight view at element 389
        (quads, [0, 8, 4096], [1, 390, 573], [False, True], [True, True]),    # out delta 389 from out 0
        (quads, [0, 6, 4096], quads, [True, False, True], [True, False, True]),  # offset 6: off the Philox grid
    ]
    for starts, offs, out_starts, *wants in cases:
        for op, want in zip(("copy", "update"), wants):
            del aligned_launches[:]
            ws = _block_views(flat.clone(), shapes, starts)
            before = [w.clone() for w in ws]
            if op == "copy":
                got = _block_views(torch.full((1400,), 7.0, dtype=torch.bfloat16), shapes, out_starts)
                ops.masked_perturbed_copy(ws, masks, seed, 0.05, keys, query=2, dist="rademacher", offsets=offs,
                                          rounding="stochastic", outs=got, backend="triton")
                base = [torch.full_like(w, 7.0) for w in ws]
                dense = ops.perturbed_copy(before, seed, 0.05, keys, query=2, dist="rademacher", offsets=offs,
                                           rounding="stochastic", backend="triton")
            else:
                ops.masked_zo_update_(ws, masks, seed, keys, [0.3, -1.1], 0.05, 0.01, dist="rademacher",
                                      offsets=offs, rounding="stochastic", restore_scale=0.02, restore_query=1,
                                      backend="triton")
                got, base, dense = ws, before, [w.clone() for w in before]
                ops.zo_update_(dense, seed, keys, [0.3, -1.1], 0.05, 0.01, dist="rademacher", offsets=offs,
                               rounding="stochastic", restore_scale=0.02, restore_query=1, backend="triton")
            kernel = "masked_perturb_kernel" if op == "copy" else "masked_update_kernel"
            assert [a for k, a in aligned_launches if k == kernel] == want, (op, starts, offs, out_starts)
            for t, b, dn, m in zip(got, base, dense, masks):
                d = m.dense()
                assert torch.equal(_bits(t)[~d], _bits(b)[~d]) and torch.equal(_bits(t)[d], _bits(dn)[d])
                assert not torch.equal(_bits(t)[d], _bits(b)[d])
    del aligned_launches[:]
    block_18 = lambda s, r: mazo.block_topk(s, r, block=18)  # noqa: E731 — runs of 18 start mid Philox block
    for shape, rule in (((9, 36), mazo.block_topk), ((9, 36), mazo.row_topk), ((9, 36), mazo.bits_topk),
                        ((9, 35), mazo.block_topk), ((9, 36), block_18)):   # ncols 35: runs leave the Philox grid
        w = flat[:math.prod(shape)].view(shape).clone()
        ops.masked_perturb_(w, rule(torch.rand(shape, generator=g), 0.4), seed, 0.05, 1, backend="triton")
    assert aligned_launches == [("masked_perturb_kernel", a) for a in (True, False, False, False, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_triton_masked_kernels_match_dense_and_stay_inside(cuda_device, dtype, aligned_launches):
    """The compiled Triton masked kernels (on a GPU `auto` picks CUDA's, so only this test runs them): every
    format, ALIGNED (vector access) and unaligned runs, views of one buffer with a sentinel after the last
    (aligned) one that no op may touch. Masked elements = the dense Triton op's, bitwise (Rademacher: also the
    reference's); unmasked elements untouched."""
    g = torch.Generator().manual_seed(13)
    shapes = [(61, 1317), (9, 333), (7, 130), (33, 97), (2053,), (12, 512), (64, 1024)]
    offs = [(1 << 32) + 3, 1, (1 << 40) + 2, (1 << 49) + 1, 3, 4 * 1001, 0]
    rules = [lambda s: mazo.row_topk(s, 0.1), lambda s: mazo.block_topk(s, 0.3, block=16),
             lambda s: mazo.block_topk(s, 0.5, block=20), lambda s: mazo.bits_topk(s, 0.05),
             lambda s: mazo.bits_topk(s, 0.3), lambda s: mazo.block_topk(s, 0.25, block=32),
             lambda s: mazo.block_topk(s, 0.1, block=16)]
    masks = [rule(torch.rand(shape, generator=g)).to(cuda_device) for rule, shape in zip(rules, shapes)]
    starts = [0]
    for shape in shapes:
        starts.append(starts[-1] + -(-math.prod(shape) // 4) * 4)
    flat = (torch.randn(starts[-1] + 3, generator=g) * 0.1).to(cuda_device, dtype)
    views = _block_views(flat, shapes, starts)
    sentinel, keep = flat[starts[-1]:], flat[starts[-1]:].clone()
    keys = [C.param_key(f"layers.{i}.w") for i in range(len(shapes))]
    for dist in ("rademacher", "gaussian"):
        for rounding in ("nearest", "stochastic"):
            kw = dict(dist=dist, offsets=offs, rounding=rounding)
            ws = [v.clone() for v in views]
            ops.masked_perturb_(ws, masks, 77, 0.05, keys, query=2, backend="triton", **kw)
            outs = [v.clone() for v in views]
            ops.masked_perturbed_copy(views, masks, 77, 0.05, keys, query=2, outs=outs, backend="triton", **kw)
            dense = ops.perturbed_copy(views, 77, 0.05, keys, query=2, backend="triton", **kw)
            ref = [v.clone() for v in views]
            ops.masked_perturb_(ref, masks, 77, 0.05, keys, query=2, backend="reference", **kw)
            upd = [v.clone() for v in views]
            ukw = dict(restore_scale=0.02, restore_query=2, **kw)
            ops.masked_zo_update_(upd, masks, 78, keys, (0.5, -0.25, 2.0), 0.05, 0.01, backend="triton", **ukw)
            upd_dense = [v.clone() for v in views]
            ops.zo_update_(upd_dense, 78, keys, (0.5, -0.25, 2.0), 0.05, 0.01, backend="triton", **ukw)
            upd_ref = [v.clone() for v in views]
            ops.masked_zo_update_(upd_ref, masks, 78, keys, (0.5, -0.25, 2.0), 0.05, 0.01, backend="reference",
                                  **ukw)
            for v, m, w, o, dn, r, u, ud, ur in zip(views, masks, ws, outs, dense, ref, upd, upd_dense, upd_ref):
                d, what = m.dense(), (m.kind, dist, rounding)
                assert torch.equal(_bits(w), _bits(o)), what
                assert torch.equal(_bits(w)[~d], _bits(v)[~d]) and torch.equal(_bits(u)[~d], _bits(v)[~d]), what
                assert torch.equal(_bits(w)[d], _bits(dn)[d]) and torch.equal(_bits(u)[d], _bits(ud)[d]), what
                if dist == "rademacher":
                    assert torch.equal(_bits(w), _bits(r)) and torch.equal(_bits(u), _bits(ur)), what
    ops.masked_perturb_(views, masks, 79, 0.05, keys, offsets=offs, rounding="stochastic", backend="triton")
    ops.masked_zo_update_(views, masks, 79, keys, (0.5,), 0.05, 0.01, offsets=offs, rounding="stochastic",
                          restore_scale=-0.05, restore_query=0, backend="triton")
    torch.cuda.synchronize()
    assert torch.equal(_bits(sentinel), _bits(keep))
    assert ("masked_perturb_kernel", True) in aligned_launches and ("masked_update_kernel", True) in aligned_launches
    assert ("masked_perturb_kernel", False) in aligned_launches


# ----------------------------------------------------------------------------- importance
class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 10)
        self.fc2 = torch.nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _tiny_tasks(dtype=torch.float32):
    g = torch.Generator().manual_seed(9)
    return {t: [(torch.randn(8, 6, generator=g, dtype=dtype), torch.randn(8, 3, generator=g, dtype=dtype))
                for _ in range(3)] for t in ("a", "b")}


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _rownorm64(x):
    return x / x.mean(dim=1, keepdim=True)


def test_mazo_and_wanda_scores_match_float64_reference():
    torch.manual_seed(0)
    model = _Tiny()
    tasks = _tiny_tasks()
    alpha, beta, lr_scale = 0.7, 0.2, 0.5
    got = mazo.importance(model, tasks, "mazo", loss_fn=_mse, alpha=alpha, beta=beta, lr_scale=lr_scale)
    wanda = mazo.importance(model, tasks, "wanda", loss_fn=_mse)
    m64 = copy.deepcopy(model).double()
    names = ["fc1.weight", "fc2.weight"]
    assert set(got) == set(names) == set(wanda)
    params = dict(m64.named_parameters())
    want = {n: torch.zeros_like(params[n]) for n in names}
    want_w = {n: torch.zeros_like(params[n]) for n in names}
    for batches in tasks.values():
        gs = {n: [] for n in names}
        for x, y in batches:
            grads = torch.autograd.grad(_mse(m64, (x.double(), y.double())), [params[n] for n in names])
            for n, gr in zip(names, grads):
                gs[n].append(gr)
        xs = torch.cat([x.double() for x, _ in batches])
        h = torch.tanh(m64.fc1(xs)).detach()
        norms = {"fc1.weight": xs.norm(dim=0), "fc2.weight": h.norm(dim=0)}
        for n in names:
            w = params[n].detach()
            gbar = torch.stack(gs[n]).mean(0)
            fisher = (torch.stack(gs[n]) ** 2).mean(0)
            s = (_rownorm64((gbar * w).abs() + 0.5 * fisher * w * w) + alpha * _rownorm64(lr_scale * gbar.abs())
                 + beta * _rownorm64(w.abs()))
            want[n] += _rownorm64(s)
            want_w[n] += _rownorm64(w.abs() * norms[n][None, :])
    for n in names:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(wanda[n].double(), want_w[n], rtol=1e-4, atol=1e-6)
    assert model.training  # mode restored


def test_magnitude_and_random_scores():
    model = _Tiny()
    mag = mazo.importance(model, None, "magnitude")
    m = mazo.build_masks(mag, 0.3)["fc1.weight"]
    w = model.fc1.weight.detach().abs()
    chosen = w[m.dense()].view(10, -1)
    assert bool((chosen.max(1).values <= w.masked_fill(m.dense(), math.inf).min(1).values).all())  # smallest |w|
    r1 = mazo.importance(model, None, "random", seed=3)
    r2 = mazo.importance(model, None, "random", seed=3)
    assert all(torch.equal(r1[n], r2[n]) for n in r1)
    with pytest.raises(ValueError, match="task_batches"):
        mazo.importance(model, None, "mazo", loss_fn=_mse)


# ----------------------------------------------------------------------------- masked ZOSGD
def _mlp(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(dtype)


@pytest.mark.parametrize("probe", ["hooks", "swap", "inplace"])
def test_zosgd_masks_freeze_unmasked_and_replay(probe, tmp_path):
    base = _mlp()
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(64, 16, generator=g).to(torch.bfloat16), torch.randn(64, 4, generator=g)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in base.named_parameters() if p.ndim == 2}
    masks = mazo.build_masks(scores, 0.25, "row_topk")
    model = copy.deepcopy(base)
    opt = zokernels.ZOSGD(model, lr=1e-2, eps=1e-2, seed=3, masks=masks, probe=probe, n_queries=2)
    for _ in range(4):
        opt.step(lambda: ((model(x).float() - y) ** 2).mean())
    for (n, p), p0 in zip(model.named_parameters(), base.parameters()):
        if n in masks:
            d = masks[n].dense()
            assert torch.equal(_bits(p)[~d], _bits(p0)[~d]), n
            assert (_bits(p)[d] != _bits(p0)[d]).float().mean() > 0.5, n
        else:
            assert (p != p0).any(), n  # unmasked parameters (biases) train densely
    assert opt.log.header["masks"] == mazo.masks_fingerprint(masks.items())
    if probe != "inplace":
        # masked elements perturbed in place (mask-sized backups), no dense scratch copy of a masked parameter
        assert {opt._names[i] for i in opt._prober.masked} == set(masks) and not opt._prober.whole & opt._prober.masked
    opt.log.save(tmp_path / "log.npz")
    rebuilt = copy.deepcopy(base)
    zokernels.replay(rebuilt, tmp_path / "log.npz", masks=masks)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.parameters(), model.parameters()))
    with pytest.raises(zokernels.LogMismatch, match="mask"):
        zokernels.replay(copy.deepcopy(base), tmp_path / "log.npz")
    other = mazo.build_masks({n: s.flip(-1) for n, s in scores.items()}, 0.25)
    with pytest.raises(zokernels.LogMismatch, match="mask"):
        zokernels.replay(copy.deepcopy(base), tmp_path / "log.npz", masks=other)


def test_masked_drift_free_probe_sees_masked_perturbation_only():
    """The forward of a masked probe sees W with masked elements at R(W + eps z) and the rest at W."""
    model = _mlp(torch.float32)
    masks = mazo.build_masks({"0.weight": torch.rand(32, 16)}, 0.2)
    opt = zokernels.ZOSGD(model, lr=1e-3, eps=0.5, seed=4, masks=masks, probe="swap")
    seen = []
    w0 = model[0].weight.detach().clone()
    opt.step(lambda: seen.append(model[0].weight.detach().clone()) or model(torch.ones(1, 16)).sum())
    w1 = model[0].weight.detach().clone()  # after step 0's masked update; step 1 probes around it
    opt.step(lambda: seen.append(model[0].weight.detach().clone()) or model(torch.ones(1, 16)).sum())
    d = masks["0.weight"].dense()
    seed = zokernels.contract.step_seed(4, 0)
    z = ops.perturbation(w0, seed, opt.keys["0.weight"], 0)
    assert torch.equal(seen[0][~d], w0[~d]) and torch.equal(seen[1][~d], w0[~d])
    assert torch.equal(seen[0][d], (w0 + 0.5 * z)[d]) and torch.equal(seen[1][d], (w0 - 0.5 * z)[d])
    assert not torch.equal(w1, w0)
    seed1 = zokernels.contract.step_seed(4, 1)
    z1 = ops.perturbation(w1, seed1, opt.keys["0.weight"], 0)
    assert torch.equal(seen[2][d], (w1 + 0.5 * z1)[d]) and torch.equal(seen[2][~d], w0[~d])


def test_masks_must_match_parameters():
    model = _mlp()
    with pytest.raises(ValueError, match="matches no"):
        zokernels.ZOSGD(model, lr=1e-3, masks={"nope.weight": mazo.row_topk(torch.rand(32, 16), 0.1)})
    with pytest.raises(ValueError, match="shape"):
        zokernels.ZOSGD(model, lr=1e-3, masks={"0.weight": mazo.row_topk(torch.rand(16, 32), 0.1)})


def test_multitask_mazo_beats_dense_at_equal_steps():
    """Two synthetic regression tasks on a tiny MLP (64 -> 128 -> 8, 9.4K weights): task t feeds inputs
    on its own 32 columns, and its teacher differs from the base weights on 2 of those columns per
    hidden unit. At equal steps (100), each at its best lr of the grid {0.01, 0.03, 0.1, 0.3} (swept
    offline at 200 steps: dense 0.01 -> 0.0558, diverges at 0.1; MaZO 0.1 -> 0.0428; random / magnitude
    / Wanda masks 0.058-0.059 at 0.1), MaZO's 10% row mask reaches a lower multi-task loss than the
    dense update: the SPSA noise grows with the perturbed dimension, so the masked run tolerates a 10x
    larger lr, and the gradient-based scores find the teacher's columns."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8))
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lo in (0, 32):
            pick = torch.rand(128, 32, generator=g).argsort(dim=1)[:, :2] + lo
            teacher[0].weight.scatter_add_(1, pick, torch.randn(128, 2, generator=g) * 0.5)

    def task(lo):
        x = torch.zeros(256, 64)
        x[:, lo:lo + 32] = torch.randn(256, 32, generator=g)
        with torch.no_grad():
            return x, teacher(x)

    tasks = {"a": task(0), "b": task(32)}

    def multi(m):
        return sum(_mse(m, b) for b in tasks.values()).item() / 2

    calib = {k: [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)] for k, (x, y) in tasks.items()}
    masks = mazo.build_masks(mazo.importance(base, calib, "mazo", loss_fn=_mse), 0.1)
    final = {}
    for method, lr in (("dense", 0.01), ("mazo", 0.1)):
        model = copy.deepcopy(base)
        opt = zokernels.ZOSGD(model, lr=lr, eps=1e-3, seed=5, masks=masks if method == "mazo" else None)
        for _ in range(100):
            opt.step(lambda: multi(model))
        final[method] = multi(model)
    start = multi(base)
    assert final["mazo"] < final["dense"] < start, (start, final)
    assert final["mazo"] < 0.9 * final["dense"], (start, final)
