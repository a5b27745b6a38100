"""prune(): magnitude, Wanda and Wanda++ (regional gradients, regional optimization) pruning of the Linears inside a
causal LM's decoder blocks, block by block (Wanda's sequential mode: each block is calibrated on the inputs that the
already-pruned blocks before it produce). Scores: zokernels.prune.scores; patterns: zokernels.prune.patterns.

Wanda++'s regional optimization (RO) as read here (arXiv 2503.04992, Alg. 1), per block after scoring:
    for round k = 1..K:  keep <- top of S(W) per row / N:M group;  W <- W * keep;
                         RMSprop on E_n ||f_dense(X_n) - f(X_n; W)||^2 over `ro_samples` calibration sequences,
                         rounds 1..K-1 updating every weight of the block's Linears (pruned ones restart from zero and
                         may win the next round's re-scoring), round K only the kept ones;
                         S(W) = |W| * (alpha * G + ||X||) re-scored with the updated W (G, ||X|| from the dense block)
so the block ends exactly at the asked sparsity with its kept weights optimized. The block runs in float32 for
the gradients (a copy of one block at a time), whatever the model's dtype."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..masks import ParamMask
from .calibration import (BlockInput, block_linears, capture_inputs, check_batches, decoder_blocks,
                          run_block)
from .patterns import PruneError, keep_mask, parse_pattern, resolve_sparsity, rows_mask
from .scores import METHODS, InputNorms, score


@dataclass
class PruneReport:
    """What prune() did: the kept-weight masks (name -> ParamMask, the form ZOSGD(masks=...) takes), per-Linear
    sparsity, per-block timings (and RO losses), the calibration size and the total wall time."""
    method: str
    pattern: str
    sparsity: float
    alpha: float | None
    regional_opt: bool
    masks: dict[str, ParamMask] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)
    blocks: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def overall_sparsity(self) -> float:
        """Zeros / weights over every pruned Linear."""
        total = sum(v["numel"] for v in self.layers.values())
        return sum(v["zeros"] for v in self.layers.values()) / total if total else 0.0

    def to_dict(self) -> dict:
        """JSON-ready (masks as counts; the masks themselves: zokernels.masks.save_masks)."""
        return {"method": self.method, "pattern": self.pattern, "sparsity": self.sparsity, "alpha": self.alpha,
                "regional_opt": self.regional_opt, "overall_sparsity": self.overall_sparsity,
                "layers": self.layers, "blocks": self.blocks, "calibration": self.calibration,
                "seconds": self.seconds}


@dataclass(frozen=True)
class RegionalOpt:
    rounds: int = 5
    lr: float = 3e-7
    samples: int = 32


def _check_args(method: str, alpha: float, regional_opt: bool, ro: RegionalOpt) -> None:
    if method not in METHODS:
        raise PruneError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise PruneError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if regional_opt and method != "wanda++":
        raise PruneError("regional_opt=True is Wanda++'s regional optimization: use method='wanda++'")
    if regional_opt and (ro.rounds < 1 or ro.samples < 1 or not ro.lr > 0 or not math.isfinite(ro.lr)):
        raise PruneError(f"regional optimization needs ro_rounds >= 1, ro_samples >= 1 and ro_lr > 0, got {ro}")


def _targets(model: nn.Module, blocks_path: str, blocks: nn.ModuleList, pattern: str):
    """[(block index, [(param name, short name, Linear)])] of every block; PruneError if there is nothing to prune
    or an N:M group does not divide a Linear's input dimension."""
    nm = parse_pattern(pattern)
    out, bad = [], []
    for i, block in enumerate(blocks):
        linears = [(f"{blocks_path}.{i}.{n}.weight", n, m) for n, m in block_linears(block)]
        bad += [f"{name} (in {m.in_features})" for name, _, m in linears if nm and m.in_features % nm[1]]
        out.append((i, linears))
    if not any(linears for _, linears in out):
        raise PruneError(f"no nn.Linear inside the decoder blocks at {blocks_path!r}: nothing to prune")
    if bad:
        raise PruneError(f"pattern {pattern} needs every pruned Linear's input dimension divisible by {nm[1]}; "
                         f"not: {', '.join(bad[:5])}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return out


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="block", leave=False)


