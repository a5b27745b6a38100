"""ZOTrainer and label-position scoring on tiny randomly initialised HF Llama models (CPU, seconds)."""
import copy
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

import zokernels  # noqa: E402
from zokernels.hf.scoring import (PromptTask, VerbalizerCollator, VerbalizerObjective,  # noqa: E402
                                  candidate_scores, label_position_logits)
from zokernels.hf.trainer import ZOTrainer  # noqa: E402

VOCAB = 61


class CharTokenizer:
    """A deterministic stand-in tokenizer: one token per character (ids 2..VOCAB-1), pad 0, bos 1."""
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        ids = [2 + (ord(ch) * 7) % (VOCAB - 2) for ch in text]
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + ids)

    def save_pretrained(self, path):  # the Trainer saves the collator's tokenizer with each checkpoint
        pass


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


TEXTS = ["good stuff", "awful day", "love it!!", "hate this", "fine, great", "terrible bad", "nice", "no",
         "wonderful time here", "worst ever", "ok", "bad bad bad", "yes yes", "sad", "happy days", "meh."]
EXAMPLES = [{"text": t, "label": "pos" if i % 2 == 0 else "neg"} for i, t in enumerate(TEXTS)]


def collator(verbalizer=None):
    task = PromptTask(template="Text: {text} Label:", verbalizer=verbalizer or {"pos": " yes", "neg": " no"},
                      max_text_tokens=12)
    return VerbalizerCollator(CharTokenizer(), task)


