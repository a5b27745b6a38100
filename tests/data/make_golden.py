"""Regenerate golden_z.json from the contract's pure-Python statement (zokernels.contract), with
float64 Box-Muller on the exact uniforms. Backends must reproduce the integers bitwise and the
gaussian values within 1e-5. Run: python tests/data/make_golden.py"""
from __future__ import annotations

import json
import math
from pathlib import Path

from zokernels import contract as C

SEEDS = [0, 1, 0x0123456789ABCDEF, (1 << 63) + 5, C.MASK64]
KEYS = [C.param_key("model.layers.0.self_attn.q_proj.weight"), 0, C.MASK64]
QUERIES = [0, 7, C.MAX_QUERIES - 1]
STREAMS = [C.STREAM_Z, C.STREAM_PROBE_SR_POS, C.STREAM_UPDATE_SR, C.MAX_STREAMS - 1]
INDICES = [0, 1, 2, 3, 5, 4097, (1 << 32) - 1, 1 << 32, (1 << 32) + 6, (1 << 40) + 3, (1 << 49) + 7,
           C.MAX_ELEMENT_INDEX - 1]


def u_open(r: int) -> float:
    return ((r >> 9) * 2 + 1) * 2.0 ** -24


def entry(seed: int, stream: int, query: int, key: int, j: int) -> dict:
    words = C.philox4x32_py(C.philox_counter(j >> 2, query, stream, key), C.philox_key(seed))
    lane = j & 3
    a, b = (words[0], words[1]) if lane < 2 else (words[2], words[3])
    radius = math.sqrt(-2.0 * math.log(u_open(a)))
    angle = 2.0 * math.pi * u_open(b)
    gauss = radius * (math.cos(angle) if lane % 2 == 0 else math.sin(angle))
    return {"seed": str(seed), "stream": stream, "query": query, "key": str(key), "j": str(j),
            "words": [f"{w:08x}" for w in words], "gaussian": gauss,
            "rademacher": 1 - 2 * (words[lane] >> 31), "uniform": (words[lane] >> 8) * 2.0 ** -24}


def table() -> list[dict]:
    rows = []
    for i, seed in enumerate(SEEDS):
        for k, key in enumerate(KEYS):
            for j in INDICES:
                query = QUERIES[(i + k) % len(QUERIES)]
                stream = STREAMS[(i + 2 * k + j) % len(STREAMS)]
                rows.append(entry(seed, stream, query, key, j))
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("golden_z.json")
    rows = table()
    head = json.dumps({"contract_version": C.CONTRACT_VERSION,
                       "note": "z(s, stream, q, k, j); integers as decimal strings; "
                               "words = Philox4x32-10 of block j >> 2"})
    body = ",\n".join(json.dumps(r) for r in rows)
    out.write_text(head[:-1] + ', "rows": [\n' + body + "\n]}\n")
    print(f"wrote {len(rows)} rows to {out}")
