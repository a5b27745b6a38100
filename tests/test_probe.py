"""Drift-free probes see exactly the materialized perturbed weights: hooks (tied weights, LoRA, GPT-2
Conv1D, modules called twice), whole-forward swap, the dispatch-mode check that catches parameters read
outside their owner (nn.MultiheadAttention), and cleanup after exceptions."""
import copy
import warnings

import pytest
import torch
from torch import nn

import zokernels as Z
from zokernels import contract as C

BACKEND = "reference"
EPS = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- tiny models
def tiny_llama(dtype=torch.float32, tie=True, layers=1):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM
    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def tiny_lora_llama():
    from peft import LoraConfig, get_peft_model
    return get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.0))


class MHANet(nn.Module):
    """nn.MultiheadAttention reads out_proj.weight in its own forward (out_proj is never called)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 64)

    def forward(self, input_ids, labels):
        h = self.emb(input_ids)
        a, _ = self.mha(h, h, h, need_weights=False)
        logits = self.head(a + h)
        return nn.functional.cross_entropy(logits.reshape(-1, 64).float(), labels.reshape(-1))


class Reuse(nn.Module):
    """A Linear called twice per forward, and a parent that owns a parameter used around a child call."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.shared = nn.Linear(16, 16)
        self.scale = nn.Parameter(torch.rand(16) + 0.5)
        self.head = nn.Linear(16, 64)

    def forward(self, input_ids, labels):
        h = self.emb(input_ids) * self.scale
        h = torch.tanh(self.shared(torch.tanh(self.shared(h)))) * self.scale
        logits = self.head(h)
        return nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1))


