"""`python -m zokernels finetune` when things go wrong (issue #14): --resume from the final checkpoint runs no
step; a checkpoint is never visible under its checkpoint-N name before it is complete, and --resume takes the
newest complete one; bad options (unwritable --output-dir, --output-dir overlapping --model, --n-queries or
--eps out of the kernels' range) are one `error:` line, exit code 2, before the model is loaded."""
import json
import os
import re
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

from test_cli import _weights, run_cli, tiny_csv, tiny_model_dir  # noqa: E402

from zokernels import cli  # noqa: E402
from zokernels.log import FineTuneLog  # noqa: E402

CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+$")  # what transformers' get_last_checkpoint / rotation look for


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return tiny_model_dir(root / "model"), tiny_csv(root / "d.csv")


def tiny_argv(tiny, *extra):
    model_dir, data = tiny
    return ["--model", model_dir, "--data", data, "--text-column", "review", "--template", "Text : {text} Sentiment :",
            "--verbalizer", "pos= good,neg= bad", "--train-examples", "16", "--dev-examples", "8", "--test-examples",
            "8", "--batch-size", "4", "--eval-every", "0", "--lr", "1e-2", "--device", "cpu", "--no-progress", *extra]


def callback(**hooks):
    """A TrainerCallback with the given on_* methods (each called as hook(state))."""
    from transformers import TrainerCallback

    return type("Hooks", (TrainerCallback,), {name: (lambda fn: lambda self, args, state, control, **kw: fn(state))(fn)
                                              for name, fn in hooks.items()})()


def kill_at(monkeypatch, hook, step):
    """cli.main with a progress callback that raises KeyboardInterrupt at `hook` (e.g. on_save) of `step`."""
    def hit(state):
        if state.global_step == step:
            raise KeyboardInterrupt
    monkeypatch.setattr(cli, "make_progress_callback", lambda *a: callback(**{hook: hit}))


def count_steps(monkeypatch) -> list:
    steps = []
    monkeypatch.setattr(cli, "make_progress_callback",
                        lambda *a: callback(on_step_end=lambda state: steps.append(state.global_step)))
    return steps


def assert_same_run(a, b, steps):
    """Metrics (minus timings), fine-tune log and saved weights of the runs in `a` and `b` are identical."""
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["zo"]["steps"] == mb["zo"]["steps"] == steps
    for key in ("zero_shot", "n_test"):
        assert ma[key] == mb[key], key
    for key in ("test_accuracy", "train_loss", "dev_accuracy", "mcnemar_vs_zero_shot"):
        assert ma["zo"][key] == mb["zo"][key], key
    la, lb = (FineTuneLog.load(d / "finetune_log.npz") for d in (a, b))
    assert len(la.steps) == len(lb.steps) == steps
    assert [(r.seed, r.grads) for r in la.steps] == [(r.seed, r.grads) for r in lb.steps]
    wa, wb = _weights(a / "model"), _weights(b / "model")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------- item 1: resume at max_steps
def test_resume_from_the_final_checkpoint_runs_no_step(capsys, tmp_path, tiny, monkeypatch):
    """Killed after its last checkpoint (step = --max-steps) was written: --resume runs no step, still writes the
    evaluation and metrics.json, and ends bitwise where the uninterrupted run ends (bf16, constant lr)."""
    argv = tiny_argv(tiny, "--max-steps", "6", "--save-steps", "3", "--dtype", "bfloat16", "--lr-scheduler", "constant")
    code, _, err = run_cli(capsys, argv + ["--output-dir", str(tmp_path / "a")])
    assert code == 0, err
    kill_at(monkeypatch, "on_save", 6)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv + ["--output-dir", str(tmp_path / "b")])
    assert os.listdir(tmp_path / "b" / "trainer") == ["checkpoint-6"] and not (tmp_path / "b" / "metrics.json").exists()
    steps = count_steps(monkeypatch)
    code, stdout, err = run_cli(capsys, argv + ["--output-dir", str(tmp_path / "b"), "--resume"])
    assert code == 0, err
    assert steps == []
    assert_same_run(tmp_path / "a", tmp_path / "b", 6)
    assert "checkpoint-6" in stdout and "no step left to run" in stdout, stdout


def test_resume_refuses_a_checkpoint_beyond_max_steps(capsys, tmp_path, tiny, monkeypatch):
    """--max-steps may grow on --resume; below the checkpoint's step it cannot be honoured (steps run cannot be
    undone): refused before the model is loaded instead of running past the checkpoint."""
    argv = tiny_argv(tiny, "--save-steps", "2")
    code, _, err = run_cli(capsys, argv + ["--max-steps", "4", "--output-dir", str(tmp_path / "a")])
    assert code == 0, err
    no_model_load(monkeypatch)
    code, _, err = run_cli(capsys, argv + ["--max-steps", "3", "--output-dir", str(tmp_path / "a"), "--resume"])
    assert code == 2 and err.count("\n") == 1, err
    assert "checkpoint-4 is at step 4, beyond --max-steps 3" in err, err