def prune(model: nn.Module, calibration=None, method: str = "wanda", sparsity: float | None = None,
          pattern: str = "unstructured", *, alpha: float = 100.0, regional_opt: bool = False, ro_rounds: int = 5,
          ro_lr: float = 3e-7, ro_samples: int = 32, blocks: str | None = None,
          progress: bool = True) -> PruneReport:
    """Prune every nn.Linear inside the decoder blocks of `model` in place (pruned weights set to 0; embeddings and
    lm_head never), to `sparsity` per output row (unstructured; default 0.5) or by an N:M `pattern` ("2:4", "4:8":
    sparsity 1 - N/M). `calibration`: an iterable of batches the model takes as model(**batch) (their
    attention_mask, when given, marks the real tokens); not needed by "magnitude". Wanda++: `alpha` weighs the
    regional gradients, `regional_opt` turns on RO (ro_rounds, ro_lr, ro_samples: RMSprop rounds, its lr, the
    calibration sequences it fits). Every input is checked before any weight changes."""
    started = time.time()
    ro = RegionalOpt(int(ro_rounds), float(ro_lr), int(ro_samples))
    _check_args(method, alpha, regional_opt, ro)
    sparsity = resolve_sparsity(sparsity, pattern)
    blocks_path, block_list = decoder_blocks(model, blocks)
    targets = _targets(model, blocks_path, block_list, pattern)
    report = PruneReport(method, pattern, sparsity, alpha if method == "wanda++" else None, bool(regional_opt))
    was_training = model.training
    model.eval()
    try:
        if method == "magnitude":
            inputs = None
        else:
            batches = check_batches(calibration)
            inputs = capture_inputs(model, block_list[0], batches)
            with torch.no_grad():
                run_block(block_list[0], inputs[0])  # a block that cannot run fails here, before any weight changes
            report.calibration = {"batches": len(inputs), "samples": sum(x.rows for x in inputs),
                                  "tokens": int(sum(x.tokens.sum() if x.tokens is not None
                                                    else x.hidden.shape[0] * x.hidden.shape[1] for x in inputs))}
        bar = _progress(len(block_list), progress, f"prune {method} {pattern if parse_pattern(pattern) else sparsity}")
        for i, linears in targets:
            t0 = time.time()
            info = _prune_block(block_list[i], linears, inputs, method, sparsity, pattern, alpha,
                                ro if regional_opt else None, report)
            if inputs is not None and i + 1 < len(block_list):
                with torch.no_grad():  # the pruned block's outputs are the next block's inputs
                    inputs = [x.with_hidden(run_block(block_list[i], x)) for x in inputs]
            report.blocks.append({"block": i, "seconds": _now(block_list[i]) - t0, **info})
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        model.train(was_training)
    report.seconds = time.time() - started
    return report