def reference_scores(model, batch):
    """The same scores through the full tokens x vocab logits (model(...).logits)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp = torch.log_softmax(logits.double(), -1)
    picked = logp[batch["target_row"], batch["target_pos"], batch["target_token"]]
    n_ex = batch["label"].numel()
    n_cand = int(batch["target_cand"].max()) // n_ex + 1
    return torch.zeros(n_ex * n_cand, dtype=torch.float64).index_add_(0, batch["target_cand"], picked).view(n_ex, -1)


def test_untested_transformers_release_is_warned_about():
    from zokernels.hf import trainer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer._warn_if_untested_transformers("5.17.0")
        trainer._warn_if_untested_transformers("5.25.0")
    for version in ("4.46.0", "5.26.0"):
        with pytest.warns(UserWarning, match=f"tested with transformers >=5.17,<5.26 .*, this is {version}") as rec:
            trainer._warn_if_untested_transformers(version)
        assert rec[0].filename == __file__


@pytest.mark.parametrize("verbalizer", [None, {"pos": " great", "neg": " bad"}], ids=["single-token", "multi-token"])
def test_label_position_logits_equal_full_logits(verbalizer):
    model = tiny_llama().eval()
    col = collator(verbalizer)
    batch = col(EXAMPLES[:5])
    assert batch["attention_mask"].min() == 0  # right padding is exercised
    with torch.no_grad():
        got = candidate_scores(model, batch)
        want = reference_scores(model, batch)
        rows = label_position_logits(model, batch["input_ids"], batch["attention_mask"], batch["target_row"],
                                     batch["target_pos"])
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert got.shape == (5, 2)
    assert rows.shape == (batch["target_row"].numel(), VOCAB)
    torch.testing.assert_close(rows, full[batch["target_row"], batch["target_pos"]].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # multi-token words: each candidate row holds prompt + word, scored at len(word) positions
    if verbalizer:
        assert batch["input_ids"].shape[0] == 10 and batch["target_row"].numel() == 5 * (6 + 4)


def test_objectives():
    model = tiny_llama().eval()
    batch = collator()(EXAMPLES[:8])
    with torch.no_grad():
        scores = candidate_scores(model, batch)
        lm = VerbalizerObjective("lm")(model, batch)
        acc = VerbalizerObjective("accuracy")(model, batch)
        ce = VerbalizerObjective("ce")(model, batch)
    labels = batch["label"]
    assert torch.isclose(lm, -scores[torch.arange(8), labels].mean())
    assert torch.isclose(acc, 1 - (scores.argmax(1) == labels).float().mean())
    assert torch.isclose(ce, -torch.log_softmax(scores, 1)[torch.arange(8), labels].mean())
    with pytest.raises(ValueError, match="objective must be one of"):
        VerbalizerObjective("f1")


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_trainer(model, out, objective=None, **overrides):
    zo = {k: overrides.pop(k) for k in list(overrides) if k.startswith("zo_")}
    kw = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
              logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False,
              disable_tqdm=True, seed=3, data_seed=3)
    kw.update(overrides)
    return ZOTrainer(model=model, args=TrainingArguments(**kw), train_dataset=ListDataset(EXAMPLES),
                     data_collator=collator(), objective=objective or VerbalizerObjective("lm"), zo_eps=1e-2, **zo)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_zotrainer_changes_only_trainable_params(tmp_path):
    model = tiny_llama()
    frozen = {n for n, _ in model.named_parameters() if "layers.0." in n or "embed" in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    before = snapshot(model)
    trainer = make_trainer(model, tmp_path)
    trainer.train()
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(before) - frozen
    assert trainer.state.global_step == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(l > 0 for l in losses)
    assert len(trainer.zo_optimizer.log.steps) == 3


def test_zotrainer_lora_changes_only_lora_params(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    make_trainer(model, tmp_path, max_steps=2).train()
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # lora_B starts at zero, so step 1 moves only B; step 2 moves A too (g * z has no zero entries)
    assert changed == trainable


def test_default_objective_is_the_models_lm_loss(tmp_path):
    class LMDataset(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(2, VOCAB, (9,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids.clone()}

    model = tiny_llama()
    before = snapshot(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             logging_steps=1)
    trainer = ZOTrainer(model=model, args=args, train_dataset=LMDataset())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(3.0 < l < 5.0 for l in losses)  # ~ln(61) = 4.1 for a random model
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_gradient_accumulation_probes_whole_window_with_same_z(tmp_path):
    """GA = 2: one ZO step whose probes each run over both micro-batches (same z); the update equals a
    manual ZOSGD step whose closure averages the objective over the two micro-batches."""
    model = tiny_llama()
    init = copy.deepcopy(model)
    seen = []
    base = VerbalizerObjective("lm")

    class Recording:
        def __call__(self, m, batch):
            seen.append({k: v.clone() for k, v in batch.items()})
            return base(m, batch)

    trainer = make_trainer(model, tmp_path, objective=Recording(), max_steps=1, gradient_accumulation_steps=2,
                           per_device_train_batch_size=3)
    trainer.train()
    assert trainer.state.global_step == 1
    # 2 probes (+eps, -eps) x 2 micro-batches, in window order for each probe
    assert len(seen) == 4
    b1, b2 = seen[0], seen[1]
    assert not torch.equal(b1["input_ids"], b2["input_ids"]) or not torch.equal(b1["label"], b2["label"])
    for x, y in ((seen[2], b1), (seen[3], b2)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h][0]

    opt = zokernels.ZOSGD(init, lr=1e-2, eps=1e-2, seed=3)
    manual_loss = opt.step(lambda: (base(init, b1) + base(init, b2)) / 2)
    for (n, p), (n2, q) in zip(model.named_parameters(), init.named_parameters()):
        assert n == n2 and torch.equal(p, q), n
    assert abs(logged - float(manual_loss)) < 1e-5
    record = trainer.zo_optimizer.log.steps[0]
    assert record.seed == opt.log.steps[0].seed and record.grads == opt.log.steps[0].grads


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    full = tiny_llama(seed=1)
    part = copy.deepcopy(full)
    make_trainer(full, tmp_path / "full", max_steps=4).train()

    first = make_trainer(part, tmp_path / "ckpt", max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    ckpt = tmp_path / "ckpt" / "checkpoint-2"
    assert (ckpt / "optimizer.pt").is_file()
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(state["zosgd"]["log"]["seeds"]) == 2  # the fine-tune log travels with the checkpoint

    resumed_model = tiny_llama(seed=99)  # weights come from the checkpoint
    resumed = make_trainer(resumed_model, tmp_path / "ckpt", max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (n, p), (_, q) in zip(full.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(p, q), n
    assert len(resumed.zo_optimizer.log.steps) == 4


def test_evaluate_reports_accuracy(tmp_path):
    model = tiny_llama()
    trainer = make_trainer(model, tmp_path)
    trainer.eval_dataset = ListDataset(EXAMPLES[:6])
    trainer.compute_metrics = lambda ev: {"accuracy": float((ev.predictions.argmax(-1) == ev.label_ids).mean())}
    metrics = trainer.evaluate()
    with torch.no_grad():
        batch = collator()(EXAMPLES[:6])
        want = (candidate_scores(model.eval(), batch).argmax(1) == batch["label"]).float().mean().item()
    assert metrics["eval_accuracy"] == pytest.approx(want)
    assert metrics["eval_loss"] > 0


def test_accuracy_objective_trains(tmp_path):
    model = tiny_llama()
    before = snapshot(model)
    trainer = make_trainer(model, tmp_path, objective=VerbalizerObjective("accuracy"), max_steps=2)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(0.0 <= l <= 1.0 for l in losses)
    assert len(trainer.zo_optimizer.log.steps) == 2
    assert before.keys() == snapshot(model).keys()


def test_fp16_refused_and_checkpointing_ignored(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    args.fp16 = True
    with pytest.raises(ValueError, match="fp16 mixed precision"):
        ZOTrainer(model=tiny_llama(), args=args, train_dataset=ListDataset(EXAMPLES), data_collator=collator())
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], gradient_checkpointing=True)
    with pytest.warns(UserWarning, match="checkpointing ignored"):
        trainer = ZOTrainer(model=tiny_llama(), args=args, train_dataset=ListDataset(EXAMPLES),
                            data_collator=collator())
    assert not trainer.args.gradient_checkpointing


def test_bf16_model_trains(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    before = snapshot(model)
    make_trainer(model, tmp_path, max_steps=2, learning_rate=5e-2).train()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_select_trainable_modes():
    from zokernels.hf.tuning import select_trainable, trainable_count

    def names(m):
        return sorted(n for n, p in m.named_parameters() if p.requires_grad)

    assert names(select_trainable(tiny_llama(), "final-norm")) == ["model.norm.weight"]
    norms = names(select_trainable(tiny_llama(), "norms"))
    assert len(norms) == 2 * 2 + 1 and all("norm" in n for n in norms)
    model = tiny_llama()
    assert trainable_count(select_trainable(model, "all"))[0] == sum(p.numel() for p in model.parameters())
    pytest.importorskip("peft", reason="peft is not installed")
    a = select_trainable(tiny_llama(), "lora", lora_r=2, seed=5)
    b = select_trainable(tiny_llama(), "lora", lora_r=2, seed=5)
    lora = names(a)
    assert lora and all("lora_" in n for n in lora)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n  # seeded adapter init: replay needs the same starting weights


@pytest.mark.parametrize("verbalizer", [None, {"pos": " great", "neg": " bad"}], ids=["single-token", "multi-token"])
def test_frozen_trunk_cache_gives_the_full_forward_scores(verbalizer):
    from zokernels.hf.scoring import FrozenTrunkCache
    from zokernels.hf.tuning import select_trainable

    model = select_trainable(tiny_llama(), "final-norm").eval()
    col = collator(verbalizer)
    with torch.no_grad():
        model.model.norm.weight.add_(torch.randn_like(model.model.norm.weight) * 0.1)
        want = candidate_scores(model, col(EXAMPLES[:6]))
        model.zo_trunk_cache = FrozenTrunkCache(model)
        first = candidate_scores(model, col(EXAMPLES[:6]))          # fills the cache
        n_cached = len(model.zo_trunk_cache.store)
        again = candidate_scores(model, col(EXAMPLES[2:6] + EXAMPLES[:2]))  # other batch layout: all cached
        assert len(model.zo_trunk_cache.store) == n_cached
        torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again, torch.cat([first[2:6], first[:2]]), rtol=0, atol=0)
        # the tuned norm still acts on cached states: a different norm weight gives the full-forward answer
        model.model.norm.weight.mul_(1.5)
        cached = candidate_scores(model, col(EXAMPLES[:6]))
        del model.zo_trunk_cache
        torch.testing.assert_close(cached, candidate_scores(model, col(EXAMPLES[:6])), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(cached, first)


def test_frozen_trunk_cache_refuses_a_trainable_trunk():
    from zokernels.hf.errors import ZOError
    from zokernels.hf.scoring import FrozenTrunkCache

    with pytest.raises(ZOError, match="frozen trunk"):
        FrozenTrunkCache(tiny_llama())


@pytest.mark.parametrize("first_layer", [1, 2, 3])
def test_layer_input_cache_equals_the_full_forward(first_layer):
    """Cached layer-L inputs + layers L.. give the full forward's scores. Bitwise in float32: the tail
    sees bit-identical inputs at every real position, and with right padding + causal attention the
    pad positions (zeros in the cached batch) get exactly zero attention weight from real tokens."""
    from zokernels.hf.scoring import LayerInputCache

    model = tiny_llama(layers=3).eval()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(f"model.layers.{first_layer}.") or "layers" not in n and "norm" in n)
    col = collator()
    layouts = [EXAMPLES[:6], EXAMPLES[2:6] + EXAMPLES[:2], EXAMPLES[4:10]]  # filled, all cached, half cached
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        want = [candidate_scores(model, col(b)) for b in layouts]
        model.zo_trunk_cache = cache = LayerInputCache(model, first_layer)
        calls.clear()
        got = candidate_scores(model, col(layouts[0]))
        assert len(calls) == 1 and len(cache) == 12  # one full forward fills (2 candidate rows per example)
        calls.clear()
        got = [got] + [candidate_scores(model, col(b)) for b in layouts[1:]]
        assert len(calls) == 1 and len(cache) == 20  # the half-cached batch fills only its 8 new rows
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        if first_layer < 3:  # the tuned layers still act: changing one changes the cached-path answer
            model.model.layers[first_layer].mlp.down_proj.weight.mul_(1.5)
            moved = candidate_scores(model, col(layouts[2]))
            del model.zo_trunk_cache
            torch.testing.assert_close(moved, candidate_scores(model, col(layouts[2])), rtol=0, atol=0)
            assert not torch.allclose(moved, got[2])


def test_layer_input_cache_keeps_the_graph_under_autograd():
    """A batch that is all new fills the cache with a no_grad full forward; under autograd that output
    must not stand in (it has no graph): the result carries gradients to the tuned layers, equal to
    the uncached model's."""
    from zokernels.hf.scoring import LayerInputCache

    model = tiny_llama(layers=3).eval()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("model.layers.2."))
    batch = collator()(EXAMPLES[:4])
    tuned = model.model.layers[2].mlp.down_proj.weight

    candidate_scores(model, batch).sum().backward()
    want = tuned.grad.clone()
    tuned.grad = None
    model.zo_trunk_cache = LayerInputCache(model, 2, verify=False)
    scores = candidate_scores(model, batch)  # every row missing: the fill path
    assert scores.requires_grad
    scores.sum().backward()
    torch.testing.assert_close(tuned.grad, want, rtol=1e-5, atol=1e-6)


