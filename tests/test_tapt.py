"""Task-adaptive pretraining (zokernels.hf.tapt and `finetune --tapt-steps`): the text it sees (never a dev or test
text), the LM objective against the model's own loss in float64, the stage's records, replay of TAPT then
fine-tuning, --resume, --adapter-layers with the layer-input cache, and bad input refused before the model load."""
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

from test_cli import error_lines, run_cli  # noqa: E402
from test_cli_adapters import argv as adapter_argv, tiny  # noqa: E402,F401  (tiny: the fixture)

from zokernels.hf import pipeline as stages  # noqa: E402
from zokernels.hf.data import Example  # noqa: E402
from zokernels.hf.errors import ZOError  # noqa: E402
from zokernels.hf.tapt import (CausalLMObjective, TextLMCollator, heldout_lm_loss, tapt_seed,  # noqa: E402
                               unlabeled_texts)


def argv(tiny, out, *extra):
    return adapter_argv(tiny, out, "--lr", "1e-2", "--save-model", "no", *extra)


def tiny_model(tiny, dtype=torch.float64):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny[0]).to(dtype), AutoTokenizer.from_pretrained(tiny[0])


# ----------------------------------------------------------------------------- the text
def test_unlabeled_texts_drop_every_held_out_text_and_put_train_first():
    ex = [Example(t, "x") for t in ["a", "b", "c", "d", "b", "e", "f"]]
    held = [Example("b", "y"), Example("e", "y")]           # "b" occurs twice in the corpus: both copies out
    texts = unlabeled_texts(ex, held, first=[Example("f", "x"), Example("b", "x")], seed=3)
    assert texts[0] == "f" and sorted(texts) == ["a", "c", "d", "f"]
    assert unlabeled_texts(ex, held, seed=3, n=2) == unlabeled_texts(ex, held, seed=3)[:2]
    assert unlabeled_texts(ex, held, seed=3) != unlabeled_texts(ex, held, seed=4) or len(texts) < 3
    with pytest.raises(ZOError, match="no unlabeled text"):
        unlabeled_texts([Example("b", "x")], held)


def test_no_test_text_reaches_tapt_even_when_part_of_the_test_split_is_evaluated(tiny, tmp_path):
    from test_cli_stages import config

    cfg = config(tiny, tmp_path / "o", "--tune", "adapters", "--tapt-steps", "1", "--eval-examples", "2")
    path, task, splits = stages.load_task_data(cfg)
    full = stages.load_task_data({**cfg, "eval_examples": 0, "dev_eval_examples": 0})[2]
    held = {e.text for e in full["test"] + full["dev"]}
    assert len(splits["test"]) == 2 and len(full["test"]) == 8
    assert splits["unlabeled"] and not held & set(splits["unlabeled"])
    train = [e.text for e in splits["train"] if e.text not in held]
    assert splits["unlabeled"][:len(dict.fromkeys(train))] == list(dict.fromkeys(train))
    assert splits["unlabeled_dev"] == [e.text for e in full["dev"]][:cfg["tapt_eval_examples"]]


# ----------------------------------------------------------------------------- the objective
def test_causal_lm_objective_is_the_models_own_loss_in_float64(tiny):
    model, tok = tiny_model(tiny)
    texts = ["so good movie the", "bad", "very bad food it was awful day", "love it"]  # "bad": one token, no term
    batch = TextLMCollator(tok, max_tokens=6)(texts)
    assert batch["input_ids"].shape == (4, 6)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)   # float64
        terms = [-logp[r, t, ids[r, t + 1]] for r in range(4) for t in range(int(mask[r].sum()) - 1)]
        want = float(sum(terms) / len(terms))
        hf = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        got = CausalLMObjective()(model, batch)
    assert batch["target_token"].numel() == len(terms) == 3 + 0 + 5 + 1
    # the logits are scored in float32 (label_position_logits), like the model's own loss
    assert abs(float(got) - want) < 1e-6 * want and abs(float(hf) - want) < 1e-6 * want
    # held-out: exp of the token-weighted mean over batches of 3 = the loss over all terms
    heldout = heldout_lm_loss(model, TextLMCollator(tok, 6), texts, batch_size=3)
    assert heldout["tokens"] == 9 and heldout["texts"] == 4
    assert abs(heldout["loss"] - want) < 1e-6 * want and abs(heldout["perplexity"] / math.exp(want) - 1) < 1e-6
    assert heldout_lm_loss(model, TextLMCollator(tok, 6), []) is None


