"""Bottleneck adapters (zokernels.adapters): injection into HF Llama / OPT / GPT-2, exact start, save/load,
bad input refused before anything changes, and ZOSGD + replay on adapter parameters without special cases."""
import pytest
import torch

import zokernels
from zokernels.adapters import AdapterError, add_adapters, adapter_names, adapter_state, load_adapters, save_adapters

transformers = pytest.importorskip("transformers")


def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _opt():
    torch.manual_seed(1)
    cfg = transformers.OPTConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                                 num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return transformers.OPTForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(2)
    cfg = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": _llama, "opt": _opt, "gpt2": _gpt2}
IDS = torch.tensor([[3, 17, 5, 42, 9, 11, 60], [8, 1, 33, 2, 27, 14, 6]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("placement,per_block", [("pfeiffer", 1), ("houlsby", 2)])
def test_adapted_model_starts_exactly_as_the_base(arch, placement, per_block):
    model = MODELS[arch]()
    base = _logits(model)
    names = add_adapters(model, placement=placement, reduction=4, activation="gelu")
    assert len(names) == 2 * per_block and names == adapter_names(model)
    assert torch.equal(_logits(model), base)  # up = 0: h + 0 = h in every element
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state(model)) and trainable
    assert all(any(n.startswith(a + ".") for a in names) for n in trainable)
    down = dict(model.named_parameters())[f"{names[0]}.down.weight"]
    assert down.shape == (8, 32)  # d / r = 32 / 4


def test_a_moved_adapter_changes_the_output_only_through_the_adapter():
    model = _llama()
    base = _logits(model)
    names = add_adapters(model, reduction=8)
    with torch.no_grad():
        dict(model.named_parameters())[f"{names[-1]}.up.weight"].normal_()
    assert not torch.equal(_logits(model), base)


def test_dtype_device_and_float32_option():
    model = _llama(torch.bfloat16)
    base = _logits(model)
    add_adapters(model, reduction=8)
    assert {p.dtype for p in adapter_state(model).values()} == {torch.bfloat16}
    model = _llama(torch.bfloat16)
    add_adapters(model, reduction=8, float32=True, layer_norm=True)
    assert {p.dtype for p in adapter_state(model).values()} == {torch.float32}
    assert torch.equal(_logits(model), base)


def test_save_and_load_roundtrip_and_refusals(tmp_path):
    a = _llama()
    names = add_adapters(a, reduction=8)
    with torch.no_grad():
        for p in adapter_state(a).values():
            p.normal_()
    save_adapters(a, tmp_path / "ad.safetensors")
    b = _llama()
    add_adapters(b, reduction=8)
    load_adapters(b, tmp_path / "ad.safetensors")
    assert torch.equal(_logits(a), _logits(b))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ad.safetensors"), "pt") as f:
        assert all(any(k.startswith(n + ".") for n in names) for k in f.keys())  # adapter weights only

    c = _llama()
    add_adapters(c, reduction=4)
    before = {n: p.clone() for n, p in adapter_state(c).items()}
    with pytest.raises(AdapterError, match="configuration"):
        load_adapters(c, tmp_path / "ad.safetensors")
    assert all(torch.equal(before[n], p) for n, p in adapter_state(c).items())
    d = _llama()
    add_adapters(d, placement="houlsby", reduction=8)
    with pytest.raises(AdapterError):
        load_adapters(d, tmp_path / "ad.safetensors")
    with pytest.raises(AdapterError, match="no adapters"):
        load_adapters(_llama(), tmp_path / "ad.safetensors")


@pytest.mark.parametrize("kwargs,match", [
    (dict(placement="middle"), "placement"),
    (dict(reduction=0), "reduction"),
    (dict(reduction=64), "no bottleneck"),
    (dict(activation="swish7"), "activation"),
])
def test_bad_options_are_refused_before_anything_changes(kwargs, match):
    model = _llama()
    with pytest.raises(AdapterError, match=match):
        add_adapters(model, **kwargs)
    assert adapter_names(model) == [] and all(p.requires_grad for p in model.parameters())


def test_unknown_architecture_and_adding_twice():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
    with pytest.raises(AdapterError, match=r"know the architectures \['gpt2', 'llama', 'opt'\]"):
        add_adapters(Net())
    model = _llama()
    add_adapters(model)
    with pytest.raises(AdapterError, match="already has adapters"):
        add_adapters(model)
    assert len(adapter_names(model)) == 2


def test_zosgd_trains_adapters_only_and_replay_rebuilds_them():
    model = _llama()
    add_adapters(model, reduction=8)
    base = {n: p.clone() for n, p in model.named_parameters()}
    labels = IDS.clone()
    opt = zokernels.ZOSGD(model, lr=1e-2, eps=1e-3, seed=3)

    def closure():
        return model(input_ids=IDS, labels=labels).loss

    for _ in range(3):
        opt.step(closure)
    trained = dict(model.named_parameters())
    adapters = set(adapter_state(model))
    assert all(torch.equal(base[n], p) for n, p in trained.items() if n not in adapters)
    assert any(not torch.equal(base[n], trained[n]) for n in adapters)
    fresh = _llama()
    add_adapters(fresh, reduction=8)
    zokernels.replay(fresh, opt.log)
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters())


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_layers_puts_adapters_in_the_last_blocks_only(arch):
    from zokernels.adapters import first_adapted_block

    model = MODELS[arch]()
    base = _logits(model)
    names = add_adapters(model, placement="houlsby", reduction=4, layers=1)
    assert len(names) == 2 and all(".1." in n for n in names)  # block 1 of 2, attention and MLP
    assert first_adapted_block(model) == 1 and model.zo_adapter_config.layers == 1
    assert torch.equal(_logits(model), base)


def test_layers_out_of_range_refused_before_anything_changes():
    model = _llama()
    for layers, match in ((3, "2 decoder blocks"), (-1, "layers must be"), (True, "layers must be")):
        with pytest.raises(AdapterError, match=match):
            add_adapters(model, layers=layers)
        assert not adapter_names(model) and all(p.requires_grad for p in model.parameters())


def test_load_refuses_adapters_saved_for_other_layers(tmp_path):
    a, b = _llama(), _llama()
    add_adapters(a, reduction=4, layers=1)
    add_adapters(b, reduction=4)
    save_adapters(a, tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match="configuration"):
        load_adapters(b, tmp_path / "a.safetensors")
