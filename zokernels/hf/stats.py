"""McNemar's test for two classifiers scored on the same examples."""
from __future__ import annotations

import math
from collections.abc import Sequence


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test: b = #(a right, b wrong), c = #(a wrong, b right); under H0 the
    discordant pairs split Binomial(b + c, 1/2), p = min(1, 2 * P[X <= min(b, c)])."""
    if len(correct_a) != len(correct_b):
        raise ValueError("both classifiers must be scored on the same examples")
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    n = b + c
    if n == 0:
        p = 1.0
    else:
        k = min(b, c)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
        p = min(1.0, 2.0 * tail)
    return {"test": "mcnemar_exact", "a_only_correct": b, "b_only_correct": c, "p_value": p}