def test_objective_through_the_layer_input_cache_equals_the_full_forward(tiny):
    from zokernels.adapters import add_adapters
    from zokernels.hf.scoring import LayerInputCache

    model, tok = tiny_model(tiny, torch.float32)
    add_adapters(model, reduction=4, layers=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter." in n:
                p.normal_(0, 0.3)                     # adapters that change the output
    batch = TextLMCollator(tok, 8)(["so good movie the day", "very bad food", "it was awful"])
    with torch.no_grad():
        full = CausalLMObjective()(model, batch)
        model.zo_trunk_cache = LayerInputCache(model, 1)
        first, again = CausalLMObjective()(model, batch), CausalLMObjective()(model, batch)
    assert len(model.zo_trunk_cache) == 3
    assert torch.allclose(first, full, rtol=1e-5) and torch.allclose(again, full, rtol=1e-5)


# ----------------------------------------------------------------------------- the CLI stage
def keep_models(monkeypatch):
    kept = {}
    save, tapt = stages.save, stages.tapt

    def save_spy(cfg, tuned, *a, **kw):
        kept["zo"] = {n: p.detach().clone() for n, p in tuned.model.named_parameters()}
        return save(cfg, tuned, *a, **kw)

    def tapt_spy(cfg, model, *a, **kw):
        kept.setdefault("before_tapt", {n: p.detach().clone() for n, p in model.named_parameters()})
        out = tapt(cfg, model, *a, **kw)
        kept.setdefault("after_tapt", {n: p.detach().clone() for n, p in model.named_parameters()})
        return out

    monkeypatch.setattr(stages, "save", save_spy)
    monkeypatch.setattr(stages, "tapt", tapt_spy)
    return kept


def test_tapt_then_finetune_records_the_stage_and_rebuilds_bitwise(capsys, tmp_path, tiny, monkeypatch):
    from zokernels.hf import rebuild_model
    from zokernels.log import FineTuneLog

    out = tmp_path / "out"
    kept = keep_models(monkeypatch)
    code, stdout, err = run_cli(capsys, argv(tiny, out, "--tapt-steps", "3", "--max-steps", "2", "--baseline", "fo",
                                             "--eval-every", "1", "--tapt-lr", "1e-2", "--tapt-eps", "1e-2"))
    assert code == 0, err
    assert "TAPT: 3 steps on" in stdout and "FO TAPT: 3 steps" in stdout
    m = json.loads((out / "metrics.json").read_text())
    t = m["tapt"]
    assert t["steps"] == 3 and t["lr"] == 1e-2 and t["eps"] == 1e-2 and t["texts"] > 0
    assert t["before"]["perplexity"] > 1 and t["after"]["perplexity"] > 1 and t["before"] != t["after"]
    assert 0 <= t["accuracy"]["test"] <= 1 and len(t["curves"]["heldout_loss"]) == 3
    assert m["fo"]["tapt"]["steps"] == 3 and m["fo"]["tapt"]["eps"] is None
    assert m["fo"]["tapt"]["before"] == t["before"]                     # FO TAPT starts from the same weights
    assert m["seconds"]["tapt"] > 0
    cfg = json.loads((out / "run_config.json").read_text())
    assert (cfg["tapt_steps"], cfg["tapt_examples"], cfg["tapt_eval_examples"]) == (3, 1000, 200)
    tapt_log, ft_log = FineTuneLog.load(out / "tapt_log.npz"), FineTuneLog.load(out / "finetune_log.npz")
    assert len(tapt_log.steps) == 3 and len(ft_log.steps) == 2
    assert tapt_log.base_seed == tapt_seed(cfg["seed"]) != ft_log.base_seed
    moved = [n for n, p in kept["after_tapt"].items() if not torch.equal(p, kept["before_tapt"][n])]
    assert moved and all(".adapter." in n for n in moved)              # TAPT moved the adapters, only them
    rebuilt = dict(rebuild_model(out)[0].named_parameters())
    assert rebuilt.keys() == kept["zo"].keys()
    assert all(torch.equal(rebuilt[n], p) for n, p in kept["zo"].items()), "rebuild differs from the trained model"
    os.remove(out / "tapt_log.npz")                                     # the fine-tuning log alone does not fit
    with pytest.raises(Exception):
        rebuild_model(out)


def test_resume_replays_tapt_and_matches_the_uninterrupted_run(capsys, tmp_path, tiny, monkeypatch):
    from transformers import TrainerCallback

    from zokernels import cli
    from zokernels.log import FineTuneLog

    common = ["--tapt-steps", "2", "--max-steps", "3", "--save-steps", "1"]
    code, _, err = run_cli(capsys, argv(tiny, tmp_path / "a", *common))
    assert code == 0, err

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2 and "trainer_tapt" not in args.output_dir:
                raise KeyboardInterrupt

    monkeypatch.setattr(cli, "make_progress_callback", lambda *a: Crash())
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv(tiny, tmp_path / "b", *common))
    monkeypatch.undo()
    code, stdout, err = run_cli(capsys, argv(tiny, tmp_path / "b", *common, "--resume"))
    assert code == 0, err
    assert "TAPT: the interrupted run's 2 steps replayed" in stdout
    for name in ("tapt_log.npz", "finetune_log.npz"):
        a, b = (FineTuneLog.load(tmp_path / d / name) for d in ("a", "b"))
        assert [(r.seed, r.grads) for r in a.steps] == [(r.seed, r.grads) for r in b.steps]
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert ma["tapt"]["after"] == mb["tapt"]["after"] and ma["zo"]["test_accuracy"] == mb["zo"]["test_accuracy"]


