"""The perturbation contract on every backend that runs on CPU: known answers, golden table,
statistics, independence of streams, stochastic rounding, and the ops' error handling."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import zokernels as Z
from zokernels import contract as C
from zokernels.backends import registry

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_z.json").read_text())

# Random123's published known-answer vectors for Philox4x32-10.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((C.MASK32,) * 4, (C.MASK32, C.MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def cpu_backends():
    names = ["reference"]
    if importlib.util.find_spec("triton") is not None:
        names.append("triton")  # must be usable under the interpreter: a failure is a bug, not a skip
    return names


BACKENDS = cpu_backends()


def test_python_statement_matches_known_answers():
    for ctr, key, want in KAT:
        assert C.philox4x32_py(ctr, key) == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_philox_known_answers(backend):
    ctr = torch.tensor([k[0] for k in KAT], dtype=torch.int64)
    for i, (_, key, want) in enumerate(KAT):
        got = Z.philox4x32(ctr[i:i + 1], key, backend=backend)
        assert tuple(got[0].tolist()) == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_table(backend):
    assert GOLDEN["contract_version"] == C.CONTRACT_VERSION
    for row in GOLDEN["rows"]:
        args = dict(seed=int(row["seed"]), key=int(row["key"]), query=row["query"], offset=int(row["j"]),
                    stream=row["stream"], backend=backend)
        g = Z.perturbation((1,), dist="gaussian", **args)
        r = Z.perturbation((1,), dist="rademacher", **args)
        v = Z.uniform((1,), **args)
        assert abs(g.item() - row["gaussian"]) <= 1e-5, row
        assert r.item() == row["rademacher"], row
        assert v.item() == row["uniform"], row  # exact: 24-bit integer times 2^-24


def test_golden_words_are_the_python_statement():
    for row in GOLDEN["rows"][::7]:
        j = int(row["j"])
        words = C.philox4x32_py(C.philox_counter(j >> 2, row["query"], row["stream"], int(row["key"])),
                                C.philox_key(int(row["seed"])))
        assert [f"{w:08x}" for w in words] == row["words"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranges_are_slices_of_one_sequence(backend):
    n = 4099 if backend == "triton" else 278011
    key = Z.param_key("w")
    full = Z.perturbation((n,), 11, key, backend=backend)
    for off in (1, 2, 3, 1000, n - 5):
        part = Z.perturbation((n - off,), 11, key, offset=off, backend=backend)
        assert torch.equal(part, full[off:])


def test_reference_chunking_is_invisible(monkeypatch):
    from zokernels.backends import reference
    t = torch.randn(10007)
    a = t.clone()
    Z.perturb_(a, 3, 0.5, [9], backend="reference")
    monkeypatch.setattr(reference, "CHUNK", 1001)
    b = t.clone()
    Z.perturb_(b, 3, 0.5, [9], backend="reference")
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- statistics
N = 278011


def _z(seed=1, key=2, query=0, stream=0, dist="gaussian"):
    return Z.perturbation((N,), seed, key, query, dist, stream=stream, backend="reference").double()


def test_gaussian_moments():
    z = _z()
    assert abs(z.mean()) < 5 / math.sqrt(N)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / N)
    assert abs((z ** 4).mean() - 3) < 5 * math.sqrt(96 / N)
    assert abs((z ** 3).mean()) < 5 * math.sqrt(15 / N)
    assert z.abs().max() < 5.8  # u >= 2^-24 bounds the radius at sqrt(2 * 24 ln 2) = 5.77


def test_rademacher_values_and_balance():
    z = _z(dist="rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean()) < 5 / math.sqrt(N)


@pytest.mark.parametrize("other", [dict(key=3), dict(query=1), dict(seed=2), dict(stream=3),
                                   dict(seed=C.step_seed(1, 1))])
def test_independence(other):
    base = dict(seed=1, key=2, query=0, stream=0)
    a = _z(**base)
    b = _z(**{**base, **other})
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert abs(corr) < 5 / math.sqrt(N)
    assert not torch.equal(a, b)


def test_lanes_are_uncorrelated():
    z = _z().view(-1)[: (N // 4) * 4].view(-1, 4)
    c = torch.corrcoef(z.T)
    off_diag = c - torch.eye(4, dtype=c.dtype)
    assert off_diag.abs().max() < 5 / math.sqrt(N / 4)


def test_uniform_moments_and_grid():
    v = Z.uniform((N,), 5, 6).double()
    assert v.min() >= 0 and v.max() < 1
    assert abs(v.mean() - 0.5) < 5 * math.sqrt(1 / 12 / N)
    assert abs(v.var() - 1 / 12) < 0.002
    assert torch.equal(v * 2 ** 24, torch.round(v * 2 ** 24))


def test_step_seeds_distinct_and_streams_never_share_blocks():
    seeds = {C.step_seed(123, t) for t in range(10000)}
    assert len(seeds) == 10000
    # The counter embeds (stream, query) in bits that the block index never reaches.
    ctrs = {C.philox_counter(b, q, s, 7) for b in (0, 1, (1 << 48) - 1) for q in (0, 1, 4095)
            for s in range(16)}
    assert len(ctrs) == 3 * 3 * 16


# ----------------------------------------------------------------------------- keys
def test_param_key_stable_and_wrapper_invariant():
    k = Z.param_key("model.layers.0.mlp.up_proj.weight")
    assert k == 0x345B65BAF420F1E5  # BLAKE2b-64, little-endian: a change here breaks every saved log
    import hashlib
    assert k == int.from_bytes(hashlib.blake2b(b"model.layers.0.mlp.up_proj.weight", digest_size=8).digest(),
                               "little")
    assert k == Z.param_key("_orig_mod.model.layers.0.mlp.up_proj.weight")
    assert k == Z.param_key("module.model.layers.0.mlp.up_proj.weight")
    assert k == Z.param_key("model._fsdp_wrapped_module.layers.0.mlp.up_proj.weight")
    assert k != Z.param_key("model.layers.1.mlp.up_proj.weight")
    assert 0 <= k < 2 ** 64
    assert str(Z.param_key("model.layers.0.self_attn.q_proj.weight")) == GOLDEN["rows"][0]["key"]
    with pytest.raises(ValueError):
        Z.param_key("")


# ----------------------------------------------------------------------------- stochastic rounding
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    torch.manual_seed(0)
    m, reps = 257, 4000
    x = (torch.randn(m) * 0.3 + 1.0).float()
    xs = x.repeat(reps)
    r = Z.stochastic_round(xs, dtype, seed=77, key=5).float().view(reps, m).double()
    lo = torch.minimum(r.min(0).values, r.max(0).values)
    hi = r.max(0).values
    assert torch.all((r == lo) | (r == hi)), "SR must return one of the two neighbours"
    ulp = (hi - lo).clamp_min(1e-30)
    p = (x.double() - lo) / ulp
    var = p * (1 - p) * ulp ** 2
    err = (r.mean(0) - x.double()).abs()
    z = err / torch.sqrt(var / reps).clamp_min(1e-30)
    assert z[var > 0].max() < 6, z.max()
    assert torch.all(err[var == 0] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_exact_values_and_specials(dtype):
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 0.25, 1024.0])
    out = Z.stochastic_round(exact, dtype, 1, 1)
    assert torch.equal(out.float(), exact)
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    out = Z.stochastic_round(special, dtype, 1, 1).float()
    assert out[0] == float("inf") and out[1] == float("-inf") and torch.isnan(out[2])


def test_stochastic_rounding_reproducible_and_stream_dependent():
    x = torch.randn(4097) * 1e-2
    a = Z.stochastic_round(x, torch.bfloat16, 9, 9)
    assert torch.equal(a, Z.stochastic_round(x, torch.bfloat16, 9, 9))
    b = Z.stochastic_round(x, torch.bfloat16, 9, 9, stream=C.STREAM_PROBE_SR_NEG)
    assert not torch.equal(a, b)


# ----------------------------------------------------------------------------- op semantics
def test_perturb_equals_formula_fp32():
    t = torch.randn(278011)
    z = Z.perturbation(t, 4, 8, query=2)
    u = t.clone()
    Z.perturb_(u, 4, 1e-3, 8, query=2)
    assert torch.equal(u, t + z * 1e-3)


def test_zo_update_matches_float64_formula():
    torch.manual_seed(1)
    ts = [torch.randn(1037), torch.randn(33, 7)]
    keys, coeffs, lrs, wd = [11, 12], [0.7, -1.3, 0.2], [1e-2, 3e-2], 0.1
    want = []
    for t, k, lr in zip(ts, keys, lrs):
        acc = sum(c * Z.perturbation(t, 99, k, q).double() for q, c in enumerate(coeffs))
        want.append(t.double() - lr * (acc + wd * t.double()))
    got = [t.clone() for t in ts]
    Z.zo_update_(got, 99, keys, coeffs, lrs, wd)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)


def test_fused_restore_update_equals_separate_passes_fp32():
    t = torch.randn(5003)
    a = t.clone()
    Z.perturb_(a, 5, -1e-3, 3)           # the state after the minus probe
    b = a.clone()
    Z.zo_update_(a, 5, 3, [0.5], 1e-2, 0.0, restore_scale=1e-3)
    Z.perturb_(b, 5, 1e-3, 3)
    Z.zo_update_(b, 5, 3, [0.5], 1e-2, 0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-7)


def test_perturbed_copy_leaves_input():
    t = torch.randn(999).bfloat16()
    before = t.clone()
    out = Z.perturbed_copy(t, 1, 1e-2, 4, rounding="stochastic")
    assert torch.equal(t, before) and out.dtype == torch.bfloat16 and not torch.equal(out, t)


def test_offsets_beyond_2_pow_32():
    off = (1 << 32) + 3
    z = Z.perturbation((1000,), 1, 2, offset=off)
    full_row = Z.perturbation((1003,), 1, 2, offset=off - 3)
    assert torch.equal(z, full_row[3:])


@pytest.mark.parametrize("bad, err", [
    (lambda: Z.perturb_([], 1, 1.0, []), "empty"),
    (lambda: Z.perturb_([torch.ones(3, dtype=torch.int32)], 1, 1.0, [1]), "dtype"),
    (lambda: Z.perturb_([torch.randn(4, 4).t()], 1, 1.0, [1]), "contiguous"),
    (lambda: Z.perturb_([torch.randn(4)], -1, 1.0, [1]), "seed"),
    (lambda: Z.perturb_([torch.randn(4)], 1, float("nan"), [1]), "finite"),
    (lambda: Z.perturb_([torch.randn(4)], 1, 1.0, [1, 2]), "one per tensor"),
    (lambda: Z.perturb_([torch.randn(4)], 1, 1.0, [1], dist="uniform"), "dist"),
    (lambda: Z.perturb_([torch.randn(4)], 1, 1.0, [1], offsets=[C.MAX_ELEMENT_INDEX]), r"2\^50"),
    (lambda: Z.perturbation((4,), 1, 1, query=C.MAX_QUERIES), "query"),
    (lambda: Z.zo_update_([torch.randn(4)], 1, [1], [1.0], lr=[1.0, 2.0]), "one per tensor"),
    (lambda: Z.perturb_([torch.randn(4, device="meta")], 1, 1.0, [1]), "meta"),
    (lambda: Z.zo_update_([torch.randn(4)], 1, [1], 0.5, lr=0.1), r"sequence of numbers, one per query"),
])
def test_bad_inputs(bad, err):
    with pytest.raises((ValueError, TypeError), match=err):
        bad()


def test_ops_mutate_parameters_that_require_grad_like_an_optimizer_step():
    """nn.Parameters (requires_grad) are updated in place outside torch.no_grad() as torch.optim does it, and
    the probe copies carry no autograd history."""
    p = torch.nn.Parameter(torch.randn(37))
    want = p.detach().clone()
    Z.perturb_(p, 1, 1e-2, [3])
    Z.perturb_(want, 1, 1e-2, [3])
    assert torch.equal(p.detach(), want) and p.requires_grad and p.grad_fn is None
    Z.zo_update_(p, 1, [3], [0.5], 0.1)
    copy = Z.perturbed_copy(p, 2, 1e-2, [3])
    assert not copy.requires_grad and copy.grad_fn is None


def test_unavailable_backend_says_why():
    with pytest.raises(Z.BackendUnavailable, match="cuda"):
        Z.perturbation((4,), 1, 1, backend="cuda")
    with pytest.raises(Z.BackendUnavailable, match="unknown backend"):
        Z.perturbation((4,), 1, 1, backend="nope")


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("ZOKERNELS_BACKEND", "nope")
    with pytest.raises(Z.BackendUnavailable):
        Z.perturbation((4,), 1, 1)


def test_registry_report_lists_every_backend():
    rep = registry.report(torch.device("cpu"))
    assert set(rep) == set(registry.ORDER) and rep["reference"] == "ok"
