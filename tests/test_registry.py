"""The op registry: ops declared once, backends registered, one dispatch policy that explains itself.

Quantized-weight and matmul ops have their own registry tests in test_quant_kernels.py / test_quant_matmul.py."""
import pytest
import torch

import zokernels
from zokernels import ops
from zokernels.backends import registry
from zokernels.backends.registry import BackendUnavailable
from zokernels.mazo.masks import rows_from_columns

CPU = torch.device("cpu")


def _x(n=37, dtype=torch.float32):
    return torch.randn(n, dtype=torch.float64).to(dtype)


def _mask(shape=(5, 9)):
    return rows_from_columns(shape, torch.tensor([[0, 3, 8]] * shape[0]))


def test_every_registration_is_a_declared_op_and_reference_implements_all():
    declared = registry.declared()
    for name in registry.ORDER:
        registry._load(name)
    for op, impls in registry._impls.items():
        assert op in declared, f"{sorted(impls)} register {op!r}, which no zokernels.ops module declares"
    for op in declared:
        assert "reference" in registry.implementations(op), op


def test_table_gives_a_reason_in_every_cell_that_cannot_run():
    table = registry.table(CPU)
    assert set(table) == set(registry.declared())
    for op, row in table.items():
        assert set(row) == set(registry.ORDER)
        assert row["reference"] == "ok"
        assert all(cell and (cell == "ok" or len(cell) > 10) for cell in row.values()), row
        assert row["cuda"] != "ok"  # CPU tensors


@pytest.mark.parametrize("call", [
    lambda b: ops.perturb_(_x(), 1, 1e-3, 5, backend=b),
    lambda b: ops.perturbed_copy(_x(), 1, 1e-3, 5, backend=b),
    lambda b: ops.zo_update_(_x(), 1, 5, [0.5], 1e-3, backend=b),
    lambda b: ops.perturbation((3, 4), 1, 5, backend=b),
    lambda b: ops.masked_perturb_(_x(45).view(5, 9), _mask(), 1, 1e-3, 5, backend=b),
    lambda b: ops.masked_zo_update_(_x(45).view(5, 9), _mask(), 1, 5, [0.5], 1e-3, backend=b),
], ids=["perturb_", "perturbed_copy", "zo_update_", "perturbation", "masked_perturb_", "masked_zo_update_"])
def test_explicit_backend_that_cannot_run_lists_every_reason(call, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable) as info:
        call("cuda")
    msg = str(info.value)
    assert "cannot run on backend 'cuda'" in msg and "CUDA tensors" in msg
    for name in registry.ORDER:
        assert f"{name}: " in msg, (name, msg)
    assert "torch: torch does not implement" in msg and "reference: ok" in msg
    with pytest.raises(BackendUnavailable, match="torch does not implement"):
        call("torch")


def test_auto_records_the_backend_that_ran():
    registry._last.pop(("zo_update_", "cpu"), None)
    ops.zo_update_(_x(), 1, 5, [0.5], 1e-3)
    assert registry.last_backend("zo_update_", CPU) == "reference"


def test_env_variable_stands_in_for_auto_and_is_named_in_errors(monkeypatch):
    monkeypatch.setenv(registry.BACKEND_ENV, "cuda")
    with pytest.raises(BackendUnavailable, match=r"from \$ZOKERNELS_BACKEND; unset it"):
        ops.perturb_(_x(), 1, 1e-3, 5)
    ops.perturb_(_x(), 1, 1e-3, 5, backend="reference")  # an explicit argument wins over the variable


def _fake_torch_perturb(monkeypatch, fail=False):
    """Register a 'torch' perturb_ that runs float32 only (a per-call capability) and counts its calls."""
    calls = []

    def fn(group, seed, scale, query, dist, rounding, sr_stream):
        if fail:
            raise RuntimeError("kernel failed")
        calls.append(group.dtype)
        registry._impls["perturb_"]["reference"].fn(group, seed, scale, query, dist, rounding, sr_stream)

    def supports(device, call):
        return None if call.get("dtype") == torch.float32 else f"float32 only, not {call.get('dtype')}"

    monkeypatch.setitem(registry._impls["perturb_"], "torch", registry.Impl("perturb_", "torch", fn, supports))
    return calls


