"""2:4 semi-structured sparse Linears (zokernels/prune/semistructured.py). CPU: the 2:4 check on crafted tensors,
the per-layer reasons (dtype, 2:4, shape) and the clear errors that leave the model untouched. GPU: a tiny
Llama-shaped fp16/bf16 stack pruned 2:4 by magnitude, converted, against the dense pruned model (logits) and
F.linear with the dense pruned weight (every layer)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zokernels.prune import PruneError, is_two_four, prune, to_semi_structured
from zokernels.prune import semistructured as SS


class Block(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.relu(self.up(h)))


class Stack(nn.Module):
    """Blocks at model.layers (where prune() and to_semi_structured look for them)."""

    def __init__(self, hidden: int = 128, inner: int = 64, layers: int = 2):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Block(hidden, inner) for _ in range(layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for b in self.model.layers:
            h = b(h)
        return h


def _stack(dtype=torch.float16, device="cpu", pattern="2:4", **kw):
    torch.manual_seed(0)
    model = Stack(**kw).to(device=device, dtype=dtype)
    report = prune(model, None, "magnitude", pattern=pattern, progress=False)
    return model, report


def _snapshot(model: nn.Module) -> dict:
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters()}


def _unchanged(model: nn.Module, snap: dict) -> None:
    now = dict(model.named_parameters())
    assert now.keys() == snap.keys()
    for n, (p, values) in snap.items():
        assert now[n] is p and type(p) is nn.Parameter, n
        assert torch.equal(p.detach(), values), n


# ----------------------------------------------------------------------------- CPU
def test_is_two_four_true_on_crafted_tensors():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0],     # 2 and 1 nonzeros
                      [0.0, 0.0, 0.0, 0.0, -1.0, 5.0, 0.0, 0.0],    # 0 and 2
                      [0.0, 7.0, 0.0, -0.0, 4.0, 0.0, 0.0, 9.0]])   # 3 rows (odd); -0.0 is a zero
    assert is_two_four(w) and is_two_four(w.to(torch.bfloat16)) and is_two_four(w.half())
    assert is_two_four(torch.zeros(5, 12))
    torch.manual_seed(0)
    dense = torch.randn(7, 20)
    keep = torch.zeros_like(dense, dtype=torch.bool).view(7, 5, 4)
    keep.scatter_(2, torch.rand(7, 5, 4).topk(2, dim=2).indices, True)
    assert is_two_four(dense * keep.view(7, 20))


def test_is_two_four_false_on_crafted_tensors():
    w = torch.zeros(5, 8)
    w[::2, ::2] = 1.0
    assert is_two_four(w)
    w[4, 4:7] = 1.0                                 # last (odd) row, second group: 3 nonzeros
    assert not is_two_four(w)
    nan = torch.tensor([[float("nan"), 1.0, 0.0, 1.0]])
    assert not is_two_four(nan)                     # NaN counts as a nonzero
    assert not is_two_four(torch.ones(3, 4))
    assert not is_two_four(torch.zeros(3, 6))       # input dim not a multiple of 4
    assert not is_two_four(torch.zeros(8))          # not a matrix
    assert not is_two_four(torch.zeros(2, 3, 4))


@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_layer_problem_names_dtype_pattern_and_shape(backend):
    w = torch.zeros(64, 128)
    w[:, ::2] = 1.0
    assert "float32" in SS.layer_problem(w, backend)
    assert SS.layer_problem(w.half(), backend) is None and SS.layer_problem(w.bfloat16(), backend) is None
    assert "not 2:4" in SS.layer_problem(torch.ones(64, 128, dtype=torch.float16), backend)
    msg = SS.layer_problem(w[:40].half(), backend)   # 40 rows: a multiple of neither 16 nor 32
    assert "shape [out 40, in 128]" in msg and backend in msg
    assert SS.block_shape(torch.float16, backend)[0] in (16, 32)


def test_backend_choice_and_cpu_reason():
    assert SS.resolve_backend("cutlass") == "cutlass" and SS.resolve_backend("cusparselt") == "cusparselt"
    assert SS.resolve_backend() in ("cusparselt", "cutlass")
    with pytest.raises(PruneError, match="backend must be one of"):
        SS.resolve_backend("dense")
    assert SS.backend_problem("cpu") == SS.CPU_MESSAGE


@pytest.mark.parametrize("use_report", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_model_raises_and_changes_nothing(use_report, dtype):
    model, report = _stack(dtype)
    assert len(report.masks) == 4 and all(is_two_four(m.weight) for m in model.modules() if isinstance(m, nn.Linear))
    snap = _snapshot(model)
    with pytest.raises(PruneError, match="need a CUDA GPU; on CPU the pruned linears stay dense") as e:
        to_semi_structured(model, report if use_report else None)
    assert isinstance(e.value, ValueError) and "model.layers.0.up.weight" in str(e.value)
    _unchanged(model, snap)


def test_other_clear_errors_change_nothing():
    model, report = _stack(pattern="unstructured")
    snap = _snapshot(model)
    with pytest.raises(PruneError, match="pattern is 'unstructured'"):
        to_semi_structured(model, report)
    with pytest.raises(PruneError, match="no 2:4-sparse nn.Linear"):
        to_semi_structured(model)                         # 50% unstructured: no weight is 2:4 by chance
    with pytest.raises(PruneError, match="backend must be one of"):
        to_semi_structured(model, backend="dense")
    report.pattern, report.masks = "2:4", {"model.layers.0.nope.weight": None}
    with pytest.raises(PruneError, match="not the weight of an nn.Linear"):
        to_semi_structured(model, report)
    _unchanged(model, snap)


# ----------------------------------------------------------------------------- GPU
def _backend_or_skip(backend: str) -> None:
    why = SS.backend_problem(torch.device("cuda"), backend)
    if why:
        pytest.skip(why)


def _tiny_llama(dtype: torch.dtype):
    """A 2-block Llama (hidden 256, MLP 512, 4 heads of 64; multiples of both backends' blocks) on the GPU."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to("cuda", dtype).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_llama_logits_match_dense_pruned(backend, dtype):
    _backend_or_skip(backend)
    model = _tiny_llama(dtype)
    report = prune(model, None, "magnitude", pattern="2:4", progress=False)
    dense = {n: model.get_submodule(n.removesuffix(".weight")).weight.detach().clone() for n in report.masks}
    ids = torch.randint(0, 128, (3, 37), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    twin = copy.deepcopy(model)
    names = to_semi_structured(model, report, backend=backend)
    assert sorted(names) == sorted(report.masks) and len(names) == 14   # 7 Linears per block
    assert sorted(to_semi_structured(twin, backend=backend)) == sorted(names)   # found without the report
    assert to_semi_structured(model, report, backend=backend) == []              # already converted
    for n in names:
        w = model.get_submodule(n.removesuffix(".weight")).weight
        assert isinstance(w, torch.sparse.SparseSemiStructuredTensor) and not w.requires_grad, n
        assert w.BACKEND == backend
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
    tol = 2e-2 if dtype == torch.float16 else 6e-2   # 2 blocks of fp16 / bf16 rounding, other summation order
    err = float((got - want).abs().max() / want.abs().max())
    assert err < tol, err
    # every converted layer == F.linear with its dense pruned weight (odd token count: padded rows)
    x = torch.randn(3, 37, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(2)).to(dtype)
    for n in names:
        lin = model.get_submodule(n.removesuffix(".weight"))
        xi = x[..., :lin.in_features].contiguous()
        with torch.no_grad():
            y, ref = lin(xi), F.linear(xi, dense[n], lin.bias)
        assert y.shape == ref.shape and y.dtype == dtype
        torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


@pytest.mark.gpu
def test_gpu_clear_errors_change_nothing():
    _backend_or_skip("auto")
    model, report = _stack(torch.float32, "cuda")
    snap = _snapshot(model)
    with pytest.raises(PruneError, match="float32") as e:
        to_semi_structured(model, report)
    assert "model.layers.0.up.weight" in str(e.value)
    _unchanged(model, snap)
    model, report = _stack(torch.float16, "cuda")
    with torch.no_grad():
        model.model.layers[1].down.weight[3, :4] = 1.0    # one group of 4 nonzeros
    snap = _snapshot(model)
    with pytest.raises(PruneError, match=r"model.layers.1.down.weight: not 2:4"):
        to_semi_structured(model, report)
    _unchanged(model, snap)
    model, report = _stack(torch.float16, "cuda", inner=40)   # up: [40, 128], down: [128, 40]
    snap = _snapshot(model)
    with pytest.raises(PruneError, match=r"model.layers.0.up.weight: shape \[out 40, in 128\]"):
        to_semi_structured(model, report)
    _unchanged(model, snap)
