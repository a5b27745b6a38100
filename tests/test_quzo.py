"""QuZO: ZO fine-tuning of quantized models (zokernels.quant.quzo)."""
import math

import pytest
import torch

from zokernels import contract as C
from zokernels import quant
import zokernels as Z
from zokernels.quant.quzo import QuZO
from zokernels.quant import formats as F
from zokernels.quant import ops as QO
from zokernels.quant.variance import compare

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_llama(fmt, matmul="dequant", layers=1):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    rep = quant.quantize_model(model, fmt, group_size=32, matmul=matmul)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    return model, rep, lambda: model(input_ids=ids, labels=ids).loss.detach()


def _qstate(model):
    return [m.qweight.view(torch.uint8).clone() for _, m in quant.quant_layers(model)]


def test_quzo_lowers_loss_int8():
    model, rep, closure = _tiny_llama("int8")
    assert len(rep.layers) == 7 and "lm_head" not in rep.layers
    opt = QuZO(model, lr=1e-2, eps=1e-2, seed=3)
    before = float(closure())
    losses = [float(opt.step(closure)) for _ in range(100)]
    after = float(closure())
    assert all(math.isfinite(v) for v in losses)
    assert after < before - 0.03, (before, after)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.02
    assert len(opt.log.steps) == 100 and all(len(r.grads) == 1 for r in opt.log.steps)


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_quzo_lowers_loss_int4_fp8(fmt):
    model, _, closure = _tiny_llama(fmt)
    opt = QuZO(model, lr=1e-2, eps=1e-2, seed=3)
    before = float(closure())
    for _ in range(40):
        opt.step(closure)
    assert float(closure()) < before - 0.01
    assert all(m.fmt == fmt for _, m in quant.quant_layers(model))


def test_quzo_nonfinite_loss_skips_with_a_warning_at_the_caller():
    model, _, closure = _tiny_llama("int8")
    opt = QuZO(model, lr=1e-2, eps=1e-2, seed=3)
    before = _qstate(model)
    with pytest.warns(RuntimeWarning, match="the step was skipped") as rec:
        opt.step(lambda: closure() * float("nan"))
    assert all(w.filename == __file__ for w in rec), [w.filename for w in rec]
    assert all(torch.equal(a, b) for a, b in zip(before, _qstate(model))) and opt.log.steps[-1].skipped


def test_quzo_quantizes_when_given_fmt_and_keeps_global_rng():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    opt = QuZO(model, lr=1e-2, eps=1e-2, fmt="int8", seed=1, n_queries=2)
    assert opt.quant_report is not None and opt.quant_report.saved > 0
    state = torch.get_rng_state()
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(opt.log.steps[0].grads) == 2 and model.training  # train mode restored after the step


def test_inplace_and_fused_probes_are_identical():
    """Both probe modes see the same weights: bitwise-equal losses, grads and final q, with saturation."""
    runs = []
    for probe in ("fused", "inplace"):
        model, _, closure = _tiny_llama("int4")
        opt = QuZO(model, lr=2e-2, eps=5e-2, seed=9, probe=probe, n_queries=2, update="paper")
        losses = [float(opt.step(closure)) for _ in range(4)]
        runs.append((losses, [r.grads for r in opt.log.steps], _qstate(model),
                     sum(r.probe_saturated for r in opt.log.steps)))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))
    assert runs[0][3] == runs[1][3] > 0  # the grid saturated and inplace restore was still exact


def test_replay_rebuilds_weights_bitwise():
    model, _, closure = _tiny_llama("int8")
    base, _, _ = _tiny_llama("int8")
    opt = QuZO(model, lr=1e-2, eps=1e-2, seed=5, update="paper")
    for _ in range(5):
        opt.step(closure)
    assert not all(torch.equal(a, b) for a, b in zip(_qstate(model), _qstate(base)))
    Z.replay(base, opt.log)
    assert all(torch.equal(a, b) for a, b in zip(_qstate(model), _qstate(base)))


def test_replay_refuses_a_foreign_base_and_old_contracts():
    """replay checks the quantized base (format, bits, scales) against the log's fingerprint and the
    contract version: a trained model or another format is refused, not silently replayed onto."""
    from zokernels.log import LogMismatch
    model, _, closure = _tiny_llama("int8")
    opt = QuZO(model, lr=1e-2, eps=1e-2, seed=5)
    for _ in range(2):
        opt.step(closure)
    with pytest.raises(LogMismatch, match="not the quantized base"):
        Z.replay(model, opt.log)                    # already fine-tuned
    with pytest.raises(LogMismatch, match="not the quantized base"):
        Z.replay(_tiny_llama("fp8")[0], opt.log)    # another format
    old = Z.FineTuneLog(dict(opt.log.header, contract_version=0), opt.log.steps)
    with pytest.raises(LogMismatch, match="contract v0"):
        Z.replay(_tiny_llama("int8")[0], old)
    base = _tiny_llama("int8")[0]
    with pytest.warns(DeprecationWarning, match="replay_quzo is deprecated"):
        from zokernels.quant.quzo import replay_quzo
        replay_quzo(base, opt.log)                  # the old name forwards
    assert all(torch.equal(a, b) for a, b in zip(_qstate(model), _qstate(base)))


