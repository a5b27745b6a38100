"""ZOSGD: one step equals MeZO written out with materialized z; probes are drift-free; the SPSA estimate
points along the true gradient (fp32 and bf16); loss falls on a tiny LLaMA; bad inputs fail clearly."""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import zokernels as Z
from zokernels import contract as C

BACKEND = "reference"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(dtype=torch.float32, layers=1):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_opt(dtype=torch.float32):
    from transformers import OPTConfig, OPTForCausalLM
    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=32,
                                    word_embed_proj_dim=16)).to(dtype)


def lm_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 7), generator=g)
    return {"input_ids": ids, "labels": ids}


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


# ----------------------------------------------------------------------------- one step == MeZO
def mezo_step(model, loss_of, theta, seed, eps, lr_of, wd_of, n_queries, one_sided, keys):
    """MeZO's algorithm written out: materialized z_q, losses at theta +- eps z_q, SGD step."""
    z = [{n: Z.perturbation(t, seed, keys[n], query=q, backend=BACKEND) for n, t in theta.items()}
         for q in range(n_queries)]

    def loss_at(sign, q):
        shifted = {n: t + sign * eps * z[q][n] for n, t in theta.items()}
        return float(loss_of(lambda *a: functional_call(model, shifted, a)))

    base = float(loss_of(lambda *a: functional_call(model, theta, a))) if one_sided else None
    grads = [(loss_at(+1, q) - base) / eps if one_sided else (loss_at(+1, q) - loss_at(-1, q)) / (2 * eps)
             for q in range(n_queries)]
    new = {n: t - lr_of[n] * (sum(g / n_queries * z[q][n] for q, g in enumerate(grads)) + wd_of[n] * t)
           for n, t in theta.items()}
    return grads, new


@pytest.mark.parametrize("n_queries,one_sided,probe,atol", [
    (1, False, "hooks", 1e-6), (3, False, "hooks", 1e-6), (2, True, "swap", 1e-6), (3, False, "inplace", 2e-5)])
def test_step_equals_mezo(n_queries, one_sided, probe, atol):
    torch.manual_seed(10)
    model = SmallNet()
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    loss_of = lambda f: ((f(x) - y) ** 2).mean()
    decay = [model.fc1.weight, model.fc2.weight]
    no_decay = [model.fc1.bias, model.fc2.bias, model.norm.weight, model.norm.bias]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Z.ZOSGD([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 0.02}],
                  lr=0.05, eps=1e-3, n_queries=n_queries, seed=99, backend=BACKEND, model=model, probe=probe,
                  one_sided=one_sided)
    assert opt.config.probe == probe
    lr_of = {n: (0.05 if n.endswith("weight") and n.startswith("fc") else 0.02) for n in theta}
    wd_of = {n: (0.1 if n.endswith("weight") and n.startswith("fc") else 0.0) for n in theta}
    model.train()
    loss = opt.step(lambda: loss_of(model))
    seed = C.step_seed(99, 0)
    rec = opt.log.steps[0]
    assert rec.seed == seed and rec.lr == (0.05, 0.02) and rec.wd == (0.1, 0.0) and not rec.skipped
    grads, want = mezo_step(model, loss_of, theta, seed, 1e-3, lr_of, wd_of, n_queries, one_sided, opt.keys)
    assert rec.grads == pytest.approx(grads, rel=1e-4 if probe == "inplace" else 1e-6)
    moved = 0.0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=0, atol=atol)
        moved = max(moved, float((p.detach() - theta[n]).abs().max()))
    assert moved > 1e-3  # a real step, far above the tolerance
    assert math.isfinite(float(loss)) and loss.dtype == torch.float32