class CachedAlias(nn.Module):
    """Keeps a transposed view of its weight: drift-free probes cannot perturb what it reads."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16))
        self.weight_t = self.weight.detach().t()

    def forward(self, x, labels=None):
        return (x @ self.weight_t).square().mean()


def model_loss(model, batch):
    out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out.loss


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 7), generator=g)
    return {"input_ids": ids, "labels": ids}


def probe_losses(model, batch, **kw):
    """One lr=0 step; returns (optimizer, every loss the closure saw, in order)."""
    seen = []

    def closure():
        loss = model_loss(model, batch)
        seen.append(float(loss))
        return loss

    opt = Z.ZOSGD(model, lr=0.0, eps=EPS, seed=1234, backend=BACKEND, **kw)
    opt.step(closure)
    return opt, seen


def materialized_loss(model, opt, sign, query=0, step=0):
    """The loss of a deepcopy whose trainable params are replaced by perturbed_copy(...)."""
    ref = copy.deepcopy(model)
    seed = opt.log.steps[step].seed
    stream = C.STREAM_PROBE_SR_POS if sign > 0 else C.STREAM_PROBE_SR_NEG
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in opt.keys:
                p.copy_(Z.perturbed_copy(p, seed, sign * EPS, opt.keys[name], query=query,
                                         rounding=opt.config.probe_rounding, sr_stream=stream, backend=BACKEND))
        ref.eval()
        return float(model_loss(ref, make_batch()))


def assert_close_loss(got, want):
    assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (got, want)


MODELS = {
    "llama_tied": tiny_llama,
    "llama_bf16": lambda: tiny_llama(torch.bfloat16),
    "opt": tiny_opt,
    "gpt2_conv1d": tiny_gpt2,
    "lora_llama": tiny_lora_llama,
    "reuse": Reuse,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_hook_probe_equals_materialized(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    batch = make_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no parameter may need the whole-forward fallback here
        opt, seen = probe_losses(model, batch)
    assert opt.config.probe == "hooks"
    assert len(seen) == 2
    lp, lm = seen
    assert lp != lm
    assert_close_loss(lp, materialized_loss(model, opt, +1))
    assert_close_loss(lm, materialized_loss(model, opt, -1))
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks


def test_tied_and_lora_keys():
    llama = tiny_llama()
    opt = Z.ZOSGD(llama, lr=0.0, seed=1, backend=BACKEND)
    assert "lm_head.weight" not in opt.keys and "model.embed_tokens.weight" in opt.keys  # one key per Parameter
    lora = tiny_lora_llama()
    opt = Z.ZOSGD(lora, lr=0.0, seed=1, backend=BACKEND)
    assert opt.keys and all("lora_" in n for n in opt.keys)
    assert all(k == Z.param_key(n) for n, k in opt.keys.items())


def test_swap_probe_equals_materialized():
    torch.manual_seed(1)
    model = tiny_llama(torch.bfloat16)
    batch = make_batch()
    opt, seen = probe_losses(model, batch, probe="swap")
    assert opt.config.probe == "swap"
    assert_close_loss(seen[0], materialized_loss(model, opt, +1))
    assert_close_loss(seen[1], materialized_loss(model, opt, -1))


def test_one_sided_probe_sees_base_then_plus():
    torch.manual_seed(2)
    model = tiny_opt()
    batch = make_batch()
    model.eval()
    with torch.no_grad():
        base = float(model_loss(model, batch))
    opt, seen = probe_losses(model, batch, one_sided=True, n_queries=2)
    assert len(seen) == 3 and seen[0] == base
    assert_close_loss(seen[1], materialized_loss(model, opt, +1, query=0))
    assert_close_loss(seen[2], materialized_loss(model, opt, +1, query=1))
    assert opt.log.steps[0].grads[1] == pytest.approx((seen[2] - base) / EPS, rel=1e-12)


def test_mha_out_proj_caught_by_dispatch_check():
    torch.manual_seed(3)
    model = MHANet()
    batch = make_batch()
    with pytest.warns(UserWarning, match=r"mha\.out_proj\.weight"):
        opt, seen = probe_losses(model, batch)
    assert len(seen) == 3  # the flagged probe was recomputed
    lp, lm = seen[-2:]
    assert lp != lm
    assert_close_loss(lp, materialized_loss(model, opt, +1))
    assert_close_loss(lm, materialized_loss(model, opt, -1))
    assert abs(seen[0] - lp) > 1e-9  # the unverified hook probe really was wrong
    # Later steps use the whole-forward set directly, silently, and stay right.
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: seen.append(float(model_loss(model, batch))) or model_loss(model, batch))
    assert len(seen) == 2
    assert_close_loss(seen[0], materialized_loss(model, opt, +1, step=1))


def test_mha_without_verification_is_wrong():
    # Shows what the check protects against (and that the test above can fail).
    torch.manual_seed(3)
    model = MHANet()
    batch = make_batch()
    opt, seen = probe_losses(model, batch, verify_probes="never")
    assert abs(seen[0] - materialized_loss(model, opt, +1)) > 1e-9


def test_cached_alias_raises_instead_of_wrong_g():
    model = CachedAlias()
    x = torch.randn(4, 16)
    before = model.weight.detach().clone()
    opt = Z.ZOSGD(model, lr=1e-2, seed=5, backend=BACKEND)
    with pytest.warns(UserWarning), pytest.raises(Z.ProbeError, match="inplace"):
        opt.step(lambda: model(x))
    assert torch.equal(model.weight, before)
    assert opt.log.steps[0].skipped


def test_exception_inside_forward_restores_and_removes_hooks():
    torch.manual_seed(4)
    model = tiny_llama(torch.bfloat16, layers=2)
    batch = make_batch()
    before = {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    calls = {"n": 0}

    def boom(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:  # during the L- forward, mid-network (later layers' params untouched yet)
            raise RuntimeError("boom")

    handle = model.model.layers[0].mlp.register_forward_hook(boom)
    opt = Z.ZOSGD(model, lr=1e-2, seed=6, backend=BACKEND)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(lambda: model_loss(model, batch))
    handle.remove()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.data_ptr() == before[n][1], n
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    assert model.training  # restored
    assert opt.log.steps[-1].skipped
    opt.step(lambda: model_loss(model, batch))  # the optimizer stays usable
    assert not opt.log.steps[-1].skipped


def test_eval_mode_during_probes_and_restored():
    model = tiny_llama()
    model.train()
    model.model.layers[0].train(False)  # a mixed setting must come back as it was
    modes = []
    opt = Z.ZOSGD(model, lr=1e-3, seed=7, backend=BACKEND)
    batch = make_batch()
    opt.step(lambda: modes.append(any(m.training for m in model.modules())) or model_loss(model, batch))
    assert modes == [False, False]
    assert model.training and not model.model.layers[0].training and model.lm_head.training
