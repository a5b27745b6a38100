"""The fine-tune log: resume from state_dict is bitwise; replay in a fresh process rebuilds the
fine-tuned weights bitwise (drift-free and in-place probes, skipped and abandoned steps); replay refuses
logs that do not belong to the weights; a 20k-step log is a few hundred KB."""
import copy
import io
import math
import os
import subprocess
import sys

import pytest
import torch

import zokernels as Z
from zokernels import contract as C
from zokernels.log import FineTuneLog, base_fingerprint, tensor_fingerprint
from zokernels.step import StepRecord

BACKEND = "reference"
LLAMA_SRC = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
def tiny_llama(dtype):
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype)
"""


def tiny_llama(dtype):
    """LLAMA_SRC's builder (the one the replay subprocess runs), defined on first use: a module-level exec would
    import transformers at collection, and a missing transformers would then stop `pytest -m gpu` from
    collecting any test."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    scope = {}
    exec(LLAMA_SRC, scope)
    return scope["tiny_llama"](dtype)


pytestmark = pytest.mark.usefixtures("one_thread")


def lm_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 7), generator=g)
    return {"input_ids": ids, "labels": ids}


def make_opt(model, probe, seed=77):
    decay = [(n, p) for n, p in model.named_parameters() if n.endswith("proj.weight")]
    rest = [(n, p) for n, p in model.named_parameters() if not n.endswith("proj.weight")]
    return Z.ZOSGD([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=2e-2,
                   n_queries=2, seed=seed, backend=BACKEND, model=model, probe=probe)


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.int16) if a[k].element_size() == 2 else a[k],
                                                 b[k].view(torch.int16) if b[k].element_size() == 2 else b[k])
        for k in a)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("probe", ["hooks", "inplace"])
def test_resume_from_state_dict_is_bitwise(probe):
    batch = lm_batch()
    closure_of = lambda m: (lambda: m(**batch).loss)
    torch.manual_seed(1)
    base = tiny_llama(torch.bfloat16)

    def run(model, opt, sched, n):
        for _ in range(n):
            opt.step(closure_of(model))
            sched.step()

    a = copy.deepcopy(base)
    opt_a = make_opt(a, probe)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda t: 1.0 / (1 + t))
    run(a, opt_a, sched_a, 6)

    b = copy.deepcopy(base)
    opt_b = make_opt(b, probe)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda t: 1.0 / (1 + t))
    run(b, opt_b, sched_b, 3)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    torch.manual_seed(2)
    c = tiny_llama(torch.bfloat16)  # other initial weights, overwritten by the checkpoint
    c.load_state_dict(ckpt["model"])
    opt_c = make_opt(c, probe, seed=None)
    sched_c = torch.optim.lr_scheduler.LambdaLR(opt_c, lambda t: 1.0 / (1 + t))
    opt_c.load_state_dict(ckpt["opt"])
    sched_c.load_state_dict(ckpt["sched"])
    assert opt_c.base_seed == 77 and opt_c.steps_taken == 3
    run(c, opt_c, sched_c, 3)

    assert bitwise_equal(snapshot(a), snapshot(c))
    assert opt_a.log.steps == opt_c.log.steps and opt_a.log.header == opt_c.log.header
    assert not bitwise_equal(snapshot(a), snapshot(base))


# ----------------------------------------------------------------------------- replay
def train_with_incidents(model, probe):
    """6 steps: step 2 sees a NaN loss on its second forward; step 4 raises inside its third forward."""
    batch = lm_batch()
    opt = make_opt(model, probe)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.8 ** t)
    calls = {"step": 0, "n": 0}

    def closure():
        calls["n"] += 1
        loss = model(**batch).loss
        if calls["step"] == 2 and calls["n"] == 2:
            return loss * float("nan")
        if calls["step"] == 4 and calls["n"] == 3:
            raise KeyboardInterrupt("interrupted mid-probe")
        return loss

    for step in range(6):
        calls.update(step=step, n=0)
        try:
            if step == 2:
                with pytest.warns(RuntimeWarning):
                    opt.step(closure)
            else:
                opt.step(closure)
        except KeyboardInterrupt:
            pass
        sched.step()
    skipped = [r.skipped for r in opt.log.steps]
    assert skipped == [False, False, True, False, True, False]
    return opt


REPLAY_SRC = LLAMA_SRC + """
import sys, zokernels
tmp = sys.argv[1]
for probe in sys.argv[2:]:
    model = tiny_llama(torch.bfloat16)
    model.load_state_dict(torch.load(f"{tmp}/base.pt", weights_only=True))
    zokernels.replay(model, f"{tmp}/{probe}.zolog", backend="reference")
    torch.save({n: p.detach() for n, p in model.named_parameters()}, f"{tmp}/{probe}.replayed.pt")
"""


