"""Logs and optimizer states written by older zokernels still load and replay bitwise.

tests/data/legacy_logs/ was written by tests/data/legacy_logs/make_fixtures.py at commit e04bf6d (log
format v1 npz for ZOSGD, the QuZO JSON log): ZOSGD float32 (hooks, two queries, a skipped step), bfloat16
(stochastic rounding, in-place probes, a step abandoned mid-probe), MaZO row masks (one-sided), QuZO int8
(paper update). Each replay onto the stored base must give the stored trained weights bit for bit, through
the one `zokernels.replay`, also after the old log is saved again in the current format."""
from pathlib import Path

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

import zokernels as Z  # noqa: E402
from zokernels.mazo import load_masks  # noqa: E402
from zokernels.quant import quantize_model  # noqa: E402

DATA = Path(__file__).parent / "data" / "legacy_logs"
BACKEND = "reference"
ZOSGD_FIXTURES = ("zosgd_fp32", "zosgd_bf16", "zosgd_mazo")
SHAPES = (("a", 5, 7, True), ("b", 7, 13, True), ("c", 13, 3, False))

pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(torch.nn.Module):
    """The module tree of the fixtures' model (its weights come from base.safetensors)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        for name, n_in, n_out, bias in SHAPES:
            setattr(self, name, torch.nn.Linear(n_in, n_out, bias=bias, dtype=dtype))


def load(name: str, what: str) -> dict:
    return safetensors_torch.load_file(DATA / name / f"{what}.safetensors")


def base_model(name: str) -> torch.nn.Module:
    base = load(name, "base")
    model = Tiny(base["a.weight"].dtype) if "a.weight" in base else Tiny()
    if "a.qweight" in base:
        quantize_model(model, "int8", exclude=())
    model.load_state_dict(base, strict=True)
    return model


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(model: torch.nn.Module, name: str) -> None:
    want = load(name, "trained")
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(bits(got[k]), bits(want[k])), (name, k)


def masks_of(name: str):
    path = DATA / name / "masks.safetensors"
    return load_masks(path) if path.exists() else None


@pytest.mark.parametrize("name", ZOSGD_FIXTURES)
def test_v1_zosgd_log_replays_bitwise(name):
    model = base_model(name)
    assert not all(torch.equal(bits(a), bits(b)) for a, b in zip(model.state_dict().values(),
                                                                  load(name, "trained").values()))
    Z.replay(model, DATA / name / "log.npz", backend=BACKEND, masks=masks_of(name))
    assert_bitwise(model, name)


def test_quzo_json_log_replays_bitwise():
    model = base_model("quzo_int8")
    log = Z.replay(model, DATA / "quzo_int8" / "quzo_log.json", backend=BACKEND)
    assert_bitwise(model, "quzo_int8")
    assert log.optimizer == "quzo" and [r.update_saturated > 0 for r in log.steps] == [True] * 4


@pytest.mark.parametrize("name, file", [(n, "log.npz") for n in ZOSGD_FIXTURES] + [("quzo_int8", "quzo_log.json")])
def test_old_logs_saved_again_are_current_and_replay_bitwise(name, file, tmp_path):
    from zokernels.log import FORMAT_VERSION

    old = Z.FineTuneLog.load(DATA / name / file)
    old.save(tmp_path / "log.npz")
    new = Z.FineTuneLog.load(tmp_path / "log.npz")
    assert new.header["format_version"] == FORMAT_VERSION == 2 and new.header == old.header
    assert list(map(repr, new.steps)) == list(map(repr, old.steps))  # repr: NaN grads of skipped steps
    assert new.optimizer == ("quzo" if name == "quzo_int8" else "zosgd")
    model = base_model(name)
    Z.replay(model, tmp_path / "log.npz", backend=BACKEND, **({"masks": masks_of(name)} if masks_of(name) else {}))
    assert_bitwise(model, name)


def test_rebuild_helpers_read_the_old_quzo_log():
    from zokernels.hf.tuning import load_quzo_log

    log = load_quzo_log(DATA / "quzo_int8" / "quzo_log.json")
    model = base_model("quzo_int8")
    Z.replay(model, log, backend=BACKEND)
    assert_bitwise(model, "quzo_int8")


@pytest.mark.parametrize("name", ZOSGD_FIXTURES)
def test_zosgd_state_dict_loads_and_its_log_replays(name):
    """Resume: the saved state_dict loads into an optimizer built like the one that saved it (on the trained
    weights), continues at the saved step, and its log still replays the base to the trained weights."""
    trained = base_model(name)
    trained.load_state_dict(load(name, "trained"))
    decay = [(n, p) for n, p in trained.named_parameters() if n.endswith("weight")]
    rest = [(n, p) for n, p in trained.named_parameters() if not n.endswith("weight")]
    kw = {"zosgd_fp32": dict(n_queries=2), "zosgd_bf16": dict(probe="inplace"),
          "zosgd_mazo": dict(one_sided=True, masks=masks_of(name))}[name]
    opt = Z.ZOSGD([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=0.02,
                  seed=1, backend=BACKEND, model=trained, **kw)
    with pytest.warns(UserWarning, match="no record of the weights"):  # old states: the weight check is skipped
        opt.load_state_dict(torch.load(DATA / name / "state.pt", weights_only=True))
    assert opt.state_dict()["zosgd"]["weights"]["names"] == opt._names  # saved again: with the record
    logged = Z.FineTuneLog.load(DATA / name / "log.npz")
    assert opt.steps_taken == len(logged) and opt.base_seed == int(logged.header["base_seed"])
    model = base_model(name)
    Z.replay(model, opt.log, backend=BACKEND, masks=masks_of(name))
    assert_bitwise(model, name)


def test_quzo_state_dict_loads_and_its_log_replays():
    from zokernels.quant.quzo import QuZO

    trained = base_model("quzo_int8")
    trained.load_state_dict(load("quzo_int8", "trained"))
    opt = QuZO(trained, lr=0.05, eps=1e-2, seed=1, backend=BACKEND, n_queries=2, update="paper")
    with pytest.warns(UserWarning, match="no record of the weights"):
        opt.load_state_dict(torch.load(DATA / "quzo_int8" / "state.pt", weights_only=True))
    assert opt.steps_taken == 4
    assert opt.log.base_seed == 31 and opt.log.base_fingerprint is not None
    model = base_model("quzo_int8")
    Z.replay(model, opt.log, backend=BACKEND)
    assert_bitwise(model, "quzo_int8")