# ----------------------------------------------------------------------------- item 5: atomic checkpoints
def test_resume_skips_a_partial_checkpoint_and_matches_the_uninterrupted_run(capsys, tmp_path, tiny, monkeypatch):
    """A newer checkpoint-N missing files (what a kill during a non-atomic save leaves) beside a complete older
    one: --resume continues from the older one, says which it skipped, and ends bitwise where the uninterrupted
    run ends."""
    argv = tiny_argv(tiny, "--max-steps", "5", "--save-steps", "2")
    code, _, err = run_cli(capsys, argv + ["--output-dir", str(tmp_path / "a")])
    assert code == 0, err
    kill_at(monkeypatch, "on_step_end", 3)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv + ["--output-dir", str(tmp_path / "b")])
    trainer = tmp_path / "b" / "trainer"
    assert os.listdir(trainer) == ["checkpoint-2"]
    partial = trainer / "checkpoint-4"   # the weights were written, the optimizer / trainer state not yet
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trainer / "checkpoint-2" / name, partial / name)
    steps = count_steps(monkeypatch)
    code, stdout, err = run_cli(capsys, argv + ["--output-dir", str(tmp_path / "b"), "--resume"])
    assert code == 0, err
    assert f"skipped {partial} (incomplete: no trainer_state.json" in stdout, stdout
    assert f"resuming from {trainer / 'checkpoint-2'}" in stdout, stdout
    assert steps == [3, 4, 5]
    assert_same_run(tmp_path / "a", tmp_path / "b", 5)
    assert os.listdir(trainer) == ["checkpoint-5"]   # the Trainer saves at max_steps too; older ones rotated


def test_checkpoint_save_never_exposes_a_partial_checkpoint_name(capsys, tmp_path, tiny, monkeypatch):
    """A save that dies after the weights and the optimizer state are written (before the RNG and trainer
    state) leaves no directory named checkpoint-N: the complete checkpoint before it stays the newest, --resume
    continues from it, and the resumed run's saves clear the dead save's leftovers."""
    from transformers import Trainer

    argv = tiny_argv(tiny, "--max-steps", "6", "--save-steps", "2")
    real = Trainer._save_rng_state

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise RuntimeError("killed during the checkpoint save")
        return real(self, output_dir)
    monkeypatch.setattr(Trainer, "_save_rng_state", dies_at_step_4)
    with pytest.raises(RuntimeError, match="killed during the checkpoint save"):
        cli.main(argv + ["--output-dir", str(tmp_path / "b")])
    trainer = tmp_path / "b" / "trainer"
    assert [n for n in os.listdir(trainer) if CHECKPOINT_NAME.match(n)] == ["checkpoint-2"], os.listdir(trainer)
    monkeypatch.setattr(Trainer, "_save_rng_state", real)
    steps = count_steps(monkeypatch)
    code, stdout, err = run_cli(capsys, argv + ["--output-dir", str(tmp_path / "b"), "--resume"])
    assert code == 0 and f"resuming from {trainer / 'checkpoint-2'}" in stdout, err
    assert steps == [3, 4, 5, 6]
    assert os.listdir(trainer) == ["checkpoint-6"]   # no staging leftovers beside it


def test_best_checkpoint_is_recorded_under_its_published_name(tmp_path):
    """load_best_model_at_end: the best checkpoint the Trainer records (in its state and in every saved
    trainer_state.json) is the renamed checkpoint-N, never the staging directory it was written in."""
    from test_hf import EXAMPLES, ListDataset, collator, tiny_llama
    from transformers import TrainingArguments

    from zokernels.hf import VerbalizerObjective, ZOTrainer

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=3,
                             save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                             load_best_model_at_end=True, metric_for_best_model="loss", save_total_limit=1)
    trainer = ZOTrainer(model=tiny_llama(), args=args, train_dataset=ListDataset(EXAMPLES),
                        eval_dataset=ListDataset(EXAMPLES[:6]), data_collator=collator(),
                        objective=VerbalizerObjective("lm"), zo_eps=1e-2)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert os.path.dirname(best) == str(tmp_path) and CHECKPOINT_NAME.match(os.path.basename(best)), best
    kept = [n for n in os.listdir(tmp_path) if CHECKPOINT_NAME.match(n)]
    assert os.path.basename(best) in kept and not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    for name in kept:
        recorded = json.loads((tmp_path / name / "trainer_state.json").read_text())["best_model_checkpoint"]
        assert os.path.dirname(recorded) == str(tmp_path) and CHECKPOINT_NAME.match(os.path.basename(recorded))


