"""Fine-tune logs written by zokernels at commit e04bf6d (log format v1 and the QuZO JSON log), for
tests/test_legacy_logs.py: newer code must still load and replay them bitwise.

Run against commit e04bf6d, not against the current tree (the point is to freeze what that code wrote):

    git worktree add /tmp/legacy e04bf6d
    PYTHONPATH=/tmp/legacy .venv/bin/python tests/data/legacy_logs/make_fixtures.py
    git worktree remove /tmp/legacy

Each fixture directory holds base.safetensors (the weights before training), the log as that code saved
it (log.npz: FineTuneLog.save; quzo_log.json: zokernels.hf.tuning.save_quzo_log), masks.safetensors
(MaZO, zokernels.mazo.save_masks), state.pt (the optimizer's state_dict, torch.save) and
trained.safetensors (the weights after training). Weights come from numpy's PCG64 so that they do not
depend on the torch version; the forwards only produce the logged projected gradients, which replay
reads from the log (replay runs no forward), so BLAS differences cannot change the expected result.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import zokernels as Z
from zokernels.hf.tuning import save_quzo_log
from zokernels.mazo import row_topk, save_masks
from zokernels.optim.quzo import QuZO
from zokernels.quant import quantize_model

OUT = Path(__file__).resolve().parent
BACKEND = "reference"
SHAPES = (("a", 5, 7, True), ("b", 7, 13, True), ("c", 13, 3, False))   # (name, in, out, bias)


class Tiny(torch.nn.Module):
    """x [4, 5] -> 7 -> 13 -> 3 with odd sizes (no dimension a multiple of 4: exercises the ops' tails)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        rng = np.random.default_rng(1234)
        for name, n_in, n_out, bias in SHAPES:
            lin = torch.nn.Linear(n_in, n_out, bias=bias)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.4))
                if bias:
                    lin.bias.copy_(torch.from_numpy(rng.standard_normal(n_out).astype(np.float32) * 0.1))
            setattr(self, name, lin.to(dtype))

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def batch():
    rng = np.random.default_rng(99)
    x = torch.from_numpy(rng.standard_normal((4, 5)).astype(np.float32))
    y = torch.from_numpy(rng.standard_normal((4, 3)).astype(np.float32))
    return x, y


def closure_of(model, nan_calls=()):
    """Mean squared error on a fixed batch; the calls numbered in nan_calls return NaN (skipped steps)."""
    x, y = batch()
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] in nan_calls:
            return torch.tensor(float("nan"))
        out = model(x.to(model.a.weight.dtype if hasattr(model.a, "weight") else torch.float32))
        return ((out.float() - y) ** 2).mean()
    return closure


def state_of(model) -> dict:
    return {n: t.detach().clone().contiguous() for n, t in model.state_dict().items()}


def train_zosgd(name: str, dtype: torch.dtype, steps: int, masked: bool = False, nan_calls=(), **kw):
    d = OUT / name
    d.mkdir(exist_ok=True)
    model = Tiny(dtype)
    save_file(state_of(model), d / "base.safetensors")
    masks = None
    if masked:
        rng = np.random.default_rng(7)
        scores = {"b.weight": torch.from_numpy(rng.random((13, 7)).astype(np.float32)),
                  "c.weight": torch.from_numpy(rng.random((3, 13)).astype(np.float32))}
        masks = {n: row_topk(s, 0.4) for n, s in scores.items()}
        save_masks(masks, d / "masks.safetensors")
    decay = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [(n, p) for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = Z.ZOSGD([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=0.02,
                  seed=2024, backend=BACKEND, model=model, masks=masks, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    closure = closure_of(model, nan_calls)
    for _ in range(steps):
        opt.step(closure)
        sched.step()
    opt.log.save(d / "log.npz")
    torch.save(opt.state_dict(), d / "state.pt")
    save_file(state_of(model), d / "trained.safetensors")
    return opt


def train_quzo(name: str, steps: int, **kw):
    d = OUT / name
    d.mkdir(exist_ok=True)
    model = Tiny()
    quantize_model(model, "int8", exclude=())
    save_file(state_of(model), d / "base.safetensors")
    opt = QuZO(model, lr=0.05, eps=1e-2, seed=31, backend=BACKEND, **kw)
    closure = closure_of(model)
    for _ in range(steps):
        opt.step(closure)
    save_quzo_log(opt.log, d / "quzo_log.json")
    torch.save(opt.state_dict(), d / "state.pt")
    save_file(state_of(model), d / "trained.safetensors")
    return opt


def main():
    torch.set_num_threads(1)
    import warnings
    warnings.simplefilter("ignore", RuntimeWarning)   # the NaN steps are skipped on purpose
    # (a) float32, hooks probes, two queries, two param groups, an LR schedule, a skipped step (NaN loss)
    train_zosgd("zosgd_fp32", torch.float32, 5, n_queries=2, nan_calls=(6,))
    # (b) bfloat16 with stochastic rounding, MeZO in-place probes, one step abandoned after forward 1
    train_zosgd("zosgd_bf16", torch.bfloat16, 5, probe="inplace", nan_calls=(4,))
    # (c) MaZO row masks on two of the weights, float32, one-sided probes
    train_zosgd("zosgd_mazo", torch.float32, 4, masked=True, one_sided=True)
    # (d) QuZO on an int8 model, the paper's two-rounding update, two queries
    train_quzo("quzo_int8", 4, n_queries=2, update="paper")
    try:
        rev = subprocess.run(["git", "-C", os.path.dirname(Z.__file__), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    (OUT / "WRITTEN_BY").write_text(f"zokernels commit {rev}\ntorch {torch.__version__}\n"
                                    f"numpy {np.__version__}\npython {sys.version.split()[0]}\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"zokernels from {os.path.dirname(Z.__file__)} (commit {rev}); fixtures: {total} bytes")


if __name__ == "__main__":
    main()