def test_adapter_layers_use_the_layer_input_cache_and_rebuild_bitwise(capsys, tmp_path, tiny, monkeypatch):
    from zokernels.hf import rebuild_model

    out = tmp_path / "out"
    kept = keep_models(monkeypatch)
    code, stdout, err = run_cli(capsys, argv(tiny, out, "--adapter-layers", "1", "--tapt-steps", "2",
                                             "--max-steps", "2"))
    assert code == 0, err
    assert "input states of decoder layer 1 are computed once" in stdout
    assert all(".layers.1." in n for n in kept["zo"] if ".adapter." in n)
    rebuilt = dict(rebuild_model(out)[0].named_parameters())
    assert all(torch.equal(rebuilt[n], p) for n, p in kept["zo"].items())


@pytest.mark.parametrize("extra, needle", [
    (["--tapt-lr", "1e-3"], "applies to a TAPT stage only"),
    (["--tapt-steps", "-1"], "--tapt-steps must be >= 0"),
    (["--tapt-steps", "2", "--tapt-eps", "nan"], "--tapt-eps must be a finite number > 0"),
    (["--tapt-steps", "2", "--tapt-lr", "1e39"], "--tapt-lr must be a finite number > 0 within float32"),
    (["--adapter-layers", "-2"], "--adapter-layers must be >= 0"),
])
def test_bad_tapt_options_are_one_error_line(capsys, tmp_path, tiny, extra, needle):
    code, _, err = run_cli(capsys, argv(tiny, tmp_path / "o", *extra))
    assert code == 2 and len(error_lines(err)) == 1 and needle in err, err


