"""Per-weight importance scores for masked multi-task ZO (MaZO and the simpler rules).

For task t with calibration batches b = 1..B (one backprop each), g_b = dL_t(b)/dW:

    gbar = (1/B) sum_b g_b,   F = (1/B) sum_b g_b^2                     (empirical Fisher diagonal)
    S_global = |gbar * W| + 0.5 * F * W^2          second-order Taylor saliency, Hessian ~ Fisher
    S_greedy = lr_scale * |gbar|                   one greedy step's first-order loss change per unit z
    S^t      = N(S_global) + alpha * N(S_greedy) + beta * N(|W|)
    S        = sum_t N(S^t)

N(X) divides every output row of X by its mean (rows: see masks.matrix_shape), so each term and each
task weighs the same in every row whatever its units. Other methods:

    "magnitude": S = -|W|                 (Sparse MeZO: perturb the smallest weights)
    "wanda":     S = sum_t N(|W| * ||X_j||_2)   (||X_j||_2 over task t's calibration tokens of input
                 column j of each nn.Linear; forward only, no backprop; non-Linear weights: |W|)
    "random":    S ~ U(0, 1), seeded           (ZO-Bench's random masks)

No ZO-averaged importance: an average of N SPSA estimates has signal-to-noise ~ sqrt(N / d).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

METHODS = ("mazo", "magnitude", "wanda", "random")
_TINY = 1e-30


def row_normalize(x: torch.Tensor) -> torch.Tensor:
    """x divided by the mean of its output row (rows as in masks.matrix_shape); all-zero rows stay 0."""
    rows = 1 if x.ndim <= 1 or x.shape[0] == 0 else x.shape[0]
    flat = x.reshape(rows, -1)
    return (flat / (flat.mean(dim=1, keepdim=True) + _TINY)).reshape(x.shape)


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """model(**batch).loss for dict batches (HuggingFace style)."""
    if isinstance(batch, Mapping):
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, (tuple, list)):
            loss = out[0]
        if loss is not None:
            return loss
    raise TypeError("importance() needs loss_fn(model, batch) -> scalar loss for these batches "
                    "(the default only handles dict batches whose model output has .loss)")


def _tasks(task_batches) -> dict[str, list]:
    if task_batches is None:
        return {}
    if isinstance(task_batches, Mapping):
        return {str(k): list(v) for k, v in task_batches.items()}
    return {f"task{i}": list(v) for i, v in enumerate(task_batches)}


def _scored(model: nn.Module, params) -> dict[str, nn.Parameter]:
    if params is None:
        return {n: p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}
    if isinstance(params, Mapping):
        return dict(params)
    named = dict(model.named_parameters())
    out = {}
    for p in params:
        if isinstance(p, str):
            out[p] = named[p]
        elif isinstance(p, tuple):
            out[p[0]] = p[1]
        else:
            name = next((n for n, q in named.items() if q is p), None)
            if name is None:
                raise ValueError(f"parameter of shape {tuple(p.shape)} is not in the model")
            out[name] = p
    return out


def fisher_stats(model: nn.Module, batches: Iterable, params: Mapping[str, torch.Tensor],
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> tuple[dict, dict]:
    """(gbar, F): mean gradient and mean squared gradient (float32) over the batches, one backprop each."""
    names = list(params)
    tensors = [params[n] for n in names]
    gsum = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    g2sum = {n: torch.zeros_like(v) for n, v in gsum.items()}
    count = 0
    flags = [p.requires_grad for p in tensors]
    try:
        for p in tensors:
            p.requires_grad_(True)
        for batch in batches:
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    g = g.float()
                    gsum[n] += g
                    g2sum[n] += g * g
            count += 1
    finally:
        for p, f in zip(tensors, flags):
            p.requires_grad_(f)
    if count == 0:
        raise ValueError("a task has no calibration batches")
    return {n: v / count for n, v in gsum.items()}, {n: v / count for n, v in g2sum.items()}


def input_norms(model: nn.Module, batches: Iterable, params: Mapping[str, torch.Tensor],
                forward: Callable[[nn.Module, Any], Any]) -> dict[str, torch.Tensor]:
    """{name of an nn.Linear weight: ||X_j||_2 over all calibration tokens, per input column j}."""
    by_id = {id(p): n for n, p in params.items()}
    sq: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, module.in_features).float()
            s = (x * x).sum(dim=0)
            sq[name] = sq[name] + s if name in sq else s
        return fn

    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in by_id:
            handles.append(module.register_forward_pre_hook(hook(by_id[id(module.weight)])))
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: v.sqrt() for n, v in sq.items()}


def importance(model: nn.Module, task_batches=None, method: str = "mazo", *,
               loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, params=None, alpha: float = 1.0,
               beta: float = 0.1, lr_scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """{parameter name: float32 score} (higher = more important) for masks.build_masks.

    task_batches: {task: iterable of calibration batches} (or a list of iterables); loss_fn(model,
    batch) -> scalar loss (default: model(**batch).loss), used as the forward by "wanda" too.
    params: names / parameters to score (default: trainable parameters with ndim >= 2). The model
    runs in eval mode (restored after); weights are not changed."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for v, what in ((alpha, "alpha"), (beta, "beta"), (lr_scale, "lr_scale")):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{what} must be a finite number >= 0, got {v!r}")
    scored = _scored(model, params)
    if not scored:
        raise ValueError("no parameters to score")
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in scored.items()}
    if method == "magnitude":
        return {n: -p.detach().float().abs() for n, p in scored.items()}
    tasks = _tasks(task_batches)
    if not tasks:
        raise ValueError(f"method {method!r} needs task_batches: {{task: calibration batches}}")
    loss_fn = loss_fn or default_loss
    total = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in scored.items()}
    was_training = model.training
    model.eval()
    try:
        for batches in tasks.values():
            if method == "wanda":
                norms = input_norms(model, batches, scored, loss_fn)
                for n, p in scored.items():
                    w = p.detach().float().abs()
                    s = w * norms[n].reshape(1, -1) if n in norms else w
                    total[n] += row_normalize(s)
                continue
            gbar, fisher = fisher_stats(model, batches, scored, loss_fn)
            for n, p in scored.items():
                w = p.detach().float()
                s_global = (gbar[n] * w).abs() + 0.5 * fisher[n] * w * w
                s_greedy = lr_scale * gbar[n].abs()
                s = row_normalize(s_global) + alpha * row_normalize(s_greedy) + beta * row_normalize(w.abs())
                total[n] += row_normalize(s)
    finally:
        model.train(was_training)
    return total