# ----------------------------------------------------------------------------- drift-free probes
@pytest.mark.parametrize("probe", ["hooks", "swap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("build", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_lr0_probes_leave_weights_bitwise(build, dtype, probe):
    torch.manual_seed(20)
    model = build(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Z.ZOSGD(model, lr=0.0, eps=1e-2, seed=3, backend=BACKEND, probe=probe)
    batch = lm_batch()
    for _ in range(5):
        opt.step(lambda: model(**batch).loss)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    assert len({r.grads for r in opt.log.steps}) == 5 and all(g != 0 for r in opt.log.steps for g in r.grads)


def test_inplace_bf16_drifts_as_documented():
    torch.manual_seed(21)
    model = tiny_llama(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Z.ZOSGD(model, lr=0.0, eps=1e-2, seed=3, backend=BACKEND, probe="inplace")
    batch = lm_batch()
    for _ in range(2):
        opt.step(lambda: model(**batch).loss)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------- the estimator
class FlatMLP(nn.Module):
    """A 10-12-4 tanh MLP whose weights live in one flat vector (d = 184): one contract key, so the
    reference backend's per-call cost (~2.6 ms, size-independent at this scale) is paid once per probe."""

    SHAPES = ((12, 10), (12,), (4, 12), (4,))

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        d = sum(math.prod(s) for s in self.SHAPES)
        self.flat = nn.Parameter((torch.randn(d, generator=g) * 0.3).to(dtype))

    def forward(self, x, flat=None):
        flat = (self.flat if flat is None else flat).float()  # weights stored in dtype, math in fp32
        parts, i = [], 0
        for s in self.SHAPES:
            parts.append(flat[i:i + math.prod(s)].view(s))
            i += math.prod(s)
        w1, b1, w2, b2 = parts
        return torch.tanh(x @ w1.T + b1) @ w2.T + b2


@pytest.mark.parametrize("dtype,eps", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
def test_spsa_estimate_aligns_with_autograd(dtype, eps):
    torch.manual_seed(30)
    model = FlatMLP(dtype)
    x, y = torch.randn(64, 10), torch.randn(64, 4)
    loss_of = lambda flat=None: ((model(x, flat) - y) ** 2).mean()
    # Gaussian SPSA: E|g_hat - g|^2 = (d + 1)|g|^2 / Q, so cosine ~ 1/sqrt(1 + (d + 1)/Q) ~ 0.9 here.
    # (d ~ 2k would need Q ~ 8k queries: ~70 s of reference-backend Philox; the ratio is what matters.)
    steps, q = 2, 384
    opt = Z.ZOSGD(model, lr=0.0, eps=eps, n_queries=q, seed=4, backend=BACKEND, probe="swap")
    for _ in range(steps):
        opt.step(lambda: loss_of())
    key = opt.keys["flat"]
    estimate = torch.zeros(model.flat.numel(), dtype=torch.float64)
    for rec in opt.log.steps:
        for qi, g in enumerate(rec.grads):
            estimate += g * Z.perturbation(model.flat, rec.seed, key, query=qi, backend=BACKEND).double()
    estimate /= steps * q
    flat32 = model.flat.detach().float().requires_grad_()
    loss_of(flat32).backward()
    cos = torch.nn.functional.cosine_similarity(estimate, flat32.grad.double(), dim=0)
    assert cos >= 0.8, float(cos)


# ----------------------------------------------------------------------------- training
def test_tiny_llama_loss_falls():
    torch.manual_seed(0)
    model = tiny_llama()
    batch = lm_batch()
    opt = Z.ZOSGD(model, lr=1e-2, seed=11, backend=BACKEND)
    losses = [float(opt.step(lambda: model(**batch).loss)) for _ in range(100)]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first - 0.3, (first, last)


def test_lr_scheduler_drives_logged_lr():
    model = SmallNet()
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    opt = Z.ZOSGD(model, lr=0.1, seed=1, backend=BACKEND)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(5):
        opt.step(lambda: ((model(x) - y) ** 2).mean())
        sched.step()
    assert [r.lr[0] for r in opt.log.steps] == [0.1, 0.1, 0.05, 0.05, 0.025]


def test_param_forms_and_names():
    model = SmallNet()
    by_module = Z.ZOSGD(model, lr=0.1, seed=1, backend=BACKEND)
    named = Z.ZOSGD(list(model.named_parameters()), lr=0.1, seed=1, backend=BACKEND)
    tensors_with_model = Z.ZOSGD(list(model.parameters()), lr=0.1, seed=1, backend=BACKEND, model=model)
    assert by_module.keys == named.keys == tensors_with_model.keys
    assert by_module.keys["fc1.weight"] == Z.param_key("fc1.weight")
    assert by_module.config.probe == "hooks" and named.config.probe == "swap"
    with pytest.warns(UserWarning, match="order"):
        bare = Z.ZOSGD(list(model.parameters()), lr=0.1, seed=1, backend=BACKEND)
    assert list(bare.keys) == [f"param.{i}" for i in range(6)]
    frozen = SmallNet()
    frozen.fc1.requires_grad_(False)
    assert "fc1.weight" not in Z.ZOSGD(frozen, lr=0.1, backend=BACKEND).keys


def test_frozen_parameters_stay_frozen_in_every_param_form():
    """An nn.Parameter with requires_grad=False is never perturbed or updated, however it is passed (the
    torch.optim idiom opt(model.parameters()) on a partly frozen model, e.g. PEFT); plain tensors are trained."""
    torch.manual_seed(3)
    x = torch.randn(8, 6)
    for form in ("module", "parameters", "named", "groups", "model="):
        model = SmallNet()
        model.fc1.requires_grad_(False)
        params = {"module": model, "parameters": model.parameters(), "named": model.named_parameters(),
                  "groups": [{"params": list(model.parameters()), "lr": 0.2}], "model=": model.parameters()}[form]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unnamed parameters: keys by position
            opt = Z.ZOSGD(params, lr=0.1, seed=1, backend=BACKEND, model=model if form == "model=" else None)
        assert len(opt.keys) == 4 and not any(n.startswith("fc1.") for n in opt.keys), (form, list(opt.keys))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(2):
            opt.step(lambda: model(x).pow(2).mean())
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]) == n.startswith("fc1."), (form, n)
    plain = torch.randn(5)
    opt = Z.ZOSGD([("plain", plain)], lr=0.1, seed=1, backend=BACKEND)
    keep = plain.clone()
    opt.step(lambda: plain.sum() ** 2)
    assert not torch.equal(plain, keep)
    with pytest.raises(ValueError, match="requires_grad=False"):
        Z.ZOSGD([p for p in SmallNet().requires_grad_(False).parameters()], lr=0.1, backend=BACKEND)


def test_step_time_hyperparameters_and_closure_values():
    """lr / weight_decay are checked again at every step (a scheduler or a hand edit may change them): negative,
    non-finite or beyond float32 (the kernels' type) is refused before any weight moves; numpy scalars and
    one-element tensors are numbers; the closure may return a numpy float; warnings point at the caller."""
    import numpy as np
    model = SmallNet()
    x = torch.randn(8, 6)
    opt = Z.ZOSGD(model, lr=np.float32(0.1), seed=1, backend=BACKEND)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for key, value in (("weight_decay", -5.0), ("lr", 1e39), ("lr", float("nan")), ("lr", "0.1")):
        keep = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        with pytest.raises(ValueError, match=key):
            opt.step(lambda: model(x).pow(2).mean())
        opt.param_groups[0][key] = keep
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    for lr in (torch.tensor(0.05), np.array(0.05)):
        opt.param_groups[0]["lr"] = lr
        opt.step(lambda: np.float32(model(x).pow(2).mean().item()))
        assert opt.log.steps[-1].lr == (pytest.approx(0.05),) and not opt.log.steps[-1].skipped
    with pytest.raises(TypeError, match="real scalar"):
        opt.step(lambda: torch.tensor(1 + 2j))
    calls = []

    def huge():  # L+ - L- = 2e36 (float32): g ~ 1e39 is beyond float32
        calls.append(1)
        return model(x).pow(2).mean() * 0 + (1e36 if len(calls) % 2 else -1e36)

    with pytest.warns(RuntimeWarning, match=r"gradients \(9\.99\d*e\+38,\) overflow float32; the step was skipped") as rec:
        opt.step(huge)
    assert all(w.filename == __file__ for w in rec), [w.filename for w in rec]


def test_seed_none_uses_os_entropy_not_torch_rng():
    net_a, net_b = SmallNet(), SmallNet()
    state = torch.random.get_rng_state()
    a = Z.ZOSGD(net_a, lr=0.1, backend=BACKEND)
    b = Z.ZOSGD(net_b, lr=0.1, backend=BACKEND)
    assert a.base_seed != b.base_seed
    assert torch.equal(state, torch.random.get_rng_state())


# ----------------------------------------------------------------------------- non-finite losses
@pytest.mark.parametrize("probe", ["hooks", "inplace"])
def test_nan_loss_skips_step(probe):
    torch.manual_seed(40)
    model = tiny_llama(torch.bfloat16)
    batch = lm_batch()
    opt = Z.ZOSGD(model, lr=1e-2, seed=8, backend=BACKEND, probe=probe)
    opt.step(lambda: model(**batch).loss)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def nan_on_minus():
        calls.append(1)
        loss = model(**batch).loss
        return loss * float("nan") if len(calls) == 2 else loss

    with pytest.warns(RuntimeWarning, match="skipped"):
        loss = opt.step(nan_on_minus)
    assert math.isnan(float(loss))
    rec = opt.log.steps[-1]
    assert rec.skipped and len(opt.log.steps) == 2
    if probe == "hooks":  # drift-free: nothing to undo, bitwise unchanged
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), before[n]), n
    else:  # in place: restored up to MeZO's rounding drift, and the stop point is logged
        assert rec.stop == 1
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach().float(), before[n].float(), rtol=0, atol=0.05)
    opt.step(lambda: model(**batch).loss)
    assert not opt.log.steps[-1].skipped