def _prune_block(block: nn.Module, linears, inputs: list[BlockInput] | None, method: str, sparsity: float,
                 pattern: str, alpha: float, ro: RegionalOpt | None, report: PruneReport) -> dict:
    """Score, prune (and with `ro` regionally optimize) one block's Linears; fills report.masks / layers."""
    info: dict = {}
    norms = grads = None
    if method != "magnitude":
        t0 = _now(block)
        norms = _input_norms(block, linears, inputs)
        info["calibrate_seconds"] = _now(block) - t0
    if method == "wanda++":
        t0 = _now(block)
        grads = _regional_grad_rms(block, linears, inputs)
        info["gradient_seconds"] = _now(block) - t0

    def keeps(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {short: keep_mask(score(weights[short], method, None if norms is None else norms[short],
                                       None if grads is None else grads[short], alpha), sparsity, pattern)
                for _, short, _ in linears}

    keep = keeps({short: m.weight for _, short, m in linears})
    if ro is not None:
        t0 = _now(block)
        keep, losses = _regional_opt(block, linears, inputs, keep, keeps, ro)
        info.update(ro_seconds=_now(block) - t0, **losses)
    with torch.no_grad():
        for name, short, m in linears:
            k = keep[short].to(m.weight.device)
            m.weight.mul_(k.to(m.weight.dtype))
            m.weight.masked_fill_(~k, 0.0)  # -0.0 and NaN * 0 become exact zeros
            report.masks[name] = rows_mask(k)  # on the weight's device
            zeros = int((m.weight == 0).sum())
            report.layers[name] = {"shape": list(m.weight.shape), "numel": m.weight.numel(), "zeros": zeros,
                                   "sparsity": zeros / m.weight.numel(), "kept_per_row": int(k[0].sum())}
    return info


def _now(module: nn.Module) -> float:
    """time.time() after the module's device has finished its queued work (phase timings on a GPU)."""
    p = next(module.parameters(), None)
    if p is not None and p.device.type == "cuda":
        torch.cuda.synchronize(p.device)
    return time.time()


def _input_norms(block: nn.Module, linears, inputs: list[BlockInput]) -> dict[str, torch.Tensor]:
    acc = InputNorms([(short, m) for _, short, m in linears])
    try:
        with torch.no_grad():
            for x in inputs:
                acc.tokens = x.tokens
                run_block(block, x)
                acc.samples += x.rows
    finally:
        acc.remove()
    return acc.norms()


def _float32_block(block: nn.Module, linears) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A float32 copy of `block` whose Linear weights alone require grad."""
    work = copy.deepcopy(block).float()
    for p in work.parameters():
        p.requires_grad_(False)
    weights = {short: work.get_submodule(short).weight for _, short, _ in linears}
    for w in weights.values():
        w.requires_grad_(True)
    return work, weights


def _real(out: torch.Tensor, x: BlockInput) -> torch.Tensor:
    """The block output at the real tokens only (padding rows zeroed)."""
    if x.tokens is None:
        return out
    return out * x.tokens.to(out.device, out.dtype).reshape(out.shape[:-1]).unsqueeze(-1)


def _samples(inputs: list[BlockInput]):
    for x in inputs:
        for r in range(x.rows):
            yield x.row(r) if x.rows > 1 else x


def _regional_grad_rms(block: nn.Module, linears, inputs: list[BlockInput]) -> dict[str, torch.Tensor]:
    """G = sqrt(mean over calibration sequences n of (d ||f_block(X_n)||_2 / dW)^2), float64, one backward per
    sequence through this block alone (in float32)."""
    work, weights = _float32_block(block, linears)
    acc = {k: torch.zeros_like(w, dtype=torch.float64) for k, w in weights.items()}
    n = 0
    for x in _samples(inputs):
        x = x.cast(torch.float32)
        loss = torch.linalg.vector_norm(_real(run_block(work, x), x))
        grads = torch.autograd.grad(loss, list(weights.values()))
        for k, g in zip(weights, grads):
            acc[k] += g.to(torch.float64) ** 2
        n += 1
    return {k: (a / n).sqrt() for k, a in acc.items()}


def _regional_opt(block: nn.Module, linears, inputs: list[BlockInput], keep: dict, keeps, ro: RegionalOpt):
    """RO (module docstring): returns the final keep masks, and the mean squared output error against the dense
    block on the RO samples after the first pruning ('ro_loss_before') and at the end ('ro_loss_after')."""
    work, weights = _float32_block(block, linears)
    samples = [x.cast(torch.float32) for x in _take(_samples(inputs), ro.samples)]
    with torch.no_grad():
        targets = [run_block(work, x) for x in samples]
    opt = torch.optim.RMSprop(list(weights.values()), lr=ro.lr)

    def error() -> float:
        with torch.no_grad():
            return sum(float(((_real(run_block(work, x) - t, x)) ** 2).mean()) for x, t in zip(samples, targets)) \
                / len(samples)

    before = None
    for k in range(ro.rounds):
        if k:
            keep = keeps({short: w.detach() for short, w in weights.items()})
        with torch.no_grad():
            for short, w in weights.items():
                w.masked_fill_(~keep[short].to(w.device), 0.0)
        if before is None:
            before = error()
        last = k == ro.rounds - 1
        for x, t in zip(samples, targets):
            opt.zero_grad(set_to_none=True)
            loss = ((_real(run_block(work, x) - t, x)) ** 2).mean()
            loss.backward()
            if last:  # the last round moves only the kept weights
                for short, w in weights.items():
                    w.grad.masked_fill_(~keep[short].to(w.device), 0.0)
            opt.step()
    with torch.no_grad():
        for short, w in weights.items():
            w.masked_fill_(~keep[short].to(w.device), 0.0)
        after = error()
        for _, short, m in linears:
            m.weight.copy_(weights[short].to(m.weight.dtype))
    return keep, {"ro_loss_before": before, "ro_loss_after": after}


def _take(it, n: int) -> list:
    out = []
    for x in it:
        if len(out) == n:
            break
        out.append(x)
    return out