def test_checkpoint_completeness(tmp_path):
    """What --resume accepts: trainer_state.json (the Trainer writes it last) readable and at the directory's
    step, the optimizer / scheduler / RNG state and the weights present and not empty."""
    from zokernels.hf.trainer import checkpoint_problem

    ck = tmp_path / "checkpoint-7"
    ck.mkdir()
    assert checkpoint_problem(str(ck)) == "no trainer_state.json, optimizer.pt, scheduler.pt, rng_state.pth, " \
                                          "model weights"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors"):
        (ck / name).write_bytes(b"x")
    (ck / "trainer_state.json").write_text('{"global_step": 7')
    assert checkpoint_problem(str(ck)) == "trainer_state.json is not readable JSON"
    (ck / "trainer_state.json").write_text('{"global_step": 6}')
    assert checkpoint_problem(str(ck)) == "trainer_state.json is at step 6"
    (ck / "trainer_state.json").write_text('{"global_step": 7}')
    assert checkpoint_problem(str(ck)) is None
    (ck / "optimizer.pt").write_bytes(b"")
    assert checkpoint_problem(str(ck)) == "optimizer.pt is empty"


# ----------------------------------------------------------------------------- item 8: one-line option errors
def no_model_load(monkeypatch):
    """Any model load fails the test: the errors below must come before it."""
    from zokernels.hf import data

    def load(*a, **kw):
        raise AssertionError("the model was loaded before the option error")
    monkeypatch.setattr(data, "load_model_and_tokenizer", load)


def one_error_line(err: str, needle: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


@pytest.mark.parametrize("extra, needle", [
    (["--n-queries", "5000"], "--n-queries must be <= 4096"),
    (["--eps", "1e39"], "--eps must be a finite number > 0 within float32 range"),
    (["--lr", "1e39"], "--lr must be a finite number > 0 within float32 range"),
    (["--weight-decay", "1e39"], "--weight-decay must be a finite number >= 0 within float32 range"),
    (["--seed", "-1"], "--seed must be in [0, 2**32 - 1], got -1"),
    (["--seed", str(2**32)], "--seed must be in [0, 2**32 - 1], got 4294967296"),
    (["--tune", "lora", "--lora-alpha", "nan"], "--lora-alpha must be a finite number, got nan"),
])
def test_out_of_range_numbers_are_refused_before_the_model_load(capsys, tmp_path, tiny, monkeypatch, extra, needle):
    no_model_load(monkeypatch)
    code, _, err = run_cli(capsys, tiny_argv(tiny, "--max-steps", "1", "--output-dir", str(tmp_path / "o"), *extra))
    assert code == 2
    one_error_line(err, needle)
    assert not (tmp_path / "o").exists()


def test_unwritable_output_dir_is_one_error_line(capsys, tmp_path, tiny, monkeypatch):
    """--output-dir that cannot be created or written: /proc (exists, refuses new files), a path in /proc, a path
    under a regular file; each refused before the model load."""
    no_model_load(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [("/proc/zo-out", "--output-dir /proc/zo-out cannot be created"),
             ("/proc", "--output-dir /proc is not writable"),
             (str(a_file / "out"), f"--output-dir {a_file / 'out'} cannot be created"),
             (str(a_file), f"--output-dir {a_file} is not a directory")]
    for out, needle in cases:
        code, _, err = run_cli(capsys, tiny_argv(tiny, "--max-steps", "1", "--output-dir", out))
        assert code == 2, (out, err)
        one_error_line(err, needle)
    assert a_file.read_text() == "x"


def test_output_dir_overlapping_the_model_is_refused(capsys, tmp_path, monkeypatch):
    """--output-dir equal to the --model directory, inside it, or holding it where the run writes (out/model,
    out/trainer): refused before anything is written or loaded; the model directory is left as it was."""
    model_dir = tmp_path / "model"
    tiny = (tiny_model_dir(model_dir), tiny_csv(tmp_path / "d.csv"))
    before = sorted(os.listdir(model_dir))
    capsys.readouterr()   # the tiny model's save messages
    no_model_load(monkeypatch)
    for out, needle in [(model_dir, "is the --model directory"), (model_dir / "run", "lies inside --model"),
                        (model_dir / "sub" / "run", "lies inside --model")]:
        code, _, err = run_cli(capsys, tiny_argv(tiny, "--max-steps", "1", "--output-dir", str(out)))
        assert code == 2, (out, err)
        one_error_line(err, needle)
    assert sorted(os.listdir(model_dir)) == before
    outer = tmp_path / "outer"
    shutil.copytree(model_dir, outer / "trainer" / "base")
    code, _, err = run_cli(capsys, tiny_argv((str(outer / "trainer" / "base"), tiny[1]), "--max-steps", "1",
                                             "--output-dir", str(outer)))
    assert code == 2
    one_error_line(err, f"--model {outer / 'trainer' / 'base'} lies in {outer / 'trainer'}, which this run writes")
    assert sorted(os.listdir(outer)) == ["trainer"]
