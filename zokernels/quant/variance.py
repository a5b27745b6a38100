"""Variance of the QuZO update forms at a fixed direction z and fixed projected gradient mu.

    python -m zokernels.quant.variance

For one int8 layer, draws the update's roundings (Q2 and the final SR) with R seeds while z and mu stay
fixed, and reports, per element averaged over the layer: the mean step (both forms are unbiased: it
matches x* = lr mu z / s; elements that could reach the clamp at +-qmax are left out), the empirical variance of the integer step, and the predicted variances

    single: frac(x)(1 - frac(x)),                    x = lr mu z / s
    paper : E[frac(y)(1 - frac(y))] + (lr mu / eps)^2 frac(d)(1 - frac(d)),  y = lr mu D2 / eps, d = eps z / s
"""
from __future__ import annotations

import torch

from . import formats as F
from . import ops as QO


def compare(lr_mu_over_eps: float, eps: float = 1e-3, draws: int = 200, shape=(64, 64), seed: int = 7,
            key: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * 0.02
    qw = F.quantize_weight(w, "int8")
    mu, lr = 1.0, lr_mu_over_eps * eps
    target = (QO._z(qw, seed, key, 0, "gaussian") * lr * mu / F.scale_full(qw)).double()
    # elements that could reach the grid edge are left out: the clamp there biases any form
    inner = (F.values(qw).double().abs() + 2 * target.abs() + 3 < qw.qmax)
    out = {"elements": int(inner.sum())}
    for form in QO.UPDATE_FORMS:
        steps = []
        for r in range(draws):
            x = QO.update_target(qw, seed, key, [mu], lr, eps, form, rounding_seed=10_000 + r)
            steps.append((F.values(qw) - QO.update_values(qw, x, seed, key, rounding_seed=20_000 + r).values).double())
        s = torch.stack(steps)[:, inner]
        out[form] = {"bias": float((s.mean(0) - target[inner]).abs().mean()), "var": float(s.var(0).mean())}
    d = QO.scaled_direction(qw, seed, key, 0, eps).double()
    fd = (d - torch.floor(d))[inner]
    fx = (target - torch.floor(target))[inner]
    out["single"]["predicted"] = float((fx * (1 - fx)).mean())
    out["paper"]["predicted_extra"] = float(((lr * mu / eps) ** 2 * fd * (1 - fd)).mean())
    out["mean_abs_step"] = float(target[inner].abs().mean())
    return out


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'lr*mu/eps':>10} {'E|x*|':>8} {'var single':>11} {'pred':>8} {'var paper':>10} {'extra pred':>10} "
          f"{'ratio':>6} {'|bias| s/p':>14}")
    for r in (0.01, 0.1, 0.5, 1.0, 2.0):
        o = compare(r)
        s, p = o["single"], o["paper"]
        print(f"{r:>10} {o['mean_abs_step']:>8.4f} {s['var']:>11.5f} {s['predicted']:>8.5f} {p['var']:>10.5f} "
              f"{p['predicted_extra']:>10.5f} {p['var'] / s['var']:>6.2f} {s['bias']:>6.4f}/{p['bias']:.4f}")


if __name__ == "__main__":
    main()