def test_layer_input_cache_refusals():
    from zokernels.hf.errors import ZOError
    from zokernels.hf.scoring import LayerInputCache

    model = tiny_llama(layers=3)
    with pytest.raises(ZOError, match="layers 0..1 frozen"):
        LayerInputCache(model, 2)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ZOError, match=r"first_layer must be in \[1, 3\]"):
        LayerInputCache(model, 0)
    cache = LayerInputCache(model, 1)
    ids = torch.tensor([[0, 0, 5, 6], [3, 4, 5, 6]])
    with pytest.raises(ZOError, match="right-padded"):
        cache.decoder_output(ids, torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))

    class Reversed(type(model.model)):  # a decoder that does not call its layers in order
        def forward(self, input_ids=None, attention_mask=None, **kw):
            h = self.embed_tokens(input_ids)
            pos = torch.arange(h.shape[1])[None]
            pe = self.rotary_emb(h, position_ids=pos)
            for layer in reversed(self.layers):
                h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
            return SimpleNamespace(last_hidden_state=self.norm(h))

    model.model.__class__ = Reversed
    with torch.no_grad(), pytest.raises(ZOError, match="does not fit"):
        LayerInputCache(model, 2).decoder_output(ids, None)


def quantized_tiny_llama(seed=0, fmt="int8"):
    from zokernels.quant import quantize_model

    model = tiny_llama(seed=seed)
    quantize_model(model, fmt, exclude=("lm_head",), group_size=32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def qsnapshot(model):
    from zokernels.quant import quant_layers

    return {n: m.qweight.view(torch.uint8).clone() for n, m in quant_layers(model)}


def test_zotrainer_quzo_trains_the_named_quant_layers_only_and_replays(tmp_path):
    from zokernels.quant.quzo import QuZO, replay_quzo

    model = quantized_tiny_llama()
    base = copy.deepcopy(model)
    floats = snapshot(model)
    before = qsnapshot(model)
    names = [n for n in before if n.startswith("model.layers.1.")]
    trainer = make_trainer(model, tmp_path, max_steps=4, learning_rate=0.5, zo_quant_layers=names,
                           zo_backend="reference")
    trainer.train()
    opt = trainer.zo_optimizer
    assert isinstance(opt, QuZO) and opt.log.names == names and len(opt.log.steps) == 4
    assert opt.backend == "reference"   # zo_backend reaches QuZO too
    after = qsnapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(names)
    assert all(torch.equal(floats[n], p) for n, p in model.named_parameters())  # norms, embeddings frozen
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(l > 0 for l in losses)
    replay_quzo(base, opt.log)  # the log (full-model names) rebuilds the trained weights bitwise
    assert all(torch.equal(a, b) for a, b in zip(qsnapshot(base).values(), after.values()))


def test_zotrainer_quzo_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    full = quantized_tiny_llama(seed=1)
    part = copy.deepcopy(full)
    make_trainer(full, tmp_path / "full", max_steps=4, learning_rate=0.5).train()
    make_trainer(part, tmp_path / "ckpt", max_steps=4, learning_rate=0.5, save_strategy="steps", save_steps=2).train()
    ckpt = tmp_path / "ckpt" / "checkpoint-2"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(state["quzo"]["log"]["seeds"]) == 2  # the fine-tune log travels with the checkpoint
    resumed_model = quantized_tiny_llama(seed=99)  # weights (int8 buffers) come from the checkpoint
    resumed = make_trainer(resumed_model, tmp_path / "ckpt", max_steps=4, learning_rate=0.5,
                           save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert qsnapshot(full).keys() == qsnapshot(resumed_model).keys()
    for (n, a), b in zip(qsnapshot(full).items(), qsnapshot(resumed_model).values()):
        assert torch.equal(a, b), n
    assert len(resumed.zo_optimizer.log.steps) == 4


def test_zotrainer_quantized_model_method_choice(tmp_path):
    from zokernels.optim import ZOSGD

    model = quantized_tiny_llama()
    model.model.norm.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="32 float parameters that require grad stay frozen"):
        make_trainer(model, tmp_path, max_steps=1, learning_rate=0.5).train()
    qbefore, norm_before = qsnapshot(model), model.model.norm.weight.detach().clone()
    trainer = make_trainer(model, tmp_path, max_steps=2, zo_method="zosgd")  # norm on the frozen int8 base
    trainer.train()
    assert isinstance(trainer.zo_optimizer, ZOSGD)
    assert all(torch.equal(a, b) for a, b in zip(qbefore.values(), qsnapshot(model).values()))
    assert not torch.equal(norm_before, model.model.norm.weight)
    with pytest.raises(ValueError, match="no weight decay"):
        make_trainer(model, tmp_path, max_steps=1, weight_decay=0.1).train()
    with pytest.raises(ValueError, match="not found"):
        make_trainer(model, tmp_path, max_steps=1, zo_quant_layers=["model.embed_tokens"]).train()
    with pytest.raises(ValueError, match="needs a quantized model"):
        make_trainer(tiny_llama(), tmp_path, max_steps=1, zo_method="quzo").train()