def test_auto_takes_the_first_backend_that_can_run_this_call(monkeypatch):
    calls = _fake_torch_perturb(monkeypatch)
    a, b = _x(), _x(dtype=torch.bfloat16)
    a0, b0 = a.clone(), b.clone()
    ops.perturb_([a, b], 1, 1e-2, [5, 6])
    assert calls == [torch.float32]  # bf16 group: torch cannot, the reference ran it
    ops.perturb_(a0, 1, 1e-2, 5, backend="reference")
    assert torch.equal(a, a0) and not torch.equal(b, b0)
    with pytest.raises(BackendUnavailable, match=r"float32 only, not torch.bfloat16"):
        ops.perturb_(b, 1, 1e-2, 6, backend="torch")


def test_auto_never_hides_a_failure_of_the_backend_it_chose(monkeypatch):
    _fake_torch_perturb(monkeypatch, fail=True)
    x = _x()
    before = x.clone()
    with pytest.raises(RuntimeError, match="kernel failed"):
        ops.perturb_(x, 1, 1e-2, 5)  # torch comes before reference in ORDER and claims float32
    assert torch.equal(x, before)


def test_backends_register_their_kernels_not_attributes():
    """A registered kernel is found through the registry; a backend module attribute is not a capability."""
    for op in ("perturb_", "masked_zo_update_"):
        impls = registry.implementations(op)
        assert {"reference", "triton"} <= set(impls)
        assert "cuda" in impls  # registered whether or not the module is built; unavailable_reason says why


# ----------------------------------------------------------------------------- validation (issue 14, items 3 and 7)
def test_ops_refuse_a_tensor_listed_twice():
    x = _x()
    with pytest.raises(zokernels.OpError, match="same memory"):
        ops.perturbed_copy([x, x], 1, 1e-3, [5, 6])
    before = x.clone()
    for call in (lambda: ops.perturb_([x, x], 1, 1e-3, [5, 6]),
                 lambda: ops.zo_update_([x, x], 1, [5, 6], [1.0], 1e-3),
                 lambda: ops.masked_perturb_([x.view(1, -1), x.view(1, -1)],
                                             [_mask((1, 37)), _mask((1, 37))], 1, 1e-3, [5, 6])):
        with pytest.raises(zokernels.OpError, match="same memory"):
            call()
    assert torch.equal(x, before)


def test_ops_refuse_overlapping_views_and_outs_that_alias_inputs():
    base = _x(40)
    with pytest.raises(zokernels.OpError, match="overlap"):
        ops.perturb_([base[0:10], base[5:15]], 1, 1e-3, [5, 6])
    ops.perturb_([base[0:10], base[10:20]], 1, 1e-3, [5, 6])  # adjacent views are fine
    x, y = _x(), _x()
    with pytest.raises(zokernels.OpError, match="overlap|same memory"):
        ops.perturbed_copy([x, y], 1, 1e-3, [5, 6], outs=[y, torch.empty_like(y)])
    out = torch.empty_like(x)
    with pytest.raises(zokernels.OpError, match="same memory"):
        ops.perturbed_copy([x, y], 1, 1e-3, [5, 6], outs=[out, out])


@pytest.mark.parametrize("call", [
    lambda x: ops.perturb_(x, 1, 1e39, 5),
    lambda x: ops.zo_update_(x, 1, 5, [1.0], 1e39),
    lambda x: ops.zo_update_(x, 1, 5, [1e39], 1e-3),
    lambda x: ops.zo_update_(x, 1, 5, [1.0], 1e-3, weight_decay=-1e39),
    lambda x: ops.perturbed_copy(x, 1, -1e39, 5),
], ids=["scale", "lr", "coeff", "weight_decay", "copy-scale"])
def test_ops_refuse_scalars_that_overflow_float32(call):
    x = _x()
    before = x.clone()
    with pytest.raises(zokernels.OpError, match="overflows float32"):
        call(x)
    assert torch.equal(x, before)
    ops.perturb_(x, 1, 3.0e38, 5)  # within float32 range: accepted