def test_tapt_refused_with_quzo_and_without_unlabeled_text(capsys, tmp_path, tiny, monkeypatch):
    from zokernels.hf import data

    loads = []
    monkeypatch.setattr(data, "load_model_and_tokenizer", lambda *a, **k: loads.append(1))
    args = ["all" if a == "adapters" else a for a in argv(tiny, tmp_path / "q", "--tapt-steps", "2", "--quant", "int8")]
    code, _, err = run_cli(capsys, args)
    assert code == 2 and "a QuZO TAPT stage is not implemented" in err, err
    csv = tmp_path / "same.csv"   # two texts only: every train text is also a dev or test text
    csv.write_text("review,label\n" + "".join(f"so good,pos\nvery bad,neg\n" for _ in range(20)))
    code, _, err = run_cli(capsys, argv((tiny[0], str(csv)), tmp_path / "n", "--tapt-steps", "2"))
    assert code == 2 and "TAPT has no unlabeled text" in err and not loads, err


def test_the_documented_zotrainer_recipe_runs_tapt_then_finetuning(tiny, tmp_path):
    """docs/adapters.md §3, on the tiny model: ZO TAPT on unlabeled text, then ZO fine-tuning, one adapter set."""
    from transformers import TrainingArguments

    from zokernels.adapters import add_adapters
    from zokernels.hf import PromptTask, VerbalizerCollator, VerbalizerObjective, ZOTrainer

    model, tok = tiny_model(tiny, torch.float32)
    add_adapters(model, "pfeiffer", 4, "relu")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("up.weight"):
                p.normal_(0, 0.1)      # so that a step on `down` moves the loss (up = 0 at init hides it)
    corpus = [Example(f"so good movie {w}", "pos") for w in ("the", "day", "food", "it", "was")]
    train, dev, test = corpus[:2], corpus[2:3], corpus[3:4]
    texts = unlabeled_texts(corpus, held_out=dev + test, first=train, n=1000, seed=0)
    assert texts[:2] == [e.text for e in train] and len(texts) == 3

    def args(steps, lr):
        return TrainingArguments(str(tmp_path / "out"), max_steps=steps, learning_rate=lr,
                                 per_device_train_batch_size=2, remove_unused_columns=False, report_to=[],
                                 use_cpu=True, save_strategy="no", disable_tqdm=True)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = ZOTrainer(model=model, args=args(2, 1e-2), train_dataset=texts, data_collator=TextLMCollator(tok, 48),
                  objective=CausalLMObjective(), zo_eps=1e-2, zo_seed=tapt_seed(0))
    t.train()
    after_tapt = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = PromptTask(template="Text : {text} Sentiment :", verbalizer={"pos": " good", "neg": " bad"})
    ft = ZOTrainer(model=model, args=args(2, 1e-2), train_dataset=train + [Example("very bad food", "neg")],
                   data_collator=VerbalizerCollator(tok, task), objective=VerbalizerObjective("ce"), zo_eps=1e-2,
                   zo_seed=0)
    ft.train()
    moved = lambda a, b: {n for n in a if not torch.equal(a[n], b[n])}  # noqa: E731
    assert moved(before, after_tapt) and all(".adapter." in n for n in moved(before, after_tapt))
    assert moved(after_tapt, dict(model.named_parameters()))
    assert len(t.zo_optimizer.log.steps) == len(ft.zo_optimizer.log.steps) == 2


def test_tapt_through_the_final_norm_trunk_cache(capsys, tmp_path, tiny):
    """--tune final-norm caches the decoder states before the final norm: TAPT's LM loss reads every real position
    through that cache and moves the norm."""
    from zokernels.log import FineTuneLog

    args = ["final-norm" if a == "adapters" else a for a in argv(tiny, tmp_path / "o", "--tapt-steps", "2",
                                                                 "--max-steps", "1")]
    code, stdout, err = run_cli(capsys, args)
    assert code == 0, err
    assert "frozen trunk: decoder states are computed once" in stdout
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["tapt"]["after"]["perplexity"] != m["tapt"]["before"]["perplexity"]
    assert FineTuneLog.load(tmp_path / "o" / "tapt_log.npz").names == ["model.norm.weight"]