def test_nan_loss_raise_mode():
    model = SmallNet()
    x = torch.randn(8, 6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Z.ZOSGD(model, lr=0.1, seed=2, backend=BACKEND, nonfinite="raise")
    with pytest.raises(Z.NonFiniteLoss, match="skipped"):
        opt.step(lambda: model(x).sum() * float("inf"))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])
    assert opt.log.steps[-1].skipped


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    model = SmallNet()
    with pytest.raises(TypeError, match="int64"):
        Z.ZOSGD([("w", torch.zeros(3, dtype=torch.int64))], lr=0.1, backend=BACKEND)
    with pytest.raises(ValueError, match="contiguous"):
        Z.ZOSGD([("w", nn.Parameter(torch.randn(4, 3)).t())], lr=0.1, backend=BACKEND)
    with pytest.raises(ValueError, match="empty"):
        Z.ZOSGD([], lr=0.1, backend=BACKEND)
    frozen = SmallNet().requires_grad_(False)
    with pytest.raises(ValueError, match="empty"):
        Z.ZOSGD(frozen, lr=0.1, backend=BACKEND)
    for kw, match in [({"lr": -1.0}, "lr"), ({"lr": 0.1, "eps": 0.0}, "eps"), ({"lr": 0.1, "n_queries": 0}, "n_queries"),
                      ({"lr": 0.1, "dist": "cauchy"}, "dist"), ({"lr": 0.1, "probe": "magic"}, "probe"),
                      ({"lr": 0.1, "nonfinite": "ignore"}, "nonfinite")]:
        with pytest.raises(ValueError, match=match):
            Z.ZOSGD(model, backend=BACKEND, **kw)
    with pytest.raises(ValueError, match="hooks"):
        Z.ZOSGD(list(model.named_parameters()), lr=0.1, backend=BACKEND, probe="hooks")
    if not torch.cuda.is_available():
        with pytest.raises(Z.BackendUnavailable, match="cuda"):
            Z.ZOSGD(model, lr=0.1, backend="cuda")
    opt = Z.ZOSGD(model, lr=0.1, seed=1, backend=BACKEND)
    x = torch.randn(8, 6)
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: model(x))
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="scalar"):
        opt.step(lambda: None)
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))]})