def test_replay_in_fresh_process_is_bitwise(tmp_path):
    torch.manual_seed(3)
    base = tiny_llama(torch.bfloat16)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    trained = {}
    for probe in ("hooks", "inplace"):
        model = copy.deepcopy(base)
        opt = train_with_incidents(model, probe)
        opt.log.save(tmp_path / f"{probe}.zolog")
        trained[probe] = snapshot(model)
        if probe == "inplace":
            assert [r.stop for r in opt.log.steps] == [-1, -1, 1, -1, 2, -1]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(Z.__file__))))
    subprocess.run([sys.executable, "-c", REPLAY_SRC, str(tmp_path), "hooks", "inplace"], check=True, env=env,
                   timeout=300)
    for probe in ("hooks", "inplace"):
        replayed = torch.load(tmp_path / f"{probe}.replayed.pt", weights_only=True)
        assert bitwise_equal(trained[probe], replayed), probe
        assert not bitwise_equal(trained[probe], snapshot(base))


def test_log_records_the_backend_and_replay_warns_on_another():
    """The header names the backend each device's ops resolved to; replay with the same one is bitwise and
    silent; with another (Triton interpreter vs reference here: float32 libm differences in Gaussian z) it
    warns that the rebuild is not bitwise."""
    import warnings
    from zokernels.backends import registry
    if registry.not_supported("triton", torch.device("cpu")) is not None:
        pytest.skip(f"triton interpreter unavailable: {registry.not_supported('triton', torch.device('cpu'))}")
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(301, generator=g), "b": torch.randn(7, generator=g)}
    params = {n: t.clone() for n, t in base.items()}
    opt = Z.ZOSGD(list(params.items()), lr=0.05, seed=3, backend="triton")
    assert opt.log.header["backends"] == {"cpu": "triton"}
    for _ in range(3):
        opt.step(lambda: (params["w"][:7] * params["b"]).sum() ** 2)
    same = {n: t.clone() for n, t in base.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Z.replay(same, opt.log, backend="triton")
    assert all(torch.equal(same[n], params[n]) for n in base)
    other = {n: t.clone() for n, t in base.items()}
    with pytest.warns(UserWarning, match="not bitwise"):
        Z.replay(other, opt.log, backend="reference")
    assert all(torch.allclose(other[n], params[n], rtol=1e-5, atol=1e-6) for n in base)
    # resumed on another backend: warned, and the log is marked mixed (no single-backend replay is bitwise)
    resumed = Z.ZOSGD(list(params.items()), lr=0.05, seed=3, backend="reference")
    with pytest.warns(UserWarning, match="cannot be bitwise"):
        resumed.load_state_dict(opt.state_dict())
    assert "mixed" in resumed.log.header["backends"]
    with pytest.warns(UserWarning, match="not bitwise"):
        Z.replay({n: t.clone() for n, t in base.items()}, resumed.log, backend="triton")


def test_replay_refuses_foreign_logs(tmp_path):
    torch.manual_seed(4)
    base = tiny_llama(torch.float32)
    model = copy.deepcopy(base)
    opt = make_opt(model, "hooks")
    opt.step(lambda: model(**lm_batch()).loss)
    path = tmp_path / "run.zolog"
    opt.log.save(path)

    wrong_base = copy.deepcopy(base)
    with torch.no_grad():
        wrong_base.model.layers[0].mlp.up_proj.weight[3, 5] += 1e-6
    with pytest.raises(Z.LogMismatch, match="base weights.*up_proj"):
        Z.replay(wrong_base, path, backend=BACKEND)
    with pytest.raises(Z.LogMismatch, match="base weights"):
        Z.replay(model, path, backend=BACKEND)  # already fine-tuned

    log = FineTuneLog.load(path)
    log.header["contract_version"] = C.CONTRACT_VERSION + 1
    with pytest.raises(Z.LogMismatch, match="contract"):
        Z.replay(copy.deepcopy(base), log, backend=BACKEND)
    log = FineTuneLog.load(path)
    name = next(iter(log.header["keys"]))
    log.header["keys"][name] = str(12345)
    with pytest.raises(Z.LogMismatch, match="key table"):
        Z.replay(copy.deepcopy(base), log, backend=BACKEND)
    with pytest.raises(Z.LogMismatch, match="not in the given model"):
        Z.replay([(n, p) for n, p in copy.deepcopy(base).named_parameters() if "norm" not in n], path,
                 backend=BACKEND)

    good = copy.deepcopy(base)
    Z.replay(good, path, backend=BACKEND)  # and the right base is accepted
    assert bitwise_equal(snapshot(good), snapshot(model))


# ----------------------------------------------------------------------------- the file
def test_20k_step_log_is_small_and_round_trips(tmp_path):
    model = tiny_llama(torch.float32)
    opt = make_opt(model, "hooks")
    log = FineTuneLog(opt.log.header)
    log.header["config"]["n_queries"] = 1  # MeZO's setting: Q = 1, decay / no-decay groups, a decaying lr
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(20000, generator=g, dtype=torch.float64).tolist()
    for t in range(20000):
        lr = 1e-6 * (1 - t / 20000)  # a new lr every step
        log.append(StepRecord(C.step_seed(77, t), (grads[t],), (lr, lr), (0.05, 0.0), skipped=(t % 997 == 0),
                              stop=-1))
    path = tmp_path / "big.zolog"
    log.save(path)
    size = os.path.getsize(path)
    # seeds + grads are 20000 * 16 bytes of incompressible data; measured ~0.4 MB in all
    assert 300_000 < size < 512 * 1024, size
    back = FineTuneLog.load(path)
    assert back.steps == log.steps and back.header == log.header
    state_back = FineTuneLog.from_state(log.state())
    assert state_back.steps == log.steps


def test_fingerprint_is_exact():
    x = torch.randn(4099)
    assert tensor_fingerprint(x) == tensor_fingerprint(x.clone())
    y = x.clone()
    y[17] = torch.nextafter(y[17], torch.tensor(math.inf))
    assert tensor_fingerprint(y) != tensor_fingerprint(x)
    z = torch.zeros(8)
    assert tensor_fingerprint(z) != tensor_fingerprint(-z)  # -0.0 has other bits
    swapped = x.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert tensor_fingerprint(swapped) != tensor_fingerprint(x)
    b = x.bfloat16()
    assert base_fingerprint([("w", b)])["digest"] != base_fingerprint([("w", b.half())])["digest"]
    assert base_fingerprint([("module.w", b)]) == base_fingerprint([("w", b)])  # canonical names


# ----------------------------------------------------------------------------- one format, one replay
def test_any_registered_optimizer_logs_and_replays_through_the_one_format(tmp_path):
    """An optimizer outside the package plugs in by registering its config, record type and pure step
    function: its log (extra per-step columns included) saves, loads and replays through zokernels.replay."""
    import dataclasses

    from zokernels import log as L

    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        eps: float
        n_queries: int

    @dataclasses.dataclass(frozen=True)
    class ToyRecord(StepRecord):
        clipped: int = 0

    def bind(named, log, backend):
        return dict(L.named_tensors(named))["w"]

    def apply(w, record, config, backend):
        if not record.skipped:
            w.sub_(record.lr[0] * sum(record.grads) / config.n_queries)

    L.register_optimizer("toy-sgd", config_type=ToyConfig, bind=bind, apply_step=apply, record_type=ToyRecord)
    try:
        header = L.new_header(optimizer="toy-sgd", config={"eps": 1e-3, "n_queries": 2},
                              groups=[{"names": ["w"], "lr": 0.5, "weight_decay": 0.0}], keys={"w": C.param_key("w")},
                              base_seed=7, fingerprint=None, record_type=ToyRecord)
        log = FineTuneLog(header, [ToyRecord(1, (1.0, 3.0), (0.5,), (0.0,), clipped=4),
                                   ToyRecord(2, (math.nan, math.nan), (0.5,), (0.0,), skipped=True)])
        assert header["columns"] == ["clipped"]
        log.save(tmp_path / "toy.npz")
        back = FineTuneLog.load(tmp_path / "toy.npz")
        assert back.optimizer == "toy-sgd" and back.config == ToyConfig(1e-3, 2) and back.steps[0].clipped == 4
        w = torch.ones(3)
        assert Z.replay({"w": w}, tmp_path / "toy.npz") is not None
        assert torch.equal(w, torch.full((3,), 0.0))
        header["optimizer"] = "not-registered"
        with pytest.raises(Z.LogMismatch, match="not-registered.*not registered"):
            Z.replay({"w": w}, FineTuneLog(header, []))
    finally:
        L._OPTIMIZERS.pop("toy-sgd", None)
    (tmp_path / "junk.json").write_text('{"format": "something else"}')
    with pytest.raises(Z.LogMismatch, match="not a zokernels fine-tune log"):
        FineTuneLog.load(tmp_path / "junk.json")


def test_zosgd_and_quzo_write_the_same_versioned_format(tmp_path):
    from zokernels.log import FORMAT, FORMAT_VERSION
    from zokernels.quant.quzo import QuZO, QuZORecord
    from zokernels.quant import quantize_model

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    x = torch.randn(4, 6, generator=g)
    float_opt = Z.ZOSGD(lin, lr=1e-2, seed=1, backend=BACKEND)
    float_opt.step(lambda: lin(x).square().mean())
    quantize_model(lin, "int8", exclude=())
    quant_opt = QuZO(lin, lr=1e-2, eps=1e-2, seed=1, backend=BACKEND)
    quant_opt.step(lambda: lin(x).square().mean())
    for opt, name in ((float_opt, "zosgd"), (quant_opt, "quzo")):
        opt.log.save(tmp_path / f"{name}.npz")
        back = FineTuneLog.load(tmp_path / f"{name}.npz")
        h = back.header
        assert (h["format"], h["format_version"], h["optimizer"]) == (FORMAT, FORMAT_VERSION, name)
        assert h["config"] == dataclasses_asdict(opt.config) and back.config == opt.config
        assert back.base_seed == 1 and len(back) == 1
    assert isinstance(FineTuneLog.load(tmp_path / "quzo.npz").steps[0], QuZORecord)
    assert FineTuneLog.load(tmp_path / "quzo.npz").header["columns"] == ["probe_saturated", "update_saturated"]


def dataclasses_asdict(x):
    import dataclasses
    return dataclasses.asdict(x)