def test_lr_is_checked_at_every_step_and_multi_process_is_refused(monkeypatch):
    import numpy as np
    from zokernels import distributed
    model, _, closure = _tiny_llama("int8")
    opt = QuZO(model, lr=np.float32(1e-2), eps=1e-2, seed=5)
    before = _qstate(model)
    for bad in (float("nan"), -1.0):
        opt.param_groups[0]["lr"] = bad
        with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
            opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, _qstate(model))) and not opt.log.steps
    monkeypatch.setattr(distributed, "resolve_group", lambda group=None: object())
    with pytest.raises(NotImplementedError, match="no multi-process support"):
        QuZO(_tiny_llama("int8")[0], lr=1e-2, eps=1e-2)


def test_update_forms_unbiased_and_single_has_less_variance():
    """At fixed z and mu, over redraws of the roundings: both forms have mean lr mu z / s; their variances
    are equal while the step stays within one grid cell (any unbiased {k, k+1}-valued step has variance
    p(1-p)), and the paper form's is larger (~4x here) once lr mu / eps > 1."""
    for ratio, expect in ((0.5, "equal"), (2.0, "larger")):
        o = compare(ratio, draws=80, shape=(16, 32))
        s, p = o["single"], o["paper"]
        # bias: mean |mean - target| over elements, vs the standard error sqrt(var / draws)
        # E|mean - target| = sqrt(2 / pi) * standard error for a normal mean
        assert s["bias"] < 1.5 * math.sqrt(s["var"] / 80) and p["bias"] < 1.5 * math.sqrt(p["var"] / 80)
        assert o["elements"] > 300
        assert abs(s["var"] - s["predicted"]) < 0.15 * s["predicted"]
        if expect == "equal":
            assert abs(p["var"] / s["var"] - 1) < 0.15
        else:
            assert p["var"] > 2.5 * s["var"]


def test_activation_sr_common_random_numbers():
    """W8A8 with activation SR: both probes of a query draw the same uniforms. With the probe weights made
    equal (eps so small that Q1(eps z / s) = 0), CRN gives mu = 0 exactly while independent draws give
    noise / (2 eps); at the working eps, mu's variance at fixed z (over Q1 and activation draws) stays near
    its value with round-to-nearest activations, and the act-SR part is smaller than without CRN."""
    model, _, closure = _tiny_llama("int8", matmul="w8a8")
    sr = QuZO(model, lr=0.0, eps=1e-9, seed=1, act_sr=True)
    assert all(int(QO.probe_delta(m.qw, 77, m.key, 0, 1e-9).abs().sum()) == 0 for m in sr._layers)
    lp, lm, _ = sr.projected_grad(closure, 77, 0)
    assert lp == lm
    lp, lm, _ = sr.projected_grad(closure, 77, 0, act_seed_minus=12345)
    assert abs(lp - lm) / 2e-9 > 1e3

    eps, draws = 1e-2, 16
    rn = QuZO(model, lr=0.0, eps=eps, seed=1, act_sr=False)
    sr = QuZO(model, lr=0.0, eps=eps, seed=1, act_sr=True)
    mus = {"rn": [], "crn": [], "indep": []}
    for k in range(draws):
        for name, opt, extra in (("rn", rn, {}), ("crn", sr, {}), ("indep", sr, {"act_seed_minus": k + 10 ** 6})):
            lp, lm, _ = opt.projected_grad(closure, 77, 0, sr_seed=k, act_seed=k, **extra)
            mus[name].append((lp - lm) / (2 * eps))
    mu = {k: torch.tensor(v, dtype=torch.float64) for k, v in mus.items()}
    assert mu["rn"].var() > 0
    assert mu["crn"].var() < 2.0 * mu["rn"].var()
    # paired by Q1 draw: what activation SR adds to mu, with and without common random numbers
    assert (mu["crn"] - mu["rn"]).var() < 0.7 * (mu["indep"] - mu["rn"]).var()


def test_quzo_rejects_bad_configs():
    model, _, _ = _tiny_llama("fp8")
    with pytest.raises(ValueError, match="inplace"):
        QuZO(model, lr=1e-3, eps=1e-3, probe="inplace")
    with pytest.raises(ValueError, match="act_sr"):
        QuZO(model, lr=1e-3, eps=1e-3, act_sr=True)
    with pytest.raises(ValueError, match="fmt"):
        QuZO(model, lr=1e-3, eps=1e-3, fmt="int8")
    with pytest.raises(ValueError, match="update"):
        QuZO(model, lr=1e-3, eps=1e-3, update="twice")
    with pytest.raises(ValueError, match="no QuantLinear"):
        QuZO(torch.nn.Linear(4, 4), lr=1e-3, eps=1e-3)


def test_quzo_act_sr_on_fp8_layers_uses_the_probe_query_for_both_signs():
    """fp8 layers quantize their activations too: act_sr is accepted there, and the two probes of a
    query draw the same activation uniforms (with equal probe weights, mu is exactly 0)."""
    model, _, closure = _tiny_llama("fp8", matmul="fp8")
    opt = QuZO(model, lr=0.0, eps=1e-9, seed=5, act_sr=True)
    assert opt.config.act_sr
    before = _qstate(model)
    opt.step(closure)
    assert opt.log.steps[-1].grads == (0.0,)
    assert all(torch.equal(a, b) for a, b in zip(before, _qstate(model)))
